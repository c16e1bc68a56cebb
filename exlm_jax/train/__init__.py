"""Training: state, optimizer, mesh/partitioning, jitted steps, checkpoints, the loop."""
