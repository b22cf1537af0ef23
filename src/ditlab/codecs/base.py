"""The latent interface: one `Codec` for the SD-VAE and for ditlab's conv tokenizers.

A latent diffusion run (DiT paper, sec. 3.1; LDM) trains the model on `codec.encode(images)`
and decodes its samples with `codec.decode(latents)`. Latents come out already multiplied by
the codec's scale factor (0.18215 for the SD-VAE, a measured 1/std for a tokenizer), so the
diffusion model sees roughly unit-variance inputs and never needs to know which codec it is.

    codec = load_codec(cfg.vae)                       # ditlab.codecs; None for pixel-space runs
    c, h, w = latent_shape(codec, cfg.data.image_size, 1)
    z = codec.encode(x)                               # x in [-1, 1], [B, C, H, W]
    x_hat = codec.decode(z)                           # back to [-1, 1] images

Weights are read only from local files, never from a model hub.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError

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
