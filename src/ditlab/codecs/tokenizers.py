"""Conv autoencoder tokenizers: small learned alternatives to the SD-VAE for 28x28 data.

- conv1: one patch-2 layer. Encoder Conv2d(k=2, s=2) maps each 2x2 patch to a token of
  dimension 4/8/16; decoder ConvTranspose2d(k=2, s=2) maps it back. 28x28 -> 14x14 tokens.
- conv2: 4x4 patches through two stride-2 convs with a SiLU between (token dim 16/32/64),
  mirrored decoder. 28x28 -> 7x7 tokens.

Both implement the `Codec` interface (ditlab.models.codec), so a DiT trains on their token
grids exactly as on SD-VAE latents: point `vae.path` at the tokenizer file. Latents are
normalised per channel with the mean/std measured on the training images after training, so
the diffusion model sees ~unit-variance inputs.

    ditlab train-tokenizer --kind conv2 --token-dim 16 --data mnist-embedded --steps 2000 --out runs/tok
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.models.codec import TOKENIZER_FORMAT_KEY, Codec

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


# ----------------------------------------------------------------------------- metrics and training


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB over all pixels: 10 log10(range^2 / MSE); range 2 for images in [-1, 1]."""
    mse = F.mse_loss(x.double(), ref.double()).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


@torch.no_grad()
def evaluate_psnr(tok: ConvTokenizer, images: Tensor, batch_size: int = 500) -> float:
    """PSNR of the clipped reconstructions of `images` (the images a DiT sample would show)."""
    was_training = tok.training
    tok.eval()
    recon = torch.cat([tok.reconstruct(images[i : i + batch_size]).clamp(-1, 1) for i in range(0, len(images), batch_size)])
    tok.train(was_training)
    return psnr(recon, images)


def train_tokenizer(
    tok: ConvTokenizer,
    images: Tensor,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 5e-3,
    generator: torch.Generator | None = None,
    log_every: int = 0,
) -> list[float]:
    """Minimise the reconstruction MSE with Adam and a cosine-decayed lr; returns the loss per step."""
    device = next(tok.parameters()).device
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    tok.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x = images[idx].to(device)
        loss = F.mse_loss(tok.reconstruct(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  mse {loss.item():.5f}  ({time.time() - t0:.0f}s)", flush=True)
    tok.eval()
    return losses


# ----------------------------------------------------------------------------- data


def load_images(source: str, path: str | None, split: str) -> Tensor:
    """All images of a split as one float tensor [N, C, H, W] in [-1, 1], via `ditlab.data`.

    The embedded 5,000-image MNIST sample has no test split: every 10th image (50 per class)
    is held out as "test" and the other 4,500 are "train".
    """
    from ditlab.config import Config
    from ditlab.data import build_dataset

    if source not in ("mnist-embedded", "mnist", "fashion-mnist"):
        raise DitlabError(f"train-tokenizer reads mnist-embedded, mnist or fashion-mnist, not '{source}'")
    cfg = Config()
    cfg.data.source, cfg.data.path, cfg.data.split = source, path, split
    ds = build_dataset(cfg)
    images = ds.images.float().div(127.5).sub(1.0)  # uint8 -> [-1, 1], as ds[i] does
    if source == "mnist-embedded":
        test = torch.arange(len(images)) % 10 == 0
        images = images[test] if split == "test" else images[~test]
    return images


# ----------------------------------------------------------------------------- command


def _writable_dir(out: Path) -> Path:
    """Create the output directory and check it takes files, before any training time is spent."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".ditlab_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DitlabError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=list(TOKENIZER_KINDS), default="conv2", help="conv1: 2x2 patches; conv2: 4x4 patches")
    parser.add_argument("--token-dim", type=int, default=16, help="channels per token (conv1: 4/8/16, conv2: 16/32/64)")
    parser.add_argument("--hidden", type=int, default=64, help="conv2 hidden width")
    parser.add_argument("--data", default="mnist-embedded", help="mnist-embedded | mnist | fashion-mnist")
    parser.add_argument("--data-path", default=None, help="dataset directory (default $DITLAB_DATA/<data>)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output directory (writes tokenizer.safetensors, metrics.json)")


def run(args: argparse.Namespace) -> int:
    dims = TOKENIZER_KINDS[args.kind][1]
    if args.token_dim not in dims:
        raise DitlabError(f"--token-dim {args.token_dim} is not offered for {args.kind} (choose {', '.join(map(str, dims))})")
    if args.steps < 1 or args.batch_size < 1:
        raise DitlabError("--steps and --batch-size must be positive")
    out = _writable_dir(Path(args.out))  # fail now, not after the training run
    torch.manual_seed(args.seed)
    train = load_images(args.data, args.data_path, "train")
    test = load_images(args.data, args.data_path, "test")
    side = train.shape[-1]
    down = TOKENIZER_KINDS[args.kind][0]
    if side % down:
        raise DitlabError(f"image size {side} is not divisible by the {args.kind} patch size {down}")
    tok = ConvTokenizer(args.kind, args.token_dim, in_channels=train.shape[1], hidden=args.hidden).to(args.device)
    print(f"training {args.kind} tokenizer (token dim {args.token_dim}, {side // down}x{side // down} tokens) "
          f"on {len(train)} {args.data} images, {args.steps} steps", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    losses = train_tokenizer(tok, train, args.steps, batch_size=args.batch_size, lr=args.lr, generator=gen,
                             log_every=max(args.steps // 10, 1))
    seconds = time.time() - t0
    test_dev, train_dev = test.to(args.device), train.to(args.device)
    tok.fit_normalisation(train_dev)
    metrics = {
        "kind": args.kind,
        "token_dim": args.token_dim,
        "data": args.data,
        "steps": args.steps,
        "train_images": len(train),
        "test_images": len(test),
        "train_psnr": evaluate_psnr(tok, train_dev[:5000]),
        "test_psnr": evaluate_psnr(tok, test_dev),
        "final_train_mse": float(np.mean(losses[-50:])),
        "latent_shape": [args.token_dim, side // down, side // down],
        "train_seconds": round(seconds, 1),
    }
    try:
        save_tokenizer(tok.cpu(), out / FILE_NAME, extra={"data": args.data, "steps": str(args.steps),
                                                         "test_psnr": f"{metrics['test_psnr']:.3f}"})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    except OSError as e:
        raise DitlabError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"test PSNR {metrics['test_psnr']:.2f} dB on {len(test)} held-out images "
          f"(train {metrics['train_psnr']:.2f} dB); wrote {out / FILE_NAME}")
    print(f"use it with: vae.path={out / FILE_NAME} model.in_channels={args.token_dim} model.input_size={side // down}")
    return 0
