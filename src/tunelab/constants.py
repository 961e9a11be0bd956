"""Facts every stage shares, kept below all of them so that imports run one way."""

import torch

# The label of a position that is never trained: transformers', PyTorch's and every peer's convention.
IGNORE_INDEX = -100

# The batch key under which collators hand the loss its positions (see `loss_positions`).
LOSS_POSITIONS = "tunelab_loss_positions"


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (row * width + column) of the positions whose next token is labelled.

    Collators compute them on the host, before the batch moves to the GPU: the loss then gathers hidden
    states with an index whose length is already known, where a boolean mask on the device would make
    the host wait for the GPU at every micro-step. Their count is the step's trained tokens, for free.
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


# Preference batches (see data.pairs): each labelled position's sequence when rows are packed, and how many
# sequences a batch holds.
SEGMENTS = "tunelab_segments"
SEQUENCES = "tunelab_sequences"
