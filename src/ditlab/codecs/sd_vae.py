"""The SD-VAE (a diffusers `AutoencoderKL`) as a `Codec`, loaded from local files only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ditlab.codecs.base import Codec
from ditlab.errors import DitlabError


class SDVAECodec(Codec):
    """A diffusers `AutoencoderKL` (e.g. sd-vae-ft-mse/ema, as in the DiT paper).

    encode: z = scale * sample(q(z|x)) (or its mean with `sample_posterior=False`);
    decode: x = vae.decode(z / scale). The VAE stays frozen and runs without gradients.
    """

    def __init__(self, vae: nn.Module, scale_factor: float = 0.18215, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.image_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        # Each down block but the last halves the resolution (SD-VAE: 4 blocks -> factor 8).
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale_factor = float(scale_factor)
        self.sample_posterior = sample_posterior

    def train(self, mode: bool = True) -> "SDVAECodec":
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check_images(x)
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(x.to(dtype)).latent_dist
        z = dist.sample(generator=generator) if self.sample_posterior else dist.mean
        return (z * self.scale_factor).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((z / self.scale_factor).to(dtype)).sample.float()


def load_autoencoder_kl(path: Path) -> nn.Module:
    """AutoencoderKL from a local diffusers directory or a single weights file; no hub access."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DitlabError("loading a VAE needs diffusers: pip install 'ditlab[diffusers]'") from None
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise DitlabError(f"VAE directory {path} has no config.json (expected a diffusers AutoencoderKL saved with save_pretrained)")
            return AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
        # A single file needs a diffusers config: use a config.json beside it when there is one,
        # otherwise diffusers looks in the local Hugging Face cache only.
        config = str(path.parent) if (path.parent / "config.json").is_file() else None
        return AutoencoderKL.from_single_file(str(path), config=config, local_files_only=True, low_cpu_mem_usage=False)
    except DitlabError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if path.is_dir() else " (a single VAE file needs a diffusers config.json in the same directory)"
        raise DitlabError(f"cannot load VAE from {path}: {first}{hint}") from None
