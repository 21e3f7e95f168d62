"""Training: model building, optimizer, sharded train state and step, checkpoints, FLOP accounting."""
