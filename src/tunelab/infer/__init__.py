"""Inference on a run folder: prompts rendered with the saved template, stopping on the saved stop ids."""
