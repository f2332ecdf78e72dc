"""The training step, the loop every entry point shares, checkpoints, optimizers and distributed set-up."""
