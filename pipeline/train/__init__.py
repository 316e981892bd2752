"""Training the GQ-VAE with TDC: config, the Ray-free training step, the Ray Train loop, data, checkpoints
and validation."""
