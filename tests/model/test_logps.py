"""Per-sequence log-probs from the chunked head equal log_softmax over full logits, in value and gradient, and the
LoRA reference (adapters off) is the base model itself."""

import pytest
import torch

from tunelab.demo.build import tiny_config
from tunelab.model.loss import head_logps
from tunelab.model.preference import adapters_off, reference_logps, sequence_logps

pytestmark = pytest.mark.fast


def _model(arch="llama", **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab_size=300, hidden=32, **extra), attn_implementation="eager"
    ).float()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (4, 17), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 12:] = -100
    labels[3, :] = -100
    labels[3, 9:11] = ids[3, 9:11]
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask, labels


def _plain(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    per_token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (per_token * keep).sum(1), keep.sum(1).float()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, weights=(1.0, -2.0, 0.5, 3.0)):
    ids, mask, labels = _batch()
    w = torch.tensor(weights)
    model.zero_grad()
    plain, n_plain = _plain(model, ids, mask, labels)
    (plain * w).sum().backward()
    g_plain = _grads(model)
    model.zero_grad()
    ours, n_ours = sequence_logps(model, ids, mask, labels)
    (ours * w).sum().backward()
    g_ours = _grads(model)
    assert torch.equal(n_ours, n_plain)
    assert torch.allclose(ours, plain, atol=1e-5), (ours, plain)
    assert g_plain.keys() == g_ours.keys() and g_ours
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ours[name], atol=1e-5, rtol=1e-4), name
    return g_ours


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_full_model_logps_and_gradients_equal_full_logits(arch):
    extra = {"final_logit_softcapping": 5.0} if arch == "gemma3_text" else {}
    grads = _compare(_model(arch, **extra))
    assert "lm_head.weight" in grads or "model.embed_tokens.weight" in grads


def test_lora_logps_and_gradients_equal_full_logits():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    grads = _compare(model)
    assert all("lora_" in n for n in grads)


def test_head_logps_in_small_chunks_equal_one_chunk():
    torch.manual_seed(1)
    h, w = torch.randn(11, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (11,))
    one = head_logps(h, w, y, chunk=64)
    many = head_logps(h, w, y, chunk=3)
    assert torch.allclose(one, many, atol=1e-6)
    assert torch.allclose(one, (h @ w.t()).log_softmax(-1).gather(1, y[:, None]).squeeze(1), atol=1e-5)


def test_packed_segments_sum_per_sequence():
    model = _model()
    ids, mask, labels = _batch()
    rows, _ = sequence_logps(model, ids, mask, labels)
    from tunelab.constants import loss_positions

    positions = loss_positions(labels)
    by_row = positions // labels.shape[1]
    segments = torch.where(by_row == 0, 1, torch.where(by_row == 1, 0, 2))  # rows 0 and 1 swapped, 2 and 3 merged
    merged, tokens = sequence_logps(model, ids, mask, labels, positions=positions, segments=segments, sequences=3)
    assert torch.allclose(merged, torch.stack([rows[1], rows[0], rows[2] + rows[3]]), atol=1e-6)
    assert tokens.tolist() == [6.0, 11.0, 13.0]


def test_lora_reference_is_the_freshly_loaded_base(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _model()
    base.save_pretrained(tmp_path)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, labels = _batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float()
    expected, _ = sequence_logps(fresh, ids, mask, labels)
    with_adapters, _ = sequence_logps(model, ids, mask, labels)
    ref, _ = reference_logps(model, batch)
    assert not torch.allclose(with_adapters, expected, atol=1e-4)  # the adapters do change the answer
    assert torch.allclose(ref, expected, atol=1e-6)
    assert not ref.requires_grad
    after, _ = sequence_logps(model, ids, mask, labels)
    assert torch.allclose(after, with_adapters)  # switched back on after the reference
    with pytest.raises(ValueError):
        with adapters_off(fresh):
            pass
