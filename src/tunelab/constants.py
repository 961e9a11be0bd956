"""Facts every stage shares, kept below all of them so that imports run one way."""

# The label of a position that is never trained: transformers', PyTorch's and every peer's convention.
IGNORE_INDEX = -100
