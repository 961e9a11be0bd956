"""AdamW for weights kept in bf16 (`pure_bf16`): each update is rounded stochastically, not to nearest.

A bf16 weight carries 8 bits of mantissa, so an update under half its spacing (about 0.4% of the
weight) rounds to nothing, and fine-tuning updates are mostly that small: with round-to-nearest a
run at lr 1e-5 barely moves. Rounding up or down at random, with probabilities set by the distance
to each neighbour, leaves every stored weight right on average, so many small updates add up as
they would in fp32. The moments are stored in bf16 the same way; that, with no fp32 master copy,
is the memory saved. The arithmetic of a step runs in fp32, a slice of one parameter at a time.
"""

from __future__ import annotations

import math

import torch

# Elements updated at once: the fp32 working copies of a step stay near 150 MiB even for a 152k x 3.5k
# embedding, which whole would need about 15 GiB of them.
CHUNK = 1 << 22


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Store fp32 `src` in `dst`; into bf16 by stochastic rounding (unbiased), else as a plain copy."""
    if dst.dtype != torch.bfloat16:
        dst.copy_(src)
        return
    src = src.float().contiguous()
    bits = src.view(torch.int32)
    # bf16 keeps the top 16 bits of an fp32: adding uniform noise below them before cutting rounds the
    # magnitude up with probability equal to the cut-off fraction (sign and magnitude are separate bits)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    dst.copy_(torch.where(torch.isfinite(src), rounded, src))


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose stored tensors may be bf16."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                flat = [x.view(-1) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), CHUNK):
                    self._update(*(x[start : start + CHUNK] for x in flat), group, beta1, beta2, t)
        return loss

    @staticmethod
    def _update(p, grad, exp_avg_stored, exp_avg_sq_stored, group, beta1, beta2, t) -> None:
        grad = grad.float()
        exp_avg = exp_avg_stored.float().lerp_(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq_stored.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        weight = p.float()
        if group["weight_decay"]:
            weight.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**t))
        stochastic_round_(p, weight)
        stochastic_round_(exp_avg_stored, exp_avg)
        stochastic_round_(exp_avg_sq_stored, exp_avg_sq)
