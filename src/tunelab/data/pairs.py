"""Preference samples as batches: both completions of a pair in one forward, packed or padded.

A batch of B pairs holds 2B sequences, chosen ones first, then the rejected ones in the same order (KTO: the B
completions, then their B mismatched KL sequences). Packed, they share rows with restarting positions and the
loss learns which sequence each labelled position belongs to from `segments`; padded, each is a row.
"""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX, LOSS_POSITIONS, SEGMENTS, SEQUENCES, loss_positions
from .encode import Encoded
from .packing import best_fit

PAIRS = "tunelab_pairs"  # real pairs (or KTO examples) in the batch; 0 when a rank got only fillers
DESIRABLE = "tunelab_desirable"  # KTO: whether each completion is a desirable one
REF_LOGPS = "tunelab_ref_logps"  # precomputed reference log-probs, one per sequence


class PairDataset(torch.utils.data.Dataset):
    """Pair samples; index None is a filler (see train.trainer.WholeGlobalBatches), which the collator drops."""

    def __init__(self, samples: list, ref_logps: list[list[float]] | None = None):
        self.samples = samples
        self.ref_logps = ref_logps

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s.chosen.input_ids) + len(_second(s).input_ids) for s in self.samples]

    def __getitem__(self, i: int | None):
        if i is None:
            return None
        item = {"sample": self.samples[i]}
        if self.ref_logps is not None:
            item["ref"] = self.ref_logps[i]
        return item


def _second(sample) -> Encoded:
    """The sequence that goes in the batch's second half: the rejected completion, or KTO's KL sequence."""
    return sample.rejected if sample.rejected is not None else sample.kl


class PairCollator:
    """Collates pairs into one batch of 2B sequences; `capacity` packs them into rows of that many tokens."""

    def __init__(self, pad_token_id: int, capacity: int | None = None, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.capacity = capacity
        self.flatten = flatten

    def __call__(self, batch: list) -> dict:
        items = [b for b in batch if b is not None]
        real = len(items)
        if not items:  # a rank's share of fillers: one empty pair keeps its forward in step with the others
            empty = Encoded([self.pad_token_id], [IGNORE_INDEX])
            items = [{"sample": _Empty(empty)}]
        samples = [b["sample"] for b in items]
        sequences = [s.chosen for s in samples] + [_second(s) for s in samples]
        out = self._packed(sequences) if self.capacity else self._padded(sequences)
        out[SEQUENCES] = len(sequences)
        out[PAIRS] = real
        if samples[0].label is not None:
            out[DESIRABLE] = torch.tensor([bool(s.label) for s in samples])
        if items[0].get("ref") is not None:
            out[REF_LOGPS] = torch.tensor([b["ref"][0] for b in items] + [b["ref"][1] for b in items])
        return out

    def _padded(self, sequences: list[Encoded]) -> dict:
        width = max(len(s.input_ids) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, s in enumerate(sequences):
            n = len(s.input_ids)
            ids[row, :n] = torch.tensor(s.input_ids)
            labels[row, :n] = torch.tensor(s.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, LOSS_POSITIONS: loss_positions(labels)}

    def _packed(self, sequences: list[Encoded]) -> dict:
        lengths = [len(s.input_ids) for s in sequences]
        capacity = max(self.capacity or 0, *lengths)
        bins = [list(range(len(sequences)))] if self.flatten else best_fit(lengths, capacity)
        width = max(sum(lengths[i] for i in b) for b in bins)
        ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        owner = torch.full((len(bins), width), -1, dtype=torch.long)
        positions = torch.arange(width).repeat(len(bins), 1)
        for row, members in enumerate(bins):
            at = 0
            for i in members:
                s, n = sequences[i], lengths[i]
                ids[row, at : at + n] = torch.tensor(s.input_ids)
                labels[row, at + 1 : at + n] = torch.tensor(s.labels[1:])  # never predicted from the previous one
                owner[row, at : at + n] = i
                positions[row, at : at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(width - at)
        flat = loss_positions(labels)
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            LOSS_POSITIONS: flat,
            SEGMENTS: owner.reshape(-1)[flat + 1],
        }


class _Empty:
    def __init__(self, empty: Encoded):
        self.chosen = self.rejected = empty
        self.kl = None
        self.label = None
