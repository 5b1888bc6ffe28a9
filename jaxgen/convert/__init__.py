"""Checkpoint conversion: torch-free readers of official weight files and one key map per family."""
