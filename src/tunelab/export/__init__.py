"""Merge adapters into standalone model folders, with proofs that nothing changed."""
