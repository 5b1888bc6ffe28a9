"""jaxgen: MAR, VAR, RAR and MaskGIT/AutoNAT image generators in JAX/Flax.

Layers, bottom to top: nn, diffusion -> tokenizers -> families -> train/data/parallel/eval -> main.
Lower layers never import higher ones.
"""
from jaxgen.utils.xla_cpu import memory_ordered_scheduler as _memory_ordered_scheduler

__version__ = "0.1.0"

_memory_ordered_scheduler()  # XLA reads XLA_FLAGS when jax creates its CPU client, i.e. after this import
