"""Data: files -> records -> conversations -> token ids with their label mask."""
