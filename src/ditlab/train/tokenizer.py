"""Training a conv tokenizer: reconstruction MSE with Adam on in-memory images."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ditlab.codecs.tokenizers import TOKENIZER_KINDS, ConvTokenizer
from ditlab.config import Config
from ditlab.data import build_dataset
from ditlab.errors import DitlabError


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


def load_images(source: str, path: str | None, split: str) -> Tensor:
    """All images of a split as one float tensor [N, C, H, W] in [-1, 1], via `ditlab.data`.

    The embedded 5,000-image MNIST sample has no test split: every 10th image (50 per class)
    is held out as "test" and the other 4,500 are "train".
    """
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


def fit_tokenizer(
    kind: str,
    token_dim: int,
    source: str,
    path: str | None,
    steps: int,
    *,
    hidden: int = 64,
    batch_size: int = 128,
    lr: float = 5e-3,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 0,
) -> tuple[ConvTokenizer, Tensor, Tensor, list[float]]:
    """Train a tokenizer on a dataset's train split, then fit its latent normalisation there.

    Returns the tokenizer (on `device`, in eval mode), the train and test images (on the CPU) and
    the loss per step. The seed fixes the initial weights and the batches.
    """
    torch.manual_seed(seed)
    train = load_images(source, path, "train")
    test = load_images(source, path, "test")
    side, down = train.shape[-1], TOKENIZER_KINDS[kind][0]
    if side % down:
        raise DitlabError(f"image size {side} is not divisible by the {kind} patch size {down}")
    tok = ConvTokenizer(kind, token_dim, in_channels=train.shape[1], hidden=hidden).to(device)
    if log_every:
        print(f"training {kind} tokenizer (token dim {token_dim}, {side // down}x{side // down} tokens) "
              f"on {len(train)} {source} images, {steps} steps", flush=True)
    losses = train_tokenizer(tok, train, steps, batch_size=batch_size, lr=lr,
                             generator=torch.Generator().manual_seed(seed), log_every=log_every)
    tok.fit_normalisation(train.to(device))
    return tok, train, test, losses
