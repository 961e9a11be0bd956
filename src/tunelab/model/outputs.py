"""What tunelab's own forward modes return, as `ModelOutput`s so every wrapper (DDP, FSDP, DeepSpeed) passes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class SequenceLogps(ModelOutput):
    """Per sequence: the summed log-prob of its labelled tokens, and how many there are."""

    logps: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
