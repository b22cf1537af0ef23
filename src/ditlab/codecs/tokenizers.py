"""Conv autoencoder tokenizers: small learned alternatives to the SD-VAE for 28x28 data.

- conv1: one patch-2 layer. Encoder Conv2d(k=2, s=2) maps each 2x2 patch to a token of
  dimension 4/8/16; decoder ConvTranspose2d(k=2, s=2) maps it back. 28x28 -> 14x14 tokens.
- conv2: 4x4 patches through two stride-2 convs with a SiLU between (token dim 16/32/64),
  mirrored decoder. 28x28 -> 7x7 tokens.

Both implement the `Codec` interface (ditlab.codecs), so a DiT trains on their token
grids exactly as on SD-VAE latents: point `vae.path` at the tokenizer file. Latents are
normalised per channel with the mean/std measured on the training images after training, so
the diffusion model sees ~unit-variance inputs.

    ditlab train-tokenizer --kind conv2 --token-dim 16 --data mnist-embedded --steps 2000 --out runs/tok

Training lives in `ditlab.train.tokenizer`, the command in `ditlab.commands.train_tokenizer`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.codecs.base import TOKENIZER_FORMAT_KEY, Codec

# kind -> (spatial downsampling, allowed token dims)
TOKENIZER_KINDS: dict[str, tuple[int, tuple[int, ...]]] = {
    "conv1": (2, (4, 8, 16)),
    "conv2": (4, (16, 32, 64)),
}
FILE_NAME = "tokenizer.safetensors"


class ConvTokenizer(Codec):
    """A conv autoencoder tokenizer; `encoder`/`decoder` are trained, `latent_mean/std` measured."""

    def __init__(self, kind: str = "conv2", token_dim: int = 16, in_channels: int = 1, hidden: int = 64):
        super().__init__()
        if kind not in TOKENIZER_KINDS:
            raise DitlabError(f"unknown tokenizer kind '{kind}' (choose {', '.join(TOKENIZER_KINDS)})")
        if token_dim < 1 or in_channels < 1 or hidden < 1:
            raise DitlabError(f"tokenizer sizes must be positive (token_dim={token_dim}, in_channels={in_channels}, hidden={hidden})")
        self.kind, self.token_dim, self.hidden = kind, token_dim, hidden
        self.image_channels = in_channels
        self.latent_channels = token_dim
        self.downsample = TOKENIZER_KINDS[kind][0]
        if kind == "conv1":
            self.encoder = nn.Conv2d(in_channels, token_dim, kernel_size=2, stride=2)
            self.decoder = nn.ConvTranspose2d(token_dim, in_channels, kernel_size=2, stride=2)
        else:
            self.encoder = nn.Sequential(
                nn.Conv2d(in_channels, hidden, kernel_size=2, stride=2),
                nn.SiLU(),
                nn.Conv2d(hidden, token_dim, kernel_size=2, stride=2),
            )
            self.decoder = nn.Sequential(
                nn.ConvTranspose2d(token_dim, hidden, kernel_size=2, stride=2),
                nn.SiLU(),
                nn.ConvTranspose2d(hidden, in_channels, kernel_size=2, stride=2),
            )
        # Per-channel normalisation of the raw encoder output (set by `fit_normalisation`).
        self.register_buffer("latent_mean", torch.zeros(token_dim))
        self.register_buffer("latent_std", torch.ones(token_dim))

    @property
    def scale_factor(self) -> float:  # summary of the per-channel scales, for logs
        return float(1.0 / self.latent_std.mean())

    def reconstruct(self, x: Tensor) -> Tensor:
        """decoder(encoder(x)) with gradients: what training minimises the MSE of."""
        return self.decoder(self.encoder(x))

    def _norm(self) -> tuple[Tensor, Tensor]:
        return self.latent_mean.view(1, -1, 1, 1), self.latent_std.view(1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check_images(x)
        mean, std = self._norm()
        return ((self.encoder(x) - mean) / std).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.token_dim:
            raise DitlabError(f"tokenizer decodes [B, {self.token_dim}, h, w] latents, got shape {tuple(z.shape)}")
        mean, std = self._norm()
        return self.decoder(z.to(std.dtype) * std + mean).float()

    @torch.no_grad()
    def fit_normalisation(self, images: Tensor, batch_size: int = 500) -> None:
        """Set latent_mean/std to the per-channel statistics of the raw tokens of `images`."""
        feats = torch.cat([self.encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        flat = feats.transpose(0, 1).reshape(self.token_dim, -1)
        self.latent_mean.copy_(flat.mean(1))
        self.latent_std.copy_(flat.std(1).clamp_min(1e-5))

    def metadata(self) -> dict[str, str]:
        return {
            TOKENIZER_FORMAT_KEY: "1",
            "kind": self.kind,
            "token_dim": str(self.token_dim),
            "in_channels": str(self.image_channels),
            "hidden": str(self.hidden),
            "downsample": str(self.downsample),
        }


# ----------------------------------------------------------------------------- files


def save_tokenizer(tok: ConvTokenizer, path: str | Path, extra: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
    save_file(tensors, str(path), metadata={**tok.metadata(), **(extra or {})})


def load_tokenizer(path: str | Path) -> ConvTokenizer:
    """A tokenizer written by `save_tokenizer` (or a directory holding tokenizer.safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise DitlabError(f"tokenizer file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DitlabError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if TOKENIZER_FORMAT_KEY not in meta:
        raise DitlabError(f"{path} is not a ditlab tokenizer (no '{TOKENIZER_FORMAT_KEY}' metadata)")
    try:
        tok = ConvTokenizer(meta["kind"], int(meta["token_dim"]), int(meta["in_channels"]), int(meta["hidden"]))
    except (KeyError, ValueError) as e:
        raise DitlabError(f"tokenizer {path} has incomplete metadata ({e})") from None
    missing, unexpected = tok.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DitlabError(f"tokenizer {path} does not match its metadata: missing {missing}, unexpected {unexpected}")
    return tok.eval()


# ----------------------------------------------------------------------------- metrics


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB over all pixels: 10 log10(range^2 / MSE); range 2 for images in [-1, 1]."""
    mse = F.mse_loss(x.double(), ref.double()).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


@torch.no_grad()
def clipped_reconstructions(tok: ConvTokenizer, images: Tensor, batch_size: int = 500) -> Tensor:
    """The reconstructions of `images` clipped to [-1, 1] (the images a DiT sample would show)."""
    was_training = tok.training
    tok.eval()
    recon = torch.cat([tok.reconstruct(images[i : i + batch_size]).clamp(-1, 1) for i in range(0, len(images), batch_size)])
    tok.train(was_training)
    return recon


def evaluate_psnr(tok: ConvTokenizer, images: Tensor, batch_size: int = 500) -> float:
    """PSNR of the clipped reconstructions of `images`."""
    return psnr(clipped_reconstructions(tok, images, batch_size), images)
