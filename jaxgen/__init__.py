"""jaxgen: MAR, VAR, RAR and MaskGIT/AutoNAT image generators in JAX/Flax.

Layers, bottom to top: nn, diffusion -> tokenizers -> families -> train/data/parallel/eval -> main.
Lower layers never import higher ones.
"""
__version__ = "0.1.0"
