"""Sequence log-probs for preference training and its evaluation, and the reference they are measured against.

The reference of a LoRA run is its own base with the adapters switched off: the same weights already in
memory, so DPO costs no second model. A full fine-tuning run keeps a frozen copy, or none at all when the
reference's log-probs were computed before training (`precompute_ref`).
"""

from __future__ import annotations

import contextlib

import torch

from ..constants import LOSS_POSITIONS, SEGMENTS, SEQUENCES
from .loss import install_labelled_forward


def sequence_logps(
    model, input_ids, attention_mask=None, labels=None, position_ids=None, positions=None, segments=None, sequences=None
):
    """(summed log-prob, token count) per sequence of the labelled (completion) tokens, shifted as a causal LM
    predicts them. Runs as the model's own forward (see `install_labelled_forward`), so autocast and every
    engine's hooks apply."""
    install_labelled_forward(model)
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
        inputs["use_cache"] = False
    out = model(
        **inputs,
        tunelab_labels=labels,
        tunelab_positions=positions,
        tunelab_segments=segments,
        tunelab_sequences=labels.shape[0] if sequences is None else int(sequences),
    )
    return out.logps, out.tokens


def batch_logps(model, batch: dict):
    """`sequence_logps` of a collated preference batch (see `data.pairs`)."""
    return sequence_logps(
        model,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch["labels"],
        batch.get("position_ids"),
        batch.get(LOSS_POSITIONS),
        batch.get(SEGMENTS),
        batch.get(SEQUENCES),
    )


def is_lora(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_off(model):
    """The base model, for as long as the block runs: peft's own switch, on the model under any wrapper."""
    inner = model
    while not is_lora(inner) and hasattr(inner, "module"):
        inner = inner.module
    if not is_lora(inner):
        raise ValueError("adapters_off needs a LoRA (peft) model")
    with inner.disable_adapter():
        yield


def reference_logps(model, batch: dict, reference=None):
    """The reference's log-probs of the batch, without gradients: `reference` when given (a frozen copy), else
    `model` with its adapters off."""
    with torch.no_grad():
        if reference is not None:
            return batch_logps(reference, batch)
        with adapters_off(model):
            return batch_logps(model, batch)
