"""Training: Trainer with tunelab's loss, callbacks that leave metrics and plots, and the run recipe."""
