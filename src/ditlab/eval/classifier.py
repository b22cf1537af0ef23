"""MNIST / Fashion-MNIST evaluator: a small CNN whose accuracy and features judge generated digits.

    model = load_classifier("mnist")          # eval mode, input [B,1,28,28] float in [-1, 1]
    acc = class_accuracy(samples_uint8, labels)

The shipped weights (`ditlab/assets/classifier_<dataset>.safetensors`) were trained by
`ditlab train-classifier --dataset mnist --data DIR` on the full 60k training set; their test
accuracy is stored in the file's metadata. The 128-d penultimate layer (`model.features`) is the
feature space of the classifier-FID and precision/recall (the MNIST analogue of Inception pool3).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditlab.data.mnist import read_idx_images, read_idx_labels
from ditlab.errors import DitlabError

DATASETS = ("mnist", "fashion-mnist")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def weights_path(dataset: str) -> Path:
    return ASSETS / f"classifier_{dataset}.safetensors"


class EvalCNN(nn.Module):
    """Three conv stages (28->14->7), global average pool, a 128-d feature layer, 10 logits."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(1, w), *block(w, w), nn.MaxPool2d(2),  # 14x14
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 7x7
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [B, feature_dim] (after ReLU) of images in [-1, 1]."""
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


# ----------------------------------------------------------------------------- data


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,28,28], int64 labels [N]) of the 'train' or 'test' split in an IDX dir
    (the .gz files, or uncompressed ones), verified by `ditlab.data.mnist`'s readers."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
            if (root / name).exists():
                found.append(root / name)
                break
        else:
            raise DitlabError(f"no {prefix}-{kind}[.gz] in {root} (expected the standard MNIST IDX files)")
    images, labels = read_idx_images(found[0]), read_idx_labels(found[1])
    if len(images) != len(labels):
        raise DitlabError(f"{found[0]} holds {len(images)} images but {found[1]} holds {len(labels)} labels")
    return images[:, 0].numpy(), labels.numpy()


def default_data_dir(dataset: str) -> Path:
    """$DITLAB_DATA/<dataset>, falling back to ../shared/data or /work/shared/data."""
    for base in (os.environ.get("DITLAB_DATA"), "../shared/data", "/work/shared/data"):
        if base and (Path(base) / dataset).is_dir():
            return Path(base) / dataset
    raise DitlabError(f"no data dir for {dataset}: pass --data DIR or set DITLAB_DATA")


# ----------------------------------------------------------------------------- inputs


def to_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images -> float32 [N,1,28,28] in [-1, 1].

    Accepts uint8 (0..255) or float in [-1, 1]; layouts [N,28,28], [N,1,28,28] or [N,28,28,1].
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise DitlabError(f"classifier expects 28x28 greyscale images [N,1,28,28], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    x = x.float()
    if not torch.isfinite(x).all():
        raise DitlabError("images contain NaN or Inf values")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1.01 or hi > 1.01:
        raise DitlabError(f"float images must lie in [-1, 1] (got range [{lo:.3g}, {hi:.3g}]); pass uint8 for 0..255")
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- public API


def load_classifier(dataset: str = "mnist", path: str | Path | None = None) -> nn.Module:
    """The shipped (or given) evaluator CNN for `dataset`, in eval mode, input [B,1,28,28] in [-1, 1]."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if dataset not in DATASETS:
        raise DitlabError(f"unknown classifier dataset '{dataset}' (choose one of: {', '.join(DATASETS)})")
    path = Path(path) if path else weights_path(dataset)
    if not path.exists():
        raise DitlabError(
            f"missing classifier weights {path}; train them with "
            f"`ditlab train-classifier --dataset {dataset} --data DIR --out {path}`"
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = EvalCNN(width=int(meta.get("width", 32)), feature_dim=int(meta.get("feature_dim", 128)))
    model.load_state_dict(load_file(str(path)))
    model.metadata = meta
    return model.eval()


@torch.no_grad()
def classifier_outputs(
    model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N,10], features [N,128]) of images, batched, on the model's device."""
    x = to_classifier_input(images)
    device = next(model.parameters()).device
    logits, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i : i + batch_size].to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)


def class_accuracy(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    dataset: str = "mnist",
    model: nn.Module | None = None,
) -> float:
    """Fraction of images that the evaluator classifies as their label (uint8 or [-1,1] float)."""
    labels = torch.as_tensor(labels).long().cpu()
    if labels.ndim != 1 or len(labels) != len(images):
        raise DitlabError(f"need one label per image ({len(images)} images, labels shape {tuple(labels.shape)})")
    model = model if model is not None else load_classifier(dataset)
    logits, _ = classifier_outputs(model, images)
    return (logits.argmax(1) == labels).float().mean().item()


# ----------------------------------------------------------------------------- training


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    logits, _ = classifier_outputs(model, images)
    return (logits.argmax(1).numpy() == labels).mean().item()


def train_classifier(
    dataset: str,
    data_dir: str | Path,
    out: str | Path,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 32,
    seed: int = 0,
    log=print,
) -> dict:
    """Train EvalCNN on the full training split (AdamW, one-cycle LR, light random shifts)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    xtr, ytr = load_split(data_dir, "train")
    xte, yte = load_split(data_dir, "test")
    x = to_classifier_input(xtr)
    y = torch.from_numpy(ytr)
    model = EvalCNN(width=width)
    steps = epochs * (len(x) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = _random_shift(x[idx], 2, g)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log(f"epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        acc = evaluate(model, xte, yte)
        log(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    seconds = time.time() - t0
    meta = {
        "dataset": dataset,
        "test_accuracy": f"{acc:.4f}",
        "epochs": str(epochs),
        "width": str(width),
        "feature_dim": "128",
        "train_seconds": f"{seconds:.0f}",
        "input": "[B,1,28,28] float in [-1,1]",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=meta)
    return {"dataset": dataset, "test_accuracy": acc, "seconds": seconds, "path": str(out)}


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (background -1 fills the border)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    flat = padded[:, 0].reshape(n, -1)
    return flat.gather(1, (rows * (w + 2 * max_shift) + cols).reshape(n, -1)).reshape(n, 1, h, w)
