"""Padding-free packing: several samples share a row, `position_ids` restart at each sample.

transformers turns restarting `position_ids` (with no attention mask and no cache) into a
block-diagonal causal mask for sdpa/eager, and into varlen kernels for FlashAttention, so no token
attends across samples. The first label of every sample is masked: unpacked, a shifted loss never
predicts position 0, and packed it would be predicted from the previous sample's last token.
"""

from __future__ import annotations

import bisect

import torch

from .encode import IGNORE, Encoded


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


def pack_row(samples: list[Encoded]) -> dict:
    ids, labels, positions = [], [], []
    for s in samples:
        ids += s.input_ids
        labels += [IGNORE] + s.labels[1:]
        positions += range(len(s.input_ids))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class PackedDataset(torch.utils.data.Dataset):
    """Rows of at most `capacity` tokens, each holding whole samples."""

    def __init__(self, samples: list[Encoded], capacity: int):
        self.rows = [[samples[i] for i in b] for b in best_fit([len(s.input_ids) for s in samples], capacity)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return pack_row(self.rows[i])


class PackCollator:
    """Rows padded to the widest; `flatten` puts the whole batch in one row (FlashAttention varlen).

    Padding at a row's end gets positions restarting at 0, so it is a block of its own that no real
    token attends to, and -100 labels.
    """

    def __init__(self, pad_token_id: int, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.flatten = flatten

    def __call__(self, batch: list[dict]) -> dict:
        if self.flatten:
            batch = [{k: sum((b[k] for b in batch), []) for k in ("input_ids", "labels", "position_ids")}]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        positions = torch.arange(width).repeat(len(batch), 1)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            positions[row, :n] = torch.tensor(b["position_ids"])
            positions[row, n:] = torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
