"""Shared decoding: what every family's sampler is built from, and family-agnostic generation.

  schedules   mask schedules (MAR's cosine step table, MaskGIT-style mask-ratio functions)
  filtering   temperature, top-k / top-p, categorical draws
  guidance    the CFG mixing rule and per-step guidance-scale schedules (MAR linear, VAR ramp, RAR power-cosine)
  loop        a state pytree through one compiled step inside lax.fori_loop
  generate    labels -> uint8 images over the mesh (`Sampler`), samples.npz and class grids
"""
from jaxgen.sampling.generate import Sampler, class_grid, class_labels, generate, write_samples  # noqa: F401
