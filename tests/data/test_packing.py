"""Packed rows train exactly like separate samples: same per-sample losses and gradients, no leakage."""

import pytest
import torch
from torch import nn

from tunelab.data.encode import Encoded
from tunelab.data.packing import PackCollator, best_fit, pack_row
from tunelab.demo.build import tiny_config
from tunelab.model.loss import labelled_loss

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

ARCHS = ["llama", "qwen2", "phi3", "qwen2_moe", "gemma3_text"]


def _model(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"sliding_window": 6} if arch == "gemma3_text" else {}
    return AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab_size=200, hidden=32, **extra), attn_implementation="sdpa"
    ).float()


def _samples(seed=0, lengths=(9, 5, 13)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 200, (n,), generator=g).tolist()
        out.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2 :]))
    return out


def _items(samples):
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]


def _token_losses(logits, labels):
    """Per position: loss of predicting labels[t+1] (0 where masked)."""
    lp = nn.functional.cross_entropy(logits[:-1].float(), labels[1:].clamp(min=0), reduction="none")
    return lp * (labels[1:] != -100)


def _packed_forward(model, samples):
    row = PackCollator(0, capacity=10_000, flatten=True)(_items(samples))  # keeps their order
    logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
    return _token_losses(logits, row["labels"][0])


def _per_sample(packed_losses, samples):
    out, start = [], 0
    for s in samples:
        out.append(packed_losses[start : start + len(s.input_ids) - 1].sum())
        start += len(s.input_ids)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_losses_and_gradients_equal_unpacked(arch):
    model, samples = _model(arch), _samples()
    separate = []
    for s in samples:
        logits = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
        separate.append(_token_losses(logits, torch.tensor(s.labels)).sum())
    packed = _per_sample(_packed_forward(model, samples), samples)
    for a, b in zip(separate, packed):
        assert a.item() == pytest.approx(b.item(), abs=1e-5)

    model.zero_grad()
    sum(separate).backward()
    g_sep = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(packed).backward()
    for n, p in model.named_parameters():
        if n in g_sep:
            assert torch.allclose(p.grad, g_sep[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_changing_one_sample_never_changes_another(arch):
    model = _model(arch)
    a, b, c = _samples()
    a2 = Encoded([(t + 7) % 200 for t in a.input_ids], a.labels)
    before = _packed_forward(model, [a, b, c])
    after = _packed_forward(model, [a2, b, c])
    start = len(a.input_ids)
    assert torch.allclose(before[start:], after[start:], atol=1e-6)
    assert not torch.allclose(before[: start - 1], after[: start - 1])


def test_packed_labelled_loss_equals_unpacked_plain_loss():
    model, samples = _model("qwen2"), _samples(3, (7, 11, 4, 9))
    n = sum(s.n_trained - (s.labels[0] != -100) for s in samples)
    total = 0.0
    for s in samples:
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0]
        total += float(_token_losses(logits, torch.tensor(s.labels)).sum())
    batch = PackCollator(0, capacity=20)(_items(samples))
    assert batch["input_ids"].shape[0] == 2
    assert labelled_loss(model, batch).item() == pytest.approx(total / n, abs=1e-5)


def test_first_label_of_every_sample_is_masked_and_positions_restart():
    a, b = Encoded([1, 2, 3], [1, 2, 3]), Encoded([4, 5], [4, 5])
    row = pack_row([a, b])
    assert row["labels"] == [-100, 2, 3, -100, 5]
    assert row["position_ids"] == [0, 1, 2, 0, 1]


def test_best_fit_respects_capacity_and_keeps_every_sample():
    lengths = [7, 3, 9, 1, 4, 6, 2, 8, 5, 10]
    bins = best_fit(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 6  # 55 tokens: 6 bins is the minimum for capacity 10


def test_a_batch_keeps_its_samples_in_fewer_rows_and_can_flatten():
    samples = [Encoded([1, 2, 3], [1, 2, 3]), Encoded([4, 5], [4, 5]), Encoded([6, 7, 8, 9], [6, 7, 8, 9])]
    batch = PackCollator(0, capacity=5)(_items(samples))
    assert batch["input_ids"].shape == (2, 5)  # [6 7 8 9] + pad, [1 2 3 4 5]
    assert sorted(batch["input_ids"][batch["labels"] != -100].tolist()) == [2, 3, 5, 7, 8, 9]
    assert batch["input_ids"][0, 4] == 0 and batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0]
    flat = PackCollator(0, capacity=5, flatten=True)(_items(samples))
    assert flat["input_ids"].shape == (1, 9) and flat["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
