"""Metric suites on uint8 samples: Inception (FID, sFID, IS, precision/recall) and the
MNIST/Fashion-MNIST classifier (class accuracy, classifier-feature FID, per-class counts, P/R).

Both take uint8 images [N, H, W, C] (ADM's .npz layout) and return flat {metric: value} dicts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditlab.errors import DitlabError
from ditlab.eval import fid as F
from ditlab.eval.classifier import classifier_outputs, default_data_dir, load_classifier, load_split
from ditlab.io import read_npz

INCEPTION_METRICS = ("fid", "sfid", "is", "pr")
EVALUATOR_CLASSES = 10  # the MNIST and Fashion-MNIST evaluator CNNs
CLASSIFIER_METRICS = ("class_acc", "cls_fid", "cls_pr", "counts")
ALL_METRICS = INCEPTION_METRICS + CLASSIFIER_METRICS


def as_uint8_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate images and return uint8 [N, H, W, C] (C = 1 or 3).

    uint8 passes through; float images must be finite and lie in [-1, 1] (ditlab's pixel
    range) and are mapped as DiT's sample_ddp.py does (clamp(127.5 x + 128)). Float images with
    no negative value are refused: they are almost surely in [0, 1] (PIL/torchvision's range),
    and reading them as [-1, 1] would score washed-out grey images without a word.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DitlabError(f"{what} must be [N, H, W, 1 or 3] (ADM layout), got shape {x.shape}")
    if len(x) == 0:
        raise DitlabError(f"{what}: no images")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise DitlabError(f"{what} must be uint8 or float in [-1, 1], got {x.dtype}")
    if not np.isfinite(x).all():
        raise DitlabError(f"{what} contain NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001:
        raise DitlabError(f"float {what} must lie in [-1, 1], got range [{lo:.3g}, {hi:.3g}]")
    if lo >= 0:
        raise DitlabError(f"float {what} lie in [{lo:.3g}, {hi:.3g}], which looks like [0, 1]; ditlab reads float "
                          "images as [-1, 1]: save them as uint8 (x * 255) or map them with 2x - 1")
    return np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 [N,H,W,C] images, int64 labels or None) from an ADM-style .npz (arr_0 [, labels]);
    float images in [-1, 1] are accepted and converted."""
    path = Path(path)
    images, labels = read_npz(path)
    images = as_uint8_images(images, f"{path.name} arr_0")
    if labels is not None:
        labels = np.asarray(labels)
        whole = np.issubdtype(labels.dtype, np.integer) or (
            np.issubdtype(labels.dtype, np.floating) and bool(np.all(np.isfinite(labels) & (labels == np.round(labels)))))
        if not whole:  # casting 2.7 to 2 would score the samples against classes nobody asked for
            raise DitlabError(f"{path}: labels must be whole class indices (-1 = none), got {labels.dtype} values "
                              f"such as {labels.reshape(-1)[0]!r}")
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise DitlabError(f"{path}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.min() < -1:
            raise DitlabError(f"{path}: labels must be class indices >= 0 (or -1 = none), got {labels.min()}")
    return images, labels


def check_labels(labels: np.ndarray | None, num_classes: int, what: str = "labels") -> None:
    """Refuse labels outside [0, num_classes) (-1, no class, passes: metrics that need a class say so)."""
    if labels is None or not len(labels):
        return
    bad = labels[(labels >= num_classes) | (labels < -1)]
    if len(bad):
        raise DitlabError(f"{what} must lie in [0, {num_classes}) for this evaluator, got {int(bad[0])} "
                          f"({len(bad)} of {len(labels)} out of range)")


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# ----------------------------------------------------------------------------- Inception


@torch.no_grad()
def inception_features(model, images: np.ndarray, batch_size: int = 50, progress: bool = False,
                       device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """{'pool3', 'spatial'[, 'logits']} of uint8 [N,H,W,C] images (grey is repeated to RGB)."""
    images = as_uint8_images(images)
    model = model.to(device)
    out: dict[str, list[np.ndarray]] = {}
    for i in _progress(range(0, len(images), batch_size), progress, desc="inception"):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        for k, v in model(x).items():
            out.setdefault(k, []).append(v.float().cpu().numpy())  # float32: 50k x 2048 is 400 MB
    return {k: np.concatenate(v) for k, v in out.items()}


def inception_metrics(feats: dict[str, np.ndarray], metrics: list[str], inception,
                      ref: dict[str, np.ndarray] | None, batch_size: int = 50, progress: bool = False,
                      device="cpu", k: int = 3) -> dict[str, float]:
    """FID / sFID against `ref` (stats or arr_0 images), IS, precision/recall, from the samples'
    Inception features (`inception_features`); `inception` embeds the reference images."""
    wanted = [m for m in metrics if m in INCEPTION_METRICS]
    if not wanted:
        return {}
    needs_ref = [m for m in wanted if m != "is"]
    if needs_ref and ref is None:
        raise DitlabError(f"{', '.join(needs_ref)} need reference statistics or images: pass --ref ref.npz")
    if "is" in wanted and "logits" not in feats:
        raise DitlabError("the Inception Score needs the 1008-way classifier of pytorch-fid's pt_inception-2015-12-05 "
                          "weights; this Inception file has no fc layer (drop 'is' from --metrics)")
    ref_feats = None
    if ref is not None and ("arr_0" in ref and ("pr" in wanted or "mu" not in ref or
                                                 ("sfid" in wanted and "mu_s" not in ref))):
        ref_feats = inception_features(inception, ref["arr_0"], batch_size, progress, device)
    result: dict[str, float] = {}
    if "fid" in wanted:
        mu, sigma = (ref["mu"], ref["sigma"]) if "mu" in ref else F.feature_stats(ref_feats["pool3"])
        result["fid"] = F.frechet_distance(*F.feature_stats(feats["pool3"]), mu, sigma)
    if "sfid" in wanted:
        if "mu_s" in ref:
            mu, sigma = ref["mu_s"], ref["sigma_s"]
        elif ref_feats is not None:
            mu, sigma = F.feature_stats(ref_feats["spatial"])
        else:
            raise DitlabError("sFID needs mu_s/sigma_s or arr_0 images in the reference file")
        result["sfid"] = F.frechet_distance(*F.feature_stats(feats["spatial"]), mu, sigma)
    if "is" in wanted:
        result["is"], result["is_std"] = F.inception_score(feats["logits"])
    if "pr" in wanted:
        if ref_feats is None:
            raise DitlabError("precision/recall needs reference images (arr_0) in the reference file, not only mu/sigma")
        result["precision"], result["recall"] = F.precision_recall(ref_feats["pool3"], feats["pool3"], k=k)
    return result


def reference_stats(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mu, sigma (pool3) and mu_s, sigma_s (spatial) of Inception features: a --ref file's content."""
    mu, sigma = F.feature_stats(feats["pool3"])
    mu_s, sigma_s = F.feature_stats(feats["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


# ----------------------------------------------------------------------------- classifier


_TEST_FEATURES: dict[tuple, torch.Tensor] = {}


def classifier_metrics(images: np.ndarray, labels: np.ndarray | None, metrics: list[str], dataset: str,
                       data_dir: str | Path | None = None, model=None, classifier_path: str | None = None,
                       k: int = 3, seed: int = 0, with_floor: bool = True,
                       max_ref: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, floors) of 28x28 grey samples with the dataset's evaluator CNN.

    class_acc: fraction classified as their label. counts: predicted classes, one number each.
    cls_fid: FID of the CNN's 128-d features vs the test set; cls_pr: precision/recall there.
    The floor is the same metric for N real training images (what a perfect generator scores
    with N samples): FID is biased upwards at small N, so compare against the floor, not 0.
    `max_ref` uses only the first that many test images as the reference (default: all 10k).
    """
    wanted = [m for m in metrics if m in CLASSIFIER_METRICS]
    if not wanted:
        return {}, {}
    images = as_uint8_images(images)
    if images.shape[1:] != (28, 28, 1):
        raise DitlabError(f"the {dataset} classifier needs 28x28 greyscale samples, got {images.shape[1:]}")
    if labels is not None:
        check_labels(np.asarray(labels), EVALUATOR_CLASSES)
    if ("cls_fid" in wanted or "cls_pr" in wanted) and len(images) < max(2, k + 1):
        raise DitlabError(f"cls_fid/cls_pr need at least {max(2, k + 1)} samples (a covariance, k-NN), got {len(images)}")
    cacheable = model is None  # test-set features are cached per (data, weights file), not per module
    model = model if model is not None else load_classifier(dataset, classifier_path)
    logits, feats = classifier_outputs(model, images)
    pred = logits.argmax(1).numpy()
    result: dict[str, float] = {}
    floor: dict[str, float] = {}
    if "class_acc" in wanted:
        if labels is None or (labels < 0).any():
            raise DitlabError("class_acc needs a class label for every sample (a 'labels' array in the .npz)")
        result["class_acc"] = float((pred == labels).mean())
    if "counts" in wanted:
        counts = np.bincount(pred, minlength=logits.shape[1])
        result.update({f"count_{c}": int(n) for c, n in enumerate(counts)})
    if "cls_fid" in wanted or "cls_pr" in wanted:
        root = Path(data_dir) if data_dir else default_data_dir(dataset)
        key = (str(root.resolve()), dataset, str(classifier_path), max_ref)
        if key not in _TEST_FEATURES or not cacheable:  # the test set's features, once per process
            xte, _ = load_split(root, "test")
            _TEST_FEATURES.clear()
            _TEST_FEATURES[key] = classifier_outputs(model, xte[:max_ref])[1]
        test_feats = _TEST_FEATURES.pop(key) if not cacheable else _TEST_FEATURES[key]
        real = None
        if with_floor:
            xtr, _ = load_split(root, "train")
            idx = np.random.default_rng(seed).choice(len(xtr), size=min(len(images), len(xtr)), replace=False)
            _, real = classifier_outputs(model, xtr[idx])
        if "cls_fid" in wanted:
            result["cls_fid"] = F.fid_from_features(feats, test_feats)
            if real is not None:
                floor["cls_fid"] = F.fid_from_features(real, test_feats)
        if "cls_pr" in wanted:  # equal set sizes, as Kynkäänniemi et al.: k-NN radii depend on N
            sub = np.random.default_rng(seed + 1).permutation(len(test_feats))[: len(images)]
            result["cls_precision"], result["cls_recall"] = F.precision_recall(test_feats[sub], feats, k=k)
            if real is not None:
                floor["cls_precision"], floor["cls_recall"] = F.precision_recall(test_feats[sub], real, k=k)
    return result, floor
