"""Gradient accumulation weighs every trained token of an optimizer step equally.

Why: `gradient_accumulation_steps=2` with batch B must train exactly like accumulation 1 with
batch 2B (same samples per step, same order). That holds only if each micro-batch's summed loss
is divided by the trained tokens of the whole step (`num_items_in_batch`). Dividing by each
micro-batch's own count instead (passing None to the loss) over-weights the tokens of short
samples and, as transformers does not rescale a `compute_loss_func` loss, doubles the step's loss
and gradient. No error follows, only a silently different run.

How: samples of very different lengths (1 to ~40 trained tokens), constant learning rate, no
dropout, no length grouping, fp32; each run's logged per-step losses, gradient norms and final
adapter weights must agree within 1e-5 between the two layouts, for each loss path training uses:

- `packed`: rows of packed samples, the labelled-only loss (`labelled_loss`),
- `padded`: `packing: false`; the tiny llama still uses `labelled_loss`,
- `plain_head`: the plain shifted loss (`causal_lm_loss` through `compute_loss_func`), which
  training uses only for models whose logits are not a plain linear head (`supports_labelled_loss`
  false, e.g. remote-code models); forced here on the tiny llama, as no tiny architecture of
  `tunelab.demo.build` takes that path.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import from_dict
from tunelab.data.encode import Encoder
from tunelab.train import trainer as trainer_module
from tunelab.train.run import train

WORDS = "the sky is blue and paris is the capital of france while four follows three".split()
B = 3
STEPS = 3


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """24 records whose answers range from one word to forty, in a shuffled order."""
    lengths = [1, 40, 2, 25, 1, 3, 33, 1, 12, 2, 38, 5, 1, 20, 2, 30, 1, 8, 40, 2, 15, 1, 27, 3]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {n} words, please ({i})."},
                {"role": "assistant", "content": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))},
            ]
        }
        for i, n in enumerate(lengths)
    ]
    path = tmp_path_factory.mktemp("accumulation") / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_data_makes_per_micro_batch_normalisation_visible(uneven_data, tokenizer):
    from tunelab.infer.generate import read_cases

    counts = [Encoder(tokenizer).encode(c.conversation).n_trained for c in read_cases(uneven_data)]
    assert max(counts) > 8 * min(counts), counts


def _run(tmp_path, model, data, name, accumulation, batch, **kw):
    cfg = dict(
        model=model,
        dataset=data,
        output_dir=str(tmp_path / name),
        max_steps=STEPS,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        logging_steps=1,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        lora_dropout=0.0,
        group_by_length=False,
        save_steps=1000,
        seed=3,
        **kw,
    )
    return train(from_dict(cfg))


def _series(result, key):
    return [m[key] for m in result.metrics if key in m and "eval_loss" not in m]


@pytest.mark.parametrize("layout", ["packed", "padded", "plain_head"])
def test_accumulating_two_batches_of_b_trains_like_one_batch_of_2b(
    layout, tmp_path, llama_dir, uneven_data, monkeypatch
):
    kw = {"packed": dict(packing=True), "padded": dict(packing=False), "plain_head": dict(packing=False)}[layout]
    if layout == "plain_head":
        monkeypatch.setattr(trainer_module, "supports_labelled_loss", lambda model: False)
    accumulated = _run(tmp_path, llama_dir, uneven_data, "ga2", 2, B, **kw)
    single = _run(tmp_path, llama_dir, uneven_data, "ga1", 1, 2 * B, **kw)
    for r in (accumulated, single):
        assert r.summary["global_step"] == STEPS
        assert r.summary["packing"] is kw["packing"]
        assert r.summary["labelled_loss"] is (layout != "plain_head")

    losses = [_series(r, "loss") for r in (accumulated, single)]
    assert len(losses[0]) == STEPS
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-5)
    norms = [_series(r, "grad_norm") for r in (accumulated, single)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5, abs=1e-5)

    a = load_file(accumulated.output_dir / "adapter_model.safetensors")
    b = load_file(single.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-5), key
