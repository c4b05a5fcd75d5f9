"""Training: the strategy, data, networks, the training loop, checkpoints and the export."""
