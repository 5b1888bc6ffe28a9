"""jaxgen: MAR, VAR, RAR and MaskGIT/AutoNAT image generators in JAX/Flax.

Layers, bottom to top: kernels -> nn, diffusion -> tokenizers -> families -> train/data/parallel/eval -> main.
Lower layers never import higher ones.
"""
from jaxgen.utils.xla_cpu import apply_defaults as _xla_cpu_defaults

__version__ = "0.1.0"

_xla_cpu_defaults()  # XLA reads XLA_FLAGS when jax creates its CPU client, i.e. after this import
