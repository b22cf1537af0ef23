"""What the trainer writes to RUN/samples/ during training: an image grid, or a byte LM's text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ditlab.io import save_grid, write_atomic
from ditlab.runs import Run
from ditlab.sampling import generate, generate_text


def write_image_grid(run: Run, stem: Path) -> Path:
    """stem.png: one row per class (up to 100 images), or up to 64 unconditional ones; the config's sampler."""
    k = run.model.num_classes
    n = min(run.cfg.sample.num_samples, 64) if k == 0 else max(1, min(run.cfg.sample.num_samples, 100) // k) * k
    labels = np.arange(k).repeat(n // k) if k > 0 else np.full(n, -1)
    images, _ = generate(run, labels)
    path = stem.with_suffix(".png")
    save_grid(path, images, nrow=(n // k) if k > 0 else math.ceil(math.sqrt(n)))
    return path


def write_text_sample(run: Run, stem: Path) -> Path:
    """stem.txt: sample.prompt and the model's continuation (sample section settings), as raw bytes."""
    prompt = run.cfg.sample.prompt.encode()
    path = stem.with_suffix(".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, prompt + generate_text(run, prompt))
    return path
