"""`pure_bf16`: weights, gradients and AdamW states in bf16, without losing the small updates.

Why: a bf16 weight of about 0.02 has a spacing of 2**-13 (1.2e-4); an AdamW update at lr 1e-5 is a
tenth of that and rounds to nothing with round-to-nearest, so a pure-bf16 run with torch's AdamW
barely trains. Stochastic rounding keeps each stored value right on average, so many small updates
add up as in fp32. That is what the memory saving of `pure_bf16` must not cost.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.train.optim import StochasticAdamW, stochastic_round_


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not():
    value = 1 + 2**-10  # between the bf16 neighbours 1 and 1 + 2**-7, an eighth of the way up
    src = torch.full((200_000,), value)
    dst = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(dst, src)
    assert set(dst.float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert dst.double().mean().item() == pytest.approx(value, abs=2e-5)
    assert src.to(torch.bfloat16).double().mean().item() == 1.0, "nearest rounding loses the eighth"
    negative = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(negative, -src)
    assert negative.double().mean().item() == pytest.approx(-value, abs=2e-5)
    special = torch.tensor([float("inf"), float("-inf"), 0.0])
    out = torch.empty(3, dtype=torch.bfloat16)
    stochastic_round_(out, special)
    assert out.float().tolist() == special.tolist()


@pytest.mark.parametrize("chunk", [1 << 22, 100])  # 100: the 2,048 elements are updated in slices
def test_on_fp32_weights_it_is_torch_adamw(chunk, monkeypatch):
    from tunelab.train import optim

    monkeypatch.setattr(optim, "CHUNK", chunk)
    torch.manual_seed(0)
    ours, theirs = torch.randn(64, 32, requires_grad=True), None
    theirs = ours.detach().clone().requires_grad_()
    a = StochasticAdamW([ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(64, 32)
        for p, opt in ((ours, a), (theirs, b)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _drift(optimizer_cls, steps=200, lr=1e-5):
    """Mean signed displacement of bf16 weights ~ N(0, 0.02) after `steps` steps of a fixed gradient."""
    torch.manual_seed(1)
    start = torch.randn(4096) * 0.02
    weight = start.to(torch.bfloat16).requires_grad_()
    opt = optimizer_cls([weight], lr=lr, weight_decay=0.0)
    direction = torch.randn(4096).sign()
    for _ in range(steps):
        weight.grad = direction.to(torch.bfloat16)
        opt.step()
    return ((weight.detach().double() - start.to(torch.bfloat16).double()) * -direction.double()).mean().item()


def test_small_updates_add_up_in_bf16_as_in_fp32():
    expected = 200 * 1e-5  # Adam's step on a constant-sign gradient is lr per step
    assert _drift(StochasticAdamW) == pytest.approx(expected, rel=0.05)
    assert _drift(torch.optim.AdamW) < 0.5 * expected, "torch's AdamW on bf16 rounds most of them away"


def test_a_pure_bf16_run_keeps_everything_in_bf16_and_trains(run_config, caplog, monkeypatch):
    from tunelab.train.run import train

    steps = []
    real_step = StochasticAdamW.step
    monkeypatch.setattr(StochasticAdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    with caplog.at_level("WARNING", logger="tunelab"):
        result = train(
            run_config(
                finetuning_type="full",
                pure_bf16=True,
                max_steps=6,
                learning_rate=1e-3,
                lr_scheduler_type="constant",
                logging_steps=1,
            )
        )
    params = list(result.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert len(steps) == 6, "every step went through the stochastic-rounding AdamW"
    assert any("pure_bf16" in r.message and "stochastic" in r.message for r in caplog.records)
    assert any("pure_bf16" in q for q in result.summary["quirks"])
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0]


def test_pure_bf16_lora_trains_bf16_adapters(run_config):
    from tunelab.train.run import train

    result = train(run_config(pure_bf16=True, max_steps=1))
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)


@pytest.mark.parametrize(
    "keys, named",
    [
        (dict(pure_bf16=True, fp16=True), "pure_bf16"),
        (dict(pure_bf16=True, bf16=False), "pure_bf16"),
        (dict(pure_bf16=True, optim="adamw_8bit"), "optim"),
    ],
)
def test_pure_bf16_conflicts_are_named(run_config, keys, named):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=named):
        run_config(**keys)
