"""Family-agnostic training: optimizer, train state, jitted step, checkpoints, loop."""
