"""Datasets: every image source yields (x float32 [C, H, W], y int64) with pixels in [-1, 1] (or latents).

Sources (`data.source`):
- `mnist-embedded`: 5,000 MNIST training digits that ship with ditlab (offline quickstart).
- `mnist`, `fashion-mnist`: the standard IDX .gz files in `data.path` or `$DITLAB_DATA/<source>`.
- `folder`: class-per-subfolder images (ImageNet layout), ADM centre crop; flat folder if unconditional.
- `latents`: shards written by `ditlab extract-latents` (train latent DiT without running the VAE).
- `text`: a byte corpus (`data.path`, default $DITLAB_DATA/text/gcide.txt.gz), split `data.split`, as
  windows (x, y) int64 [model.lm_seq_len] of bytes and the bytes that follow (byte language models).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ditlab.config import Config
from ditlab.data import mnist
from ditlab.data.folder import ImageFolder
from ditlab.data.latents import LatentsDataset
from ditlab.data.text import ByteCorpus, TextWindows
from ditlab.errors import DitlabError

SOURCES = ("mnist-embedded", "mnist", "fashion-mnist", "folder", "latents", "text")


def _check_mnist_size(cfg: Config) -> None:
    if cfg.data.image_size != 28:
        raise DitlabError(f"data.source={cfg.data.source} has 28x28 images but data.image_size is {cfg.data.image_size}")


def build_dataset(cfg: Config) -> Dataset:
    """The dataset `cfg.data` names; an image dataset has `num_classes` (classes present in the data)."""
    source = cfg.data.source
    if source == "mnist-embedded":
        _check_mnist_size(cfg)
        return mnist.ImageTensorDataset(*mnist.load_embedded_mnist(), num_classes=10)
    if source in ("mnist", "fashion-mnist"):
        _check_mnist_size(cfg)
        root = Path(cfg.data.path) if cfg.data.path else mnist.default_dir(source)
        return mnist.ImageTensorDataset(*mnist.load_idx_dataset(root, cfg.data.split), num_classes=10)
    if source == "folder":
        if not cfg.data.path:
            raise DitlabError("data.source=folder needs data.path (a folder with one subfolder per class)")
        channels = 3 if cfg.vae.path else cfg.model.in_channels
        return ImageFolder(cfg.data.path, cfg.data.image_size, channels=channels, num_classes=cfg.model.num_classes)
    if source == "latents":
        if not cfg.data.path:
            raise DitlabError("data.source=latents needs data.path (a directory written by ditlab extract-latents)")
        return LatentsDataset(cfg.data.path, use_flip=cfg.data.random_flip)
    if source == "text":
        return TextWindows(ByteCorpus(cfg.data.path, cfg.data.split), cfg.model.lm_seq_len)
    raise DitlabError(f"unknown data.source '{source}' (choose one of: {', '.join(SOURCES)})")
