"""Preference losses on hand-picked log-probs whose loss is known in closed form, and the properties every loss
must keep: swapping chosen and rejected flips the margins, beta scales once, reference-free losses ignore the
reference, an empty (filler) pair stays finite."""

import math

import pytest
import torch

from tunelab.model.pref_losses import PAIR_LOSSES, REFERENCE_FREE, Logps, kl_estimate, kto_loss, pair_loss

pytestmark = pytest.mark.fast


def softplus(x: float) -> float:
    """-log sigmoid(-x)"""
    return math.log1p(math.exp(x))


def logps(chosen, rejected, chosen_tokens=None, rejected_tokens=None, grad=False) -> Logps:
    chosen, rejected = torch.tensor(chosen, requires_grad=grad), torch.tensor(rejected, requires_grad=grad)
    n_chosen = torch.tensor(chosen_tokens if chosen_tokens is not None else [1.0] * len(chosen))
    n_rejected = torch.tensor(rejected_tokens if rejected_tokens is not None else [1.0] * len(rejected))
    return Logps(chosen, rejected, n_chosen, n_rejected)


# one pair with DPO margin h = (-1 - -2) - (-3 - -2) = 2
POLICY = logps([-1.0], [-3.0])
REF = logps([-2.0], [-2.0])


def test_sigmoid_is_dpo():
    loss, m = pair_loss("sigmoid", POLICY, REF, beta=0.5)
    assert loss.item() == pytest.approx(softplus(-1.0))  # -log sigmoid(0.5 * 2)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(1.0)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -3.0


def test_sigmoid_label_smoothing_is_conservative_dpo():
    loss, _ = pair_loss("sigmoid", POLICY, REF, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))


def test_robust_is_unbiased_for_flipped_labels():
    loss, _ = pair_loss("robust", POLICY, REF, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx((0.9 * softplus(-1.0) - 0.1 * softplus(1.0)) / 0.8)
    plain, _ = pair_loss("sigmoid", POLICY, REF, beta=0.5)
    assert pair_loss("robust", POLICY, REF, beta=0.5)[0].item() == pytest.approx(plain.item())


def test_hinge_stops_at_the_margin():
    assert pair_loss("hinge", POLICY, REF, beta=0.25)[0].item() == pytest.approx(0.5)  # 1 - 0.25 * 2
    policy = logps([-1.0], [-3.0], grad=True)
    loss, _ = pair_loss("hinge", policy, REF, beta=1.0)  # 1 - 2 < 0: separated, no push
    loss.backward()
    assert loss.item() == 0.0 and policy.chosen.grad.item() == 0.0


def test_ipo_normalises_log_ratios_by_length():
    # log-ratios 1 over 2 tokens and -1 over 4: h_avg = 0.5 + 0.25; target 1 / (2 * 0.5) = 1
    policy = logps([-1.0], [-3.0], [2.0], [4.0])
    loss, m = pair_loss("ipo", policy, REF, beta=0.5)
    assert loss.item() == pytest.approx((0.75 - 1.0) ** 2)
    assert m["rewards/margins"].item() == pytest.approx(1.0)  # rewards stay beta x summed log-ratio, as TRL logs


def test_orpo_is_nll_plus_lambda_log_odds_ratio():
    # per-token averages log 0.5 (odds 1) and log 0.2 (odds 1/4): log odds ratio log 4, L_OR = log(1 + 1/4)
    policy = logps([2 * math.log(0.5)], [3 * math.log(0.2)], [2.0], [3.0])
    loss, m = pair_loss("orpo", policy, None, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), rel=1e-6)
    assert m["nll_loss"].item() == pytest.approx(math.log(2))
    assert m["log_odds_chosen"].item() == pytest.approx(math.log(4), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5))  # beta x average log-prob
    assert m["logps/chosen"].item() == pytest.approx(math.log(0.5))


def test_orpo_nll_is_per_token_over_the_batch():
    # two pairs, chosen NLL 2 over 1 token and 4 over 3 tokens: 6 / 4 per token, not the mean of 2 and 4/3
    policy = logps([-2.0, -4.0], [-5.0, -5.0], [1.0, 3.0], [1.0, 1.0])
    assert pair_loss("orpo", policy, None, beta=0.1)[1]["nll_loss"].item() == pytest.approx(1.5)


def test_simpo_is_average_margin_minus_gamma():
    policy = logps([-3.0], [-4.0], [3.0], [2.0])  # averages -1 and -2
    loss, m = pair_loss("simpo", policy, None, beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(softplus(-(2.0 * 1.0 - 0.5)))
    assert m["rewards/margins"].item() == pytest.approx(2.0)


def test_ftx_adds_the_chosen_nll_per_token():
    policy = logps([-2.0, -4.0], [-5.0, -5.0], [1.0, 3.0], [2.0, 2.0])
    ref = logps([-2.5, -4.0], [-5.0, -4.0])
    for kind in PAIR_LOSSES:
        base, _ = pair_loss(kind, policy, ref, beta=0.1)
        with_sft, _ = pair_loss(kind, policy, ref, beta=0.1, ftx=0.5)
        assert with_sft.item() == pytest.approx(base.item() + 0.5 * 6.0 / 4.0), kind


@pytest.mark.parametrize("kind", PAIR_LOSSES)
def test_swapping_chosen_and_rejected_flips_the_margins(kind):
    policy = logps([-4.0, -9.0, -3.0], [-6.0, -7.0, -8.0], [2.0, 3.0, 4.0], [4.0, 2.0, 5.0])  # no ties
    ref = logps([-5.0, -8.0, -4.0], [-5.5, -8.0, -6.0])

    def swap(x: Logps) -> Logps:
        return Logps(x.rejected, x.chosen, x.rejected_tokens, x.chosen_tokens)

    _, m = pair_loss(kind, policy, ref, beta=0.3)
    _, swapped = pair_loss(kind, swap(policy), swap(ref), beta=0.3)
    assert m["rewards/margins"].item() != 0
    assert swapped["rewards/margins"].item() == pytest.approx(-m["rewards/margins"].item())
    assert swapped["rewards/chosen"].item() == pytest.approx(m["rewards/rejected"].item())
    assert swapped["rewards/accuracies"].item() == pytest.approx(1.0 - m["rewards/accuracies"].item())


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge"])
def test_beta_scales_the_margin_once(kind):
    """beta x margin enters once: beta 0.5 on margin 2 is beta 1 on margin 1, and rewards are beta x log-ratio."""
    half = logps([-1.0], [-2.0])
    loss, m = pair_loss(kind, POLICY, REF, beta=0.5, label_smoothing=0.1)
    same, _ = pair_loss(kind, half, logps([-1.5], [-1.5]), beta=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(same.item())
    assert m["rewards/margins"].item() == pytest.approx(0.5 * 2.0)


def test_beta_gradient_of_dpo():
    """d/d log pi(y_w) of -log sigmoid(beta h) is -beta sigmoid(-beta h), divided by the pairs averaged over."""
    policy = logps([-1.0, -1.0], [-3.0, -3.0], grad=True)
    loss, _ = pair_loss("sigmoid", policy, logps([-2.0, -2.0], [-2.0, -2.0]), beta=0.5)
    loss.backward()
    expected = -0.5 * (1 / (1 + math.e)) / 2
    assert policy.chosen.grad.tolist() == pytest.approx([expected, expected])
    assert policy.rejected.grad.tolist() == pytest.approx([-expected, -expected])


@pytest.mark.parametrize("kind", REFERENCE_FREE)
def test_reference_free_losses_ignore_the_reference(kind):
    policy = logps([-3.0, -5.0], [-4.0, -6.0], [3.0, 2.0], [2.0, 4.0])
    alone, m_alone = pair_loss(kind, policy, None, beta=0.5)
    other, m_other = pair_loss(kind, policy, logps([-100.0, 3.0], [7.0, -1.0]), beta=0.5)
    assert alone.item() == other.item()
    assert {k: v.item() for k, v in m_alone.items()} == {k: v.item() for k, v in m_other.items()}


@pytest.mark.parametrize("kind", sorted(set(PAIR_LOSSES) - set(REFERENCE_FREE)))
def test_reference_losses_need_a_reference(kind):
    with pytest.raises(ValueError, match="reference"):
        pair_loss(kind, POLICY, None, beta=0.1)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown preference loss"):
        pair_loss("dpo", POLICY, REF, beta=0.1)


@pytest.mark.parametrize("kind", PAIR_LOSSES)
def test_an_empty_filler_pair_stays_finite(kind):
    """A rank's filler pair has no labelled token: its loss is multiplied by 0, which only works if finite."""
    policy = logps([0.0], [0.0], [0.0], [0.0], grad=True)
    loss, metrics = pair_loss(kind, policy, logps([0.0], [0.0], [0.0], [0.0]), beta=0.1, ftx=0.5)
    (loss * 0.0).backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(policy.chosen.grad).all() and torch.isfinite(policy.rejected.grad).all()


def test_orpo_stays_finite_on_a_certain_answer():
    """An answer the model is sure of has average log-prob 0.0 in fp32, where log(1 - p) is -inf."""
    policy = logps([0.0], [-2.0], [3.0], [2.0], grad=True)
    loss, _ = pair_loss("orpo", policy, None, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.chosen.grad).all()


def test_kto_by_hand():
    # log-ratios 1 (desirable) and -1 (undesirable) around z0 = 0.5
    loss, m = kto_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-2.0, -3.0]),
        torch.tensor([True, False]),
        torch.tensor(0.5),
        beta=1.0,
        chosen_weight=2.0,
        rejected_weight=3.0,
    )

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    assert loss.item() == pytest.approx((2.0 * (1 - sigmoid(0.5)) + 3.0 * (1 - sigmoid(1.5))) / 2)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-1.0)
    assert m["rewards/margins"].item() == pytest.approx(2.0)
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -4.0
    assert m["kl"].item() == 0.5


def test_kto_beta_scales_the_shifted_ratio_once():
    """log-ratio 1 at beta 2 and log-ratio 2 at beta 1 are the same loss, 1 - sigmoid(2)."""
    ref, yes, no_kl = torch.tensor([-2.0]), torch.tensor([True]), torch.tensor(0.0)
    double_beta = kto_loss(torch.tensor([-1.0]), ref, yes, no_kl, 2.0, 1.0, 1.0)[0].item()
    double_ratio = kto_loss(torch.tensor([0.0]), ref, yes, no_kl, 1.0, 1.0, 1.0)[0].item()
    assert double_beta == pytest.approx(double_ratio) == pytest.approx(1 - 1 / (1 + math.exp(-2.0)))


def test_kto_without_one_group_leaves_its_metrics_out():
    _, m = kto_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]), torch.tensor([True, True]), torch.tensor(0.0), 0.1, 1, 1
    )
    assert set(m) == {"kl", "rewards/chosen", "logps/chosen"}


def test_kl_estimate_is_a_clamped_detached_mean():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl = kl_estimate(policy, torch.tensor([-3.0, -3.0]))
    assert kl.item() == pytest.approx(1.5) and not kl.requires_grad
    assert kl_estimate(torch.tensor([-4.0, -3.0]), torch.tensor([-3.0, -3.0])).item() == 0.0
