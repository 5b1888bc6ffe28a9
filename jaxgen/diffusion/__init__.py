"""Gaussian diffusion (MAR's DiffLoss process) and the DiffLoss objective / sampler."""
from jaxgen.diffusion.gaussian import GaussianDiffusion, create_diffusion, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "space_timesteps"]
