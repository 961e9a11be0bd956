"""Preference losses as pure tensor math on per-sequence log-probs: no model is called here.

Every loss takes summed completion log-probs and token counts (`Logps`), so one forward of the policy (and one
of the reference, or none) serves all of them, and each formula can be checked by hand and against TRL
(tests/model/test_pref_trl.py holds tunelab's loss and gradients to TRL 1.16's within 1e-5).

Notation: for a pair (x, y_w, y_l), log pi(y|x) is the summed log-prob of the completion tokens, |y| their count,
and the DPO margin is

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)].

Losses are means over the pairs (KTO: examples) of the micro-batch. The SFT term, weighted by `ftx` (pref_ftx) for
every loss and always present (weight 1) in ORPO, is the negative log-likelihood of the chosen completions per
token over the micro-batch, -sum log pi(y_w|x) / sum |y_w|, the way TRL's DPO `sft` loss and CPO/ORPO's NLL
average it (one long answer counts as much as its tokens, not as one pair).

Metrics follow the trainer each loss comes from in TRL, so curves compare: rewards are beta times the log-ratio to
the reference (DPO family, KTO), or beta times the length-averaged log-prob (ORPO, SimPO, which have no
reference); `logps/*` are what the loss scores (summed, or averaged for ORPO and SimPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PREF_LOSSES as PAIR_LOSSES  # the config's choices are exactly the losses here
from ..config import REFERENCE_FREE

# ORPO's log(1 - p) is -inf at p = 1: an answer the model is certain of (avg log-prob 0.0 in fp32) would make the
# loss NaN. Log-probs above this are scored as this, so a saturated answer costs a finite loss.
_LOG1MEXP_CEILING = -1e-7


@dataclass
class Logps:
    """Per pair, shape (B,): the summed log-probs of the chosen and rejected completion tokens, and their counts."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def averages(self) -> tuple[Tensor, Tensor]:
        """Per-token mean log-probs; an empty completion (a filler pair) averages to 0, not NaN."""
        return _average(self.chosen, self.chosen_tokens), _average(self.rejected, self.rejected_tokens)


def _average(total: Tensor, tokens: Tensor) -> Tensor:
    return total / tokens.to(total.dtype).clamp(min=1.0)


def sft_term(policy: Logps) -> Tensor:
    """NLL of the chosen completions per token over the micro-batch (TRL's DPO `sft` loss and CPO/ORPO's NLL)."""
    return -policy.chosen.sum() / policy.chosen_tokens.to(policy.chosen.dtype).sum().clamp(min=1.0)


def sigmoid_loss(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290):

        L = -log sigmoid(beta * h)

    the Bradley-Terry likelihood of the preference under the reward implied by the policy/reference ratio, so no
    reward model is trained. With label_smoothing eps > 0 it is conservative DPO (Mitchell 2023, "A note on DPO with
    noisy preferences"), the expected loss when each label is flipped with probability eps:

        L = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
    """
    logits = beta * margin
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(chosen_ratio: Tensor, rejected_ratio: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, beta: float):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, eq. 17), with beta as the paper's tau:

        L = (h_avg - 1 / (2 * beta))^2,   h_avg = ratio(y_w) / |y_w| - ratio(y_l) / |y_l|

    A squared regression to a fixed margin, so the policy cannot push the margin to infinity as DPO can on
    deterministic preferences. Each log-ratio is divided by its completion length, as TRL does (confirmed with the
    IPO authors): summed log-ratios would make the target margin depend on answer length.
    """
    delta = _average(chosen_ratio, chosen_tokens) - _average(rejected_ratio, rejected_tokens)
    return (delta - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(margin: Tensor, beta: float) -> Tensor:
    """Hinge loss of SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425) on the reference-normalised margin, as RSO (Liu et al. 2024, arXiv:2309.06657) uses it:

        L = max(0, 1 - beta * h)

    Pairs already separated by 1/beta stop contributing, unlike DPO's loss, which never reaches zero.
    """
    return torch.relu(1.0 - beta * margin)


def robust_loss(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv:2403.00409, eq. 7), with label_smoothing eps the assumed rate of flipped labels, eps in [0, 0.5):

        L = [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps),   l(h) = -log sigmoid(beta * h)

    Unlike conservative DPO, this is an unbiased estimate of the clean-label loss, so its minimiser does not move
    towards indifference as eps grows.
    """
    logits = beta * margin
    clean = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -log 2 where each one loses precision."""
    x = x.clamp(max=_LOG1MEXP_CEILING)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691, eqs. 4-7), from per-token average log-probs a = log pi(y|x) / |y|:

        odds(y) = p / (1 - p),  p = exp(a)
        L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),  log odds = a - log(1 - exp(a))
        L = L_SFT + beta * L_OR        (beta is the paper's lambda)

    The SFT term is what keeps ORPO without a reference model: the NLL on the chosen answers anchors the policy,
    and the odds ratio only penalises the rejected style. Returns (L_OR per pair, log-odds ratio per pair).
    The NLL covers the chosen completions (the paper's L_SFT); TRL's ORPOTrainer also scores the prompt tokens.
    """
    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -F.logsigmoid(log_odds), log_odds


def simpo_loss(
    chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
) -> Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, eq. 6), on per-token average log-probs a = log pi(y|x) / |y|:

        L = -log sigmoid(beta * (a_w - a_l) - gamma)

    The average log-prob is the quantity generation ranks by, so the implicit reward matches inference and no
    reference model is needed; gamma is a target margin, and averaging removes DPO's pull towards long answers.
    label_smoothing smooths it as conservative DPO does (TRL's CPOTrainer does the same).
    """
    return sigmoid_loss(chosen_avg - rejected_avg - gamma / beta, beta, label_smoothing)


def pair_loss(
    kind: str,
    policy: Logps,
    ref: Logps | None,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    ftx: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss of the micro-batch, detached metrics) of a paired loss `kind` (one of PAIR_LOSSES).

    `ref` is required by sigmoid, ipo, hinge and robust, and ignored by orpo and simpo. The loss is the mean over
    pairs plus `ftx` x the SFT term (see the module docstring); ORPO adds its own SFT term on top at weight 1.
    """
    if kind not in PAIR_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; expected one of {PAIR_LOSSES}")
    metrics: dict[str, Tensor] = {}
    if kind in REFERENCE_FREE:
        chosen_avg, rejected_avg = policy.averages()
        chosen_score, rejected_score = chosen_avg, rejected_avg  # rewards and logps/* both use the averages
        logged_chosen, logged_rejected = chosen_avg, rejected_avg
        if kind == "orpo":
            odds_loss, log_odds = orpo_loss(chosen_avg, rejected_avg)
            nll = sft_term(policy)
            loss = nll + beta * odds_loss.mean()
            metrics["nll_loss"] = nll.detach()
            metrics["log_odds_ratio"] = (-odds_loss).detach().mean()
            metrics["log_odds_chosen"] = log_odds.detach().mean()
        else:
            loss = simpo_loss(chosen_avg, rejected_avg, beta, simpo_gamma, label_smoothing).mean()
    else:
        if ref is None:
            raise ValueError(f"preference loss {kind!r} needs the reference model's log-probs")
        chosen_score = policy.chosen - ref.chosen
        rejected_score = policy.rejected - ref.rejected
        margin = chosen_score - rejected_score
        if kind == "sigmoid":
            per_pair = sigmoid_loss(margin, beta, label_smoothing)
        elif kind == "ipo":
            per_pair = ipo_loss(chosen_score, rejected_score, policy.chosen_tokens, policy.rejected_tokens, beta)
        elif kind == "hinge":
            per_pair = hinge_loss(margin, beta)
        else:
            per_pair = robust_loss(margin, beta, label_smoothing)
        loss = per_pair.mean()
        logged_chosen, logged_rejected = policy.chosen, policy.rejected
    if ftx:
        loss = loss + ftx * sft_term(policy)

    chosen_rewards = beta * chosen_score.detach()
    rejected_rewards = beta * rejected_score.detach()
    metrics.update(
        {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": logged_chosen.detach().mean(),
            "logps/rejected": logged_rejected.detach().mean(),
        }
    )
    return loss, metrics


def kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)), with each y' a
    completion of another example of the batch (a mismatched pair), so it estimates KL(pi || ref) on unrelated
    answers: how far the policy moved in general, not on this answer. Detached, as in the paper and TRL: it is a
    baseline, and its gradient would be the gradient of a KL term the loss does not intend. TRL averages over
    every rank before the clamp; this is one process's share.
    """
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    chosen_weight: float,
    rejected_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306,
    eq. 7), per completion y with r = log pi(y|x) - log ref(y|x) and z0 = `kl` (see `kl_estimate`):

        L = w_d * (1 - sigmoid(beta * (r - z0)))   if y is desirable
        L = w_u * (1 - sigmoid(beta * (z0 - r)))   if not

    A Kahneman-Tversky value function of the implied reward around the reference point z0: it needs only a
    thumbs up or down per answer, not pairs. w_d, w_u (kto_chosen_weight, kto_rejected_weight) rebalance unequal
    numbers of each; the paper suggests w_d n_d / (w_u n_u) in [1, 4/3]. The loss is the mean over all examples.

    Metrics are TRL KTOTrainer's: rewards and logps averaged within each group, their margin, and the KL estimate.
    A group absent from the micro-batch has no mean, so its keys (and the margin) are left out, as TRL does.
    """
    desirable = desirable.to(device=logps.device, dtype=torch.bool)
    ratio = logps - ref_logps
    kl = kl.to(ratio)
    losses = torch.where(
        desirable,
        chosen_weight * (1.0 - torch.sigmoid(beta * (ratio - kl))),
        rejected_weight * (1.0 - torch.sigmoid(beta * (kl - ratio))),
    )
    loss = losses.mean()

    rewards = beta * ratio.detach()
    metrics: dict[str, Tensor] = {"kl": kl.detach()}
    for name, group in (("chosen", desirable), ("rejected", ~desirable)):
        if group.any():
            metrics[f"rewards/{name}"] = rewards[group].mean()
            metrics[f"logps/{name}"] = logps.detach()[group].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
