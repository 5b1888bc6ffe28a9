"""Shared Flax linen building blocks used by every family."""
