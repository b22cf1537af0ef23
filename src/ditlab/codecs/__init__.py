"""Codecs: images <-> latents. The SD-VAE and ditlab's conv tokenizers share one interface.

    codec = load_codec(cfg.vae, device)     # None for pixel-space runs
    z = codec.encode(x); x_hat = codec.decode(z)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ditlab.codecs.base import TOKENIZER_FORMAT_KEY, Codec, latent_shape
from ditlab.codecs.sd_vae import SDVAECodec, load_autoencoder_kl
from ditlab.codecs.tokenizers import load_tokenizer
from ditlab.config import VAEConfig
from ditlab.errors import DitlabError

__all__ = ["Codec", "latent_shape", "load_codec"]


def _is_tokenizer_file(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return TOKENIZER_FORMAT_KEY in (f.metadata() or {})
    except Exception as e:  # unreadable or not a safetensors file
        raise DitlabError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_codec(vae_cfg: VAEConfig, device: torch.device | str | None = None) -> Codec | None:
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
        codec: Codec = load_tokenizer(path)
    else:
        codec = SDVAECodec(load_autoencoder_kl(path), vae_cfg.scale_factor, sample_posterior=vae_cfg.sample_posterior)
    codec.eval()
    return codec.to(device) if device is not None else codec
