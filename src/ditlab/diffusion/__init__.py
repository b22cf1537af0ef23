"""The official DiT names: `from ditlab.diffusion import create_diffusion`, as in facebookresearch/DiT.

An alias of `ditlab.objectives.gaussian`, where the Gaussian diffusion port lives.
"""

from ditlab.objectives.gaussian import GaussianDiffusion, create_diffusion, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "space_timesteps"]
