"""An image folder: one subfolder per class (ImageNet layout), or flat images for unconditional data.

Images are centre-cropped as in ADM / official DiT: halve with a box filter while the short side
is at least twice the target, resize the short side to the target with bicubic, crop the centre.
Random flips are applied by the trainer (seeded per step), so workers stay stateless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ditlab.errors import DitlabError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jpe"}


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop (guided-diffusion image_datasets.py): box-downsample, bicubic, crop."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolder(Dataset):
    """Class-per-subfolder images (classes = sorted subfolder names) or a flat folder (label 0)."""

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, num_classes: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DitlabError(f"image folder not found: {root}")
        if channels not in (1, 3):
            raise DitlabError(f"an image folder gives 1- or 3-channel images, the config asks for {channels}")
        self.root, self.image_size, self.mode = root, image_size, "L" if channels == 1 else "RGB"
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        unconditional = num_classes == 0
        if subdirs and not unconditional:
            self.classes = [d.name for d in subdirs]
            self.samples = [(p, k) for k, d in enumerate(subdirs) for p in _images_in(d)]
        else:
            self.classes = []
            self.samples = [(p, 0) for p in _images_in(root)]
        if not self.samples:
            raise DitlabError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
        if num_classes and len(self.classes) > num_classes:
            raise DitlabError(
                f"{root} has {len(self.classes)} class folders (labels 0..{len(self.classes) - 1}) "
                f"but model.num_classes is {num_classes}"
            )
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
        except (UnidentifiedImageError, OSError) as e:
            raise DitlabError(f"cannot read image {path}: {e}") from None
        arr = np.asarray(center_crop_arr(im, self.image_size), dtype=np.float32)
        x = torch.from_numpy(arr.copy()).div_(127.5).sub_(1.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return x.contiguous(), torch.tensor(label, dtype=torch.long)
