"""Evaluation: sample-quality metrics (the embedded digit metric; FID lives in its own module)."""
