"""Padding-free batches: a batch's samples share rows, `position_ids` restart at each sample.

transformers turns restarting `position_ids` (with no attention mask and no cache) into a
block-diagonal causal mask for sdpa/eager, and into varlen kernels for FlashAttention, so no token
attends across samples. The first label of every sample is masked: unpacked, a shifted loss never
predicts position 0, and packed it would be predicted from the previous sample's last token.
"""

from __future__ import annotations

import bisect

import torch

from ..constants import IGNORE_INDEX, LOSS_POSITIONS, loss_positions
from .encode import Encoded


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes to the fullest bin it still fits in."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return bins


# Architectures whose masks transformers derives from restarting position_ids (tested in
# tests/data/test_packing.py); remote code and multimodal models are packed only if asked.
PACKABLE = {
    "llama",
    "mistral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "starcoder2",
    "smollm3",
    "glm4",
}


def packing_is_exact(model) -> bool:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    return (
        type(lm).__module__.startswith("transformers.")
        and getattr(config, "model_type", None) in PACKABLE
        and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager", "flash_attention_2")
    )


def pack_row(samples: list[Encoded]) -> dict:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        ids += s.input_ids
        labels += [IGNORE_INDEX] + s.labels[1:]
        positions += range(len(s.input_ids))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class PackCollator:
    """Packs each batch's samples into as few rows of `capacity` tokens as best-fit allows.

    The batch keeps its samples, so steps, learning-rate schedules and the loss normaliser are
    exactly those of an unpacked run: packing changes the layout, never the optimisation. Row tails
    are padded with a block of their own (positions restarting at 0, labels -100) that no real token
    attends to; `flatten` puts the whole batch in one row instead (FlashAttention varlen).
    """

    def __init__(self, pad_token_id: int, capacity: int, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.capacity = capacity
        self.flatten = flatten

    def __call__(self, batch: list[dict]) -> dict:
        samples = [Encoded(b["input_ids"], b["labels"]) for b in batch]
        lengths = [len(s.input_ids) for s in samples]
        bins = [list(range(len(samples)))] if self.flatten else best_fit(lengths, max(self.capacity, *lengths))
        rows = [pack_row([samples[i] for i in b]) for b in bins]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[row, :n] = torch.tensor(r["input_ids"])
            labels[row, :n] = torch.tensor(r["labels"])
            positions[row, :n] = torch.tensor(r["position_ids"])
            positions[row, n:] = torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions, LOSS_POSITIONS: loss_positions(labels)}
