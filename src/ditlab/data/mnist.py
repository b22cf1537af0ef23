"""MNIST-style data: the 5,000-image sample that ships with ditlab, and the standard IDX .gz files.

Both give uint8 images [N, 1, 28, 28] and int64 labels [N]; `ImageTensorDataset` turns them
into float32 images in [-1, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import os
import functools
import struct
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ditlab.errors import DitlabError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}


class ImageTensorDataset(Dataset):
    """uint8 images [N, C, H, W] + int64 labels -> (float32 image in [-1, 1], label)."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels, self.num_classes = images, labels.long(), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i].float().div(127.5).sub(1.0), self.labels[i]


# The quickstart's data ships inside ditlab: the first 500 images of each class of the MNIST
# training set (LeCun, Cortes & Burges; CC BY-SA 3.0), class by class in training-set order, as
# uint8 arrays with their training-set indices. SHA-256 of images.tobytes() + labels.tobytes():
EMBEDDED_FILE = "mnist_embedded.npz"
EMBEDDED_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"


def embedded_mnist_path() -> Path:
    return Path(str(resources.files("ditlab") / "assets" / EMBEDDED_FILE))


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> tuple[Tensor, Tensor]:
    path = embedded_mnist_path()
    try:
        with np.load(path) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, KeyError, ValueError, EOFError, zlib.error) as e:
        raise DitlabError(f"cannot read the embedded MNIST sample {path}: {e}; reinstall ditlab") from None
    if hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() != EMBEDDED_SHA256:
        raise DitlabError(f"the embedded MNIST sample {path} fails its checksum; reinstall ditlab")
    return torch.from_numpy(images).view(-1, 1, 28, 28), torch.from_numpy(labels.astype(np.int64))


def load_embedded_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST training digits (500 per class) that ship with ditlab, as (uint8 images, labels)."""
    images, labels = _embedded_arrays()  # read and checked once per process
    return images.clone(), labels.clone()


def _read_idx_bytes(path: Path) -> bytes:
    """The bytes of an IDX file, gunzipped when its name ends in .gz."""
    if not path.is_file():
        raise DitlabError(f"missing data file: {path}")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DitlabError(f"corrupt or truncated gzip file {path}: {e}") from None


def read_idx_images(path: Path) -> Tensor:
    data = _read_idx_bytes(path)
    if len(data) < 16:
        raise DitlabError(f"{path}: too short for an IDX image header ({len(data)} bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise DitlabError(f"{path}: bad IDX magic 0x{magic:08x} (expected 0x{IDX_IMAGES_MAGIC:08x} for images)")
    if (rows, cols) != (28, 28):
        raise DitlabError(f"{path}: images are {rows}x{cols}, expected 28x28")
    if len(data) != 16 + n * rows * cols:
        raise DitlabError(f"{path}: header says {n} images ({16 + n * rows * cols} bytes) but the file holds {len(data)} bytes")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=16).copy()).view(n, 1, rows, cols)


def read_idx_labels(path: Path, num_classes: int = 10) -> Tensor:
    data = _read_idx_bytes(path)
    if len(data) < 8:
        raise DitlabError(f"{path}: too short for an IDX label header ({len(data)} bytes)")
    magic, n = struct.unpack(">II", data[:8])
    if magic != IDX_LABELS_MAGIC:
        raise DitlabError(f"{path}: bad IDX magic 0x{magic:08x} (expected 0x{IDX_LABELS_MAGIC:08x} for labels)")
    if len(data) != 8 + n:
        raise DitlabError(f"{path}: header says {n} labels but the file holds {len(data) - 8}")
    labels = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64))
    if n and int(labels.max()) >= num_classes:
        raise DitlabError(f"{path}: label {int(labels.max())} is out of range 0..{num_classes - 1}")
    return labels


def default_dir(source: str) -> Path:
    root = os.environ.get("DITLAB_DATA")
    if not root:
        raise DitlabError(f"data.source={source} needs data.path or the DITLAB_DATA environment variable")
    return Path(root) / source


def load_idx_dataset(root: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST / Fashion-MNIST from a directory of the four standard IDX .gz files, verified."""
    root = Path(root)
    if split not in IDX_FILES:
        raise DitlabError(f"data.split must be train or test for IDX data, got '{split}'")
    if not root.is_dir():
        raise DitlabError(f"data directory not found: {root}")
    image_file, label_file, expected = IDX_FILES[split]
    images = read_idx_images(root / image_file)
    labels = read_idx_labels(root / label_file)
    if len(images) != len(labels):
        raise DitlabError(f"{root / image_file} holds {len(images)} images but {root / label_file} holds {len(labels)} labels")
    if len(images) != expected:
        raise DitlabError(f"{root / image_file}: {len(images)} images, expected {expected} for the {split} split")
    return images, labels
