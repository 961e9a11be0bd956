"""tunelab's preference losses give TRL's loss and TRL's gradients, for every loss, through TRL's own trainers.

Each case builds TRL's trainer (DPOTrainer, KTOTrainer, and the experimental ORPOTrainer and CPOTrainer) around a
tiny fp32 Llama, batches three pairs of different prompt and completion lengths with TRL's own collator, and
calls its `compute_loss`. tunelab scores the same token ids with `sequence_logps` on an identical copy of the
model and its own right-padded rows, and `pair_loss` / `kto_loss` turn them into a loss. Both losses are backpropagated
and every parameter's gradient compared, so a slip in what a formula differentiates (a detached KL, a missing
length normalisation) shows even when the values agree. The reference is a frozen copy of the model before a
small perturbation, so the log-ratios, and the loss's dependence on the reference, are not zero.

Which tokens are scored: DPOTrainer, KTOTrainer and CPOTrainer score exactly the completion tokens, as tunelab does;
completions end with EOS here because TRL's dataset preparation appends it. ORPOTrainer's NLL differs (see its test).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tunelab.demo.build import tiny_config
from tunelab.model.pref_losses import Logps, kl_estimate, kto_loss, pair_loss
from tunelab.model.preference import sequence_logps

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.fast

TOL = 1e-5
# (prompt, chosen, rejected): prompts and completions of different lengths, so padding and length
# normalisation both matter
TEXTS = [
    ("What is the capital of France? Answer briefly.", "Paris.", "It is Berlin, a city in Germany."),
    ("Two plus two?", "Four, since two and two make four.", "Five."),
    ("Name a colour of the sky on a clear day.", "Blue, mostly.", "Green, always green."),
]
DESIRABLE = [True, False, True]  # KTO: both groups present, unequal in size


@pytest.fixture(autouse=True)
def _keep_rng():
    """The trainers seed every generator (set_seed); later tests get back the state they would have had."""
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


@pytest.fixture(scope="module")
def tok(tokenizer):
    tok = copy.deepcopy(tokenizer)  # TRL sets a pad token; the session's tokenizer stays as it is
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def weights(tok):
    """(policy, reference) state dicts: the reference is a random tiny Llama, the policy that plus a little noise."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=len(tok), hidden=32, layers=2, heads=4)
    config.pad_token_id = config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return config, policy.state_dict(), ref.state_dict()


def _model(weights, which: int):
    from transformers import AutoModelForCausalLM

    config, *states = weights
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").float()
    model.load_state_dict(states[which])
    return model.train()


def _pairs(tok, prompt_tokens: int | None = None) -> list[dict]:
    """Token ids per pair; completions end with EOS as TRL's dataset preparation appends it.
    prompt_tokens: cut every prompt to its first that many tokens."""
    eos = [tok.eos_token_id]
    out = []
    for prompt, chosen, rejected in TEXTS:
        ids = tok(prompt, add_special_tokens=False).input_ids
        out.append(
            {
                "prompt_ids": ids[:prompt_tokens] if prompt_tokens else ids,
                "chosen_ids": tok(" " + chosen, add_special_tokens=False).input_ids + eos,
                "rejected_ids": tok(" " + rejected, add_special_tokens=False).input_ids + eos,
            }
        )
    return out


def _rows(tok, sequences: list[tuple[list[int], list[int]]]):
    """tunelab's padded batch of (prompt, completion) sequences: right-padded rows, labels on the completion only."""
    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), width), tok.pad_token_id)
    labels = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        ids[row, :n] = torch.tensor(prompt + completion)
        labels[row, len(prompt) : n] = torch.tensor(completion)
        mask[row, :n] = 1
    return ids, mask, labels


def _tunelab_logps(tok, weights, sequences, roles=(0, 1)):
    """(policy model, policy logps, policy tokens, reference logps) of the sequences."""
    policy, ref = _model(weights, roles[0]), _model(weights, roles[1]).requires_grad_(False)
    ids, mask, labels = _rows(tok, sequences)
    logps, tokens = sequence_logps(policy, ids, mask, labels)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, ids, mask, labels)
    return policy, logps, tokens, ref_logps


def _tunelab_pair(tok, weights, pairs, kind, beta, zero_ref=False, **kw):
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [
        (p["prompt_ids"], p["rejected_ids"]) for p in pairs
    ]
    policy, logps, tokens, ref_logps = _tunelab_logps(tok, weights, sequences)
    b = len(pairs)
    if zero_ref:
        ref_logps = torch.zeros_like(ref_logps)
    loss, metrics = pair_loss(
        kind,
        Logps(logps[:b], logps[b:], tokens[:b], tokens[b:]),
        Logps(ref_logps[:b], ref_logps[b:], tokens[:b], tokens[b:]),
        beta,
        **kw,
    )
    loss.backward()
    return loss.detach(), _grads(policy), metrics


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _args(config_cls, tmp_path, **kw):
    # TRL turns checkpointing on by default; transformers 5 renamed the key (the old one still works, with a warning)
    names = {f.name for f in dataclasses.fields(config_cls)}
    kw["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    return config_cls(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=len(TEXTS),
        save_strategy="no",
        **kw,
    )


def _text_dataset():
    """What TRL's constructors require and tokenize; the compared batch is built from `_pairs` ids instead."""
    return datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TEXTS])


def _trl_dpo(tok, weights, tmp_path, pairs, **config):
    """DPOTrainer's loss, gradients and logged metrics; a frozen reference copy is passed as ref_model."""
    policy = _model(weights, 0)
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=_model(weights, 1),
        args=_args(trl.DPOConfig, tmp_path, max_length=None, **config),
        train_dataset=_text_dataset(),
        processing_class=tok,
    )
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(pairs))
    loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), _grads(policy), logged


def _experimental(name: str):
    """ORPOTrainer/CPOTrainer and their configs: in trl.experimental since TRL 1.0."""
    module = pytest.importorskip(f"trl.experimental.{name.lower()}")
    return getattr(module, f"{name}Trainer"), getattr(module, f"{name}Config")


def _trl_paired_experimental(name, tok, weights, tmp_path, pairs, **config):
    """ORPOTrainer's or CPOTrainer's loss on the pairs, batched by their own DPODataCollatorWithPadding."""
    trainer_cls, config_cls = _experimental(name)
    policy = _model(weights, 0)
    trainer = trainer_cls(
        model=policy,
        args=_args(config_cls, tmp_path, max_length=512, remove_unused_columns=False, **config),
        train_dataset=_text_dataset(),
        processing_class=tok,
    )
    features = []
    for p in pairs:
        row = {"prompt_input_ids": p["prompt_ids"], "prompt_attention_mask": [1] * len(p["prompt_ids"])}
        for side in ("chosen", "rejected"):
            completion = p[f"{side}_ids"]
            row[f"{side}_input_ids"] = p["prompt_ids"] + completion
            row[f"{side}_attention_mask"] = [1] * (len(p["prompt_ids"]) + len(completion))
            row[f"{side}_labels"] = [-100] * len(p["prompt_ids"]) + completion
        features.append(row)
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(features))
    loss.backward()
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    return loss.detach(), _grads(policy), logged


def _assert_same(case, ours, theirs, metric_names=()):
    (loss, grads, metrics), (trl_loss, trl_grads, trl_metrics) = ours, theirs
    assert grads and grads.keys() == trl_grads.keys()
    loss_diff = (loss - trl_loss).abs().item()
    grad_diff = max((grads[n] - trl_grads[n]).abs().max().item() for n in grads)
    print(f"{case}: loss {loss.item():.6f} |dloss| {loss_diff:.2e} max|dgrad| {grad_diff:.2e}")
    assert loss_diff <= TOL, (case, loss.item(), trl_loss.item())
    assert grad_diff <= TOL, case
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3, "gradients too small to compare"
    for name in metric_names:
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=TOL), (case, name)


PAIRED_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)

# tunelab kind, its keys, TRL DPOConfig keys selecting the same loss
DPO_CASES = {
    "sigmoid": ("sigmoid", dict(beta=0.1), dict(loss_type=["sigmoid"], beta=0.1)),
    "ipo": ("ipo", dict(beta=0.1), dict(loss_type=["ipo"], beta=0.1)),
    "hinge": ("hinge", dict(beta=0.1), dict(loss_type=["hinge"], beta=0.1)),
    "robust": (
        "robust",
        dict(beta=0.1, label_smoothing=0.2),
        dict(loss_type=["robust"], beta=0.1, label_smoothing=0.2),
    ),
    # pref_ftx: TRL's DPO adds its "sft" loss (chosen NLL per token) at weight loss_weights[1]
    "sigmoid+ftx": (
        "sigmoid",
        dict(beta=0.1, ftx=0.7),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], beta=0.1),
    ),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_family_equals_trl_dpo_trainer(case, tok, weights, tmp_path):
    kind, ours, theirs = DPO_CASES[case]
    pairs = _pairs(tok)
    _assert_same(
        case,
        _tunelab_pair(tok, weights, pairs, kind, **ours),
        _trl_dpo(tok, weights, tmp_path, pairs, **theirs),
        PAIRED_METRICS,
    )


def test_conservative_dpo_equals_trl_cpo_sigmoid(tok, weights, tmp_path):
    """sigmoid with label_smoothing (conservative DPO). TRL 1.16's DPOTrainer dropped label smoothing from its
    sigmoid loss; CPOTrainer's sigmoid keeps that exact form on policy log-prob differences, which is DPO's with
    a reference whose log-probs are all zero. So tunelab gets a zero reference here, and cpo_alpha=0 leaves out
    CPO's NLL term."""
    pairs = _pairs(tok)
    _assert_same(
        "sigmoid+label_smoothing",
        _tunelab_pair(tok, weights, pairs, "sigmoid", beta=0.05, label_smoothing=0.2, zero_ref=True),
        _trl_paired_experimental(
            "CPO", tok, weights, tmp_path, pairs, loss_type="sigmoid", beta=0.05, label_smoothing=0.2, cpo_alpha=0.0
        ),
        PAIRED_METRICS,
    )


SIMPO_CASES = {
    # SimPO is CPO with loss_type="simpo"; cpo_alpha=0 drops CPO's NLL term, as the SimPO paper has none
    "simpo": (dict(beta=2.0, simpo_gamma=0.5), dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    # CPO's NLL term is the chosen completions' NLL per token, i.e. tunelab's SFT term: cpo_alpha plays pref_ftx
    "simpo+ftx+label_smoothing": (
        dict(beta=2.0, simpo_gamma=0.3, ftx=0.7, label_smoothing=0.1),
        dict(beta=2.0, simpo_gamma=0.3, cpo_alpha=0.7, label_smoothing=0.1),
    ),
}


@pytest.mark.parametrize("case", list(SIMPO_CASES))
def test_simpo_equals_trl_cpo_simpo(case, tok, weights, tmp_path):
    ours, theirs = SIMPO_CASES[case]
    pairs = _pairs(tok)
    _assert_same(
        case,
        _tunelab_pair(tok, weights, pairs, "simpo", **ours),
        _trl_paired_experimental("CPO", tok, weights, tmp_path, pairs, loss_type="simpo", **theirs),
        PAIRED_METRICS,
    )


def test_orpo_equals_trl_orpo_trainer(tok, weights, tmp_path):
    """ORPO. TRL's ORPOTrainer computes its NLL term over every attended token of the chosen sequence, prompt
    included, where tunelab (like the paper's L_SFT and LLaMA-Factory) takes the completion only. With one-token
    prompts the two score the same tokens, as the first token is never predicted; completion lengths still differ.
    The odds-ratio term is over completion tokens in both."""
    pairs = _pairs(tok, prompt_tokens=1)
    _assert_same(
        "orpo",
        _tunelab_pair(tok, weights, pairs, "orpo", beta=0.25),
        _trl_paired_experimental("ORPO", tok, weights, tmp_path, pairs, beta=0.25),
        PAIRED_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
    )


# (policy, reference) roles of the two weight sets: with the noisy model as policy its log-probs of the mismatched
# answers fall, the KL estimate clamps to 0; swapped, they rise and the estimate enters the loss
KTO_CASES = {"kto": (1, 0), "kto(kl clamped to 0)": (0, 1)}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_equals_trl_kto_trainer(case, tok, weights, tmp_path):
    """KTO with its KL estimate from mismatched pairs: example i's prompt with example i-1's completion, the
    rotation KTOTrainer's dataset preparation makes. tunelab's batch holds the completions then the KL sequences,
    as its collator lays them out."""
    roles = KTO_CASES[case]
    pairs = _pairs(tok)
    completions = [p["chosen_ids"] if good else p["rejected_ids"] for p, good in zip(pairs, DESIRABLE)]
    kl_completions = completions[-1:] + completions[:-1]
    examples = [
        {"prompt_ids": p["prompt_ids"], "completion_ids": c, "KL_completion_ids": k, "label": good}
        for p, c, k, good in zip(pairs, completions, kl_completions, DESIRABLE)
    ]
    beta, chosen_weight, rejected_weight = 0.5, 1.0, 1.3

    sequences = [(e["prompt_ids"], e["completion_ids"]) for e in examples]
    sequences += [(e["prompt_ids"], e["KL_completion_ids"]) for e in examples]
    policy, logps, _, ref_logps = _tunelab_logps(tok, weights, sequences, roles)
    b = len(examples)
    kl = kl_estimate(logps[b:].detach(), ref_logps[b:])
    loss, metrics = kto_loss(
        logps[:b], ref_logps[:b], torch.tensor(DESIRABLE), kl, beta, chosen_weight, rejected_weight
    )
    loss.backward()
    assert (kl.item() > 0.1) == (case == "kto"), kl

    trl_policy = _model(weights, roles[0])
    trainer = trl.KTOTrainer(
        model=trl_policy,
        ref_model=_model(weights, roles[1]),
        args=_args(
            trl.KTOConfig,
            tmp_path,
            max_length=None,
            loss_type="kto",
            beta=beta,
            desirable_weight=chosen_weight,
            undesirable_weight=rejected_weight,
        ),
        train_dataset=datasets.Dataset.from_list(
            [{"prompt": p, "completion": c, "label": good} for (p, c, _), good in zip(TEXTS, DESIRABLE)]
        ),
        processing_class=tok,
    )
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    _assert_same(
        case,
        (loss.detach(), _grads(policy), metrics),
        (trl_loss.detach(), _grads(trl_policy), logged),
        ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"),
    )
