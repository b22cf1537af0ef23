"""The latent interface: one `Codec` for the SD-VAE and for ditlab's conv tokenizers.

A latent diffusion run (DiT paper, sec. 3.1; LDM) trains the model on `codec.encode(images)`
and decodes its samples with `codec.decode(latents)`. Latents come out already multiplied by
the codec's scale factor (0.18215 for the SD-VAE, a measured 1/std for a tokenizer), so the
diffusion model sees roughly unit-variance inputs and never needs to know which codec it is.

    codec = load_codec(cfg.vae)                       # None for pixel-space runs
    c, h, w = latent_shape(codec, cfg.data.image_size, 1)
    z = codec.encode(x)                               # x in [-1, 1], [B, C, H, W]
    x_hat = codec.decode(z)                           # back to [-1, 1] images

Weights are read only from local files, never from a model hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError

if TYPE_CHECKING:
    from ditlab.config import VAEConfig

# Key in a tokenizer's safetensors metadata that marks the file as a ditlab tokenizer.
TOKENIZER_FORMAT_KEY = "ditlab_tokenizer"


class Codec(nn.Module):
    """Images in [-1, 1] <-> scaled latents.

    Attributes: `image_channels` (channels of the images it encodes), `latent_channels`,
    `downsample` (spatial factor: an HxW image gives H/downsample x W/downsample latents),
    `scale_factor` (multiplied into the latents by `encode`, divided out by `decode`).
    """

    image_channels: int
    latent_channels: int
    downsample: int
    scale_factor: float

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise DitlabError(
                f"{type(self).__name__} encodes [B, {self.image_channels}, H, W] images, got shape {tuple(x.shape)}"
            )
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise DitlabError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the codec's downsampling factor {self.downsample}"
            )


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


def _is_tokenizer_file(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return TOKENIZER_FORMAT_KEY in (f.metadata() or {})
    except Exception as e:  # unreadable or not a safetensors file
        raise DitlabError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_autoencoder_kl(path: Path) -> nn.Module:
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


def load_codec(vae_cfg: "VAEConfig", device: torch.device | str | None = None) -> Codec | None:
    """The codec a run's `vae` section names, or None for pixel space (`vae.path` unset).

    `vae.path` may be a diffusers AutoencoderKL directory, a single AutoencoderKL weights file,
    or a tokenizer written by `ditlab train-tokenizer` (a .safetensors file carrying ditlab
    metadata; its own stored scale is used, not `vae.scale_factor`).
    """
    if vae_cfg.path is None or str(vae_cfg.path) == "":
        return None
    path = Path(vae_cfg.path).expanduser()
    if not path.exists():
        raise DitlabError(f"VAE/tokenizer path not found: {path}")
    if path.is_dir() and not (path / "config.json").exists() and (path / "tokenizer.safetensors").is_file():
        path = path / "tokenizer.safetensors"  # a `ditlab train-tokenizer --out` directory
    if path.is_file() and _is_tokenizer_file(path):
        from ditlab.models.tokenizers import load_tokenizer

        codec: Codec = load_tokenizer(path)
    else:
        sample_posterior = getattr(vae_cfg, "sample_posterior", True)
        codec = SDVAECodec(_load_autoencoder_kl(path), vae_cfg.scale_factor, sample_posterior=sample_posterior)
    codec.eval()
    return codec.to(device) if device is not None else codec


def latent_shape(codec: Codec | None, image_size: int, in_channels: int) -> tuple[int, int, int]:
    """(C, H, W) the diffusion model sees for `image_size` images with `in_channels` channels.

    Pixel space (codec None): the images themselves. With a codec: its latent grid, after
    checking the images fit it. Use it to set `model.in_channels` / `model.input_size`.
    """
    if codec is None:
        return (in_channels, image_size, image_size)
    if in_channels != codec.image_channels:
        raise DitlabError(
            f"the data has {in_channels} channel(s) but the VAE/tokenizer encodes {codec.image_channels}-channel images"
        )
    if image_size % codec.downsample:
        raise DitlabError(
            f"image size {image_size} is not divisible by the VAE/tokenizer downsampling factor {codec.downsample}"
        )
    side = image_size // codec.downsample
    return (codec.latent_channels, side, side)
