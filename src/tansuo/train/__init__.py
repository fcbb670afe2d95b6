"""Training: the loop, optimizer and schedule, checkpoints, device choice."""
