"""eval/metrics.py called directly: what the Inception network is given, and which metric
needs which reference, against values computed here from the images themselves.

The stand-in network returns per-channel means (pool3), the first pixel (spatial) and fixed
logits, so the expected features of any uint8 image set are a numpy one-liner; a grey image must
reach it as three equal channels in [0, 1], in batches that do not change any value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ditlab.errors import DitlabError
from ditlab.eval import fid as F
from ditlab.eval.metrics import as_uint8_images, check_labels, inception_features, inception_metrics, load_samples

U32 = float(np.finfo(np.float32).eps)


class ChannelMeans(nn.Module):
    """Inception stand-in: pool3 = per-channel mean, spatial = first pixel, logits from pool3."""

    def __init__(self, with_logits: bool = True):
        super().__init__()
        self.with_logits = with_logits
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.dtype == torch.float32 and x.shape[1] == 3, (x.dtype, x.shape)
        self.seen.append(tuple(x.shape))
        out = {"pool3": x.mean((2, 3)), "spatial": x[:, :, 0, 0]}
        if self.with_logits:
            out["logits"] = torch.cat([x.mean((2, 3)) * 10, torch.zeros(len(x), 1005)], dim=1)
        return out


def images(n: int, channels: int, seed: int = 0, size: int = 6, darkest: int = 0) -> np.ndarray:
    """Random images, each with its own brightness (so that per-image means spread out)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(darkest, 200, (n, 1, 1, channels))
    return (base + rng.integers(0, 56, (n, size, size, channels))).astype(np.uint8)


def test_features_are_those_of_the_images_in_0_1_in_any_batching(capsys):
    rgb = images(7, 3)
    model = ChannelMeans()
    feats = inception_features(model, rgb)  # defaults: CPU, batches of 50, no progress bar
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(feats["pool3"], rgb.mean((1, 2)) / 255.0, rtol=4 * U32)
    np.testing.assert_allclose(feats["spatial"], rgb[:, 0, 0, :] / 255.0, rtol=U32)
    assert model.seen == [(7, 3, 6, 6)]
    model.seen.clear()
    small = inception_features(model, rgb, batch_size=3, progress=True, device="cpu")
    assert model.seen == [(3, 3, 6, 6), (3, 3, 6, 6), (1, 3, 6, 6)]  # every image once, in order
    assert "inception" in capsys.readouterr().err  # the progress bar, labelled
    for name in feats:
        np.testing.assert_array_equal(small[name], feats[name])


def test_grey_images_reach_the_network_as_three_equal_channels():
    grey = images(5, 1, seed=1)
    feats = inception_features(ChannelMeans(), grey)
    same = inception_features(ChannelMeans(), np.repeat(grey, 3, axis=-1))
    for name in feats:  # equal up to the order of the float32 sums over a broadcast view
        np.testing.assert_allclose(feats[name], same[name], rtol=4 * U32)
    np.testing.assert_allclose(feats["pool3"][:, 1], grey[..., 0].mean((1, 2)) / 255.0, rtol=4 * U32)


def _features(seed: int, n: int = 40) -> dict[str, np.ndarray]:
    return inception_features(ChannelMeans(), images(n, 3, seed=seed))


def test_each_metric_against_the_fid_module_on_the_reference_it_needs():
    samples = _features(0)
    ref_images = images(50, 3, seed=1, darkest=40)
    ref_feats = inception_features(ChannelMeans(), ref_images)
    mu, sigma = F.feature_stats(ref_feats["pool3"])
    stats = {"mu": mu, "sigma": sigma}
    by_images = inception_metrics(samples, ["fid", "sfid", "pr", "is"], ChannelMeans(), {"arr_0": ref_images})
    assert by_images["fid"] == pytest.approx(F.frechet_distance(*F.feature_stats(samples["pool3"]),
                                                                 *F.feature_stats(ref_feats["pool3"])), rel=1e-12)
    assert by_images["sfid"] == pytest.approx(F.frechet_distance(*F.feature_stats(samples["spatial"]),
                                                                  *F.feature_stats(ref_feats["spatial"])), rel=1e-12)
    assert (by_images["precision"], by_images["recall"]) == F.precision_recall(ref_feats["pool3"], samples["pool3"], k=3)
    assert (by_images["is"], by_images["is_std"]) == F.inception_score(samples["logits"])
    assert by_images["fid"] > 0 and by_images["sfid"] > 0 and by_images["fid"] != by_images["sfid"]
    # Saved statistics give the same FID; their own mu/sigma are used, not the images'.
    assert inception_metrics(samples, ["fid"], ChannelMeans(), stats)["fid"] == pytest.approx(by_images["fid"], rel=1e-9)
    moved = {**stats, "mu": stats["mu"] + 1.0}  # each of the 3 means 1 further from the samples' (all < 1)
    assert inception_metrics(samples, ["fid"], ChannelMeans(), moved)["fid"] > by_images["fid"] + 3
    # The Inception Score needs no reference at all; no metric of this suite gives {}.
    assert set(inception_metrics(samples, ["is"], ChannelMeans(), None)) == {"is", "is_std"}
    assert inception_metrics(samples, ["class_acc"], ChannelMeans(), None) == {}


def test_k_of_precision_recall_is_passed_on_and_defaults_to_3():
    samples, ref = _features(2, n=12), images(12, 3, seed=3)
    ref_pool3 = inception_features(ChannelMeans(), ref)["pool3"]
    got = {k: inception_metrics(samples, ["pr"], ChannelMeans(), {"arr_0": ref}, k=k) for k in (1, 3)}
    for k in (1, 3):
        assert (got[k]["precision"], got[k]["recall"]) == F.precision_recall(ref_pool3, samples["pool3"], k=k)
    assert got[1] != got[3]  # so that the default below is told apart
    assert inception_metrics(samples, ["pr"], ChannelMeans(), {"arr_0": ref}) == got[3]


@pytest.mark.parametrize("metrics, keys, embedded", [
    (["fid"], ("arr_0", "mu", "sigma", "mu_s", "sigma_s"), False),
    (["fid", "sfid", "is"], ("arr_0", "mu", "sigma", "mu_s", "sigma_s"), False),
    (["pr"], ("arr_0", "mu", "sigma", "mu_s", "sigma_s"), True),  # k-NN needs the features themselves
    (["sfid"], ("arr_0", "mu", "sigma"), True),
    (["fid"], ("arr_0", "mu_s", "sigma_s"), True),
    (["fid"], ("arr_0",), True),
])
def test_reference_images_are_embedded_only_when_a_metric_needs_them(metrics, keys, embedded, capsys):
    """Embedding 50,000 reference images costs as much as the samples: statistics are used when given."""
    samples = _features(0)
    ref_images = images(30, 3, seed=1, darkest=40)
    ref_feats = inception_features(ChannelMeans(), ref_images)
    full = dict(zip(("mu", "sigma"), F.feature_stats(ref_feats["pool3"])))
    full.update(zip(("mu_s", "sigma_s"), F.feature_stats(ref_feats["spatial"])))
    full["arr_0"] = ref_images
    model = ChannelMeans()
    got = inception_metrics(samples, metrics, model, {k: full[k] for k in keys})
    assert bool(model.seen) == embedded
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    expected = inception_metrics(samples, metrics, ChannelMeans(), {"arr_0": ref_images})
    assert got == pytest.approx(expected, rel=1e-9)


def test_the_reference_embedding_shows_progress_when_asked(capsys):
    model = ChannelMeans()
    inception_metrics(_features(0), ["pr"], model, {"arr_0": images(30, 3, seed=1)}, batch_size=7, progress=True)
    assert "inception" in capsys.readouterr().err and len(model.seen) == 5  # batches of 7: 4 full and 2 images


@pytest.mark.parametrize("metrics, ref, message", [
    (["fid"], None, "fid need reference"),
    (["is", "sfid"], None, "sfid need reference"),
    (["pr"], "stats", "precision/recall needs reference images"),
    (["sfid"], "stats", "sFID needs mu_s/sigma_s"),
])
def test_a_metric_without_the_reference_it_needs_is_refused(metrics, ref, message):
    samples = _features(4)
    if ref == "stats":
        ref = {"mu": samples["pool3"].mean(0), "sigma": np.cov(samples["pool3"], rowvar=False)}
    with pytest.raises(DitlabError, match=message):
        inception_metrics(samples, metrics, ChannelMeans(), ref)


def test_the_inception_score_needs_the_classifier_logits():
    samples = inception_features(ChannelMeans(with_logits=False), images(8, 3))
    assert "logits" not in samples
    with pytest.raises(DitlabError, match="1008-way classifier"):
        inception_metrics(samples, ["is"], ChannelMeans(with_logits=False), None)
    # FID alone does not need them
    assert inception_metrics(samples, ["fid"], ChannelMeans(with_logits=False), {"arr_0": images(8, 3, seed=9)})["fid"] > 0


# ---- the classifier suite (MNIST / Fashion-MNIST evaluator), with the network replaced -------------


def pixel_outputs(model, images, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator stand-in: features (mean, pixel 0, pixel 1) in float64; class = pixel 0 mod 10."""
    x = np.asarray(images).reshape(len(images), -1).astype(np.float64)
    scale = getattr(model, "scale", 1.0)  # a caller's own network (see ScaledNet)
    feats = torch.as_tensor(np.stack([x.mean(1), x[:, 0], x[:, 1]], axis=1) * scale)
    logits = torch.nn.functional.one_hot(torch.as_tensor(x[:, 0].astype(np.int64) % 10), 10).double()
    return logits, feats


class ScaledNet(nn.Identity):
    """A network passed in by the caller; its features are pixel_outputs' times `scale`."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale


def grey(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1)).astype(np.uint8)


@pytest.fixture
def evaluator(monkeypatch):
    """Splits of 60 test and 80 training images; counts how often each split is read."""
    import ditlab.eval.metrics as M

    splits = {"test": grey(60, 100)[..., 0], "train": grey(80, 101)[..., 0]}
    reads = {"test": 0, "train": 0}

    def load_split(root, split):
        reads[split] += 1
        return splits[split], np.zeros(len(splits[split]), np.int64)

    monkeypatch.setattr(M, "_TEST_FEATURES", {})
    def load_classifier(dataset, path=None):
        reads.setdefault("classifier", []).append((dataset, path))
        return nn.Identity()

    monkeypatch.setattr(M, "load_classifier", load_classifier)
    monkeypatch.setattr(M, "classifier_outputs", pixel_outputs)
    monkeypatch.setattr(M, "load_split", load_split)
    return M, splits, reads


def test_classifier_metrics_against_the_fid_module(evaluator, tmp_path):
    M, splits, _ = evaluator
    samples = grey(20, 0)
    labels = samples[:, 0, 0, 0].astype(np.int64) % 10
    labels[:5] = (labels[:5] + 1) % 10  # 5 of 20 carry a class they are not classified as
    test_feats = pixel_outputs(None, splits["test"])[1]
    feats = pixel_outputs(None, samples)[1]
    m, floor = M.classifier_metrics(samples, labels, ["class_acc", "counts", "cls_fid", "cls_pr"], "mnist",
                                    data_dir=tmp_path, seed=7)
    assert m["class_acc"] == 0.75
    assert [m[f"count_{c}"] for c in range(10)] == np.bincount(samples[:, 0, 0, 0] % 10, minlength=10).tolist()
    assert m["cls_fid"] == F.fid_from_features(feats, test_feats)
    sub = np.random.default_rng(8).permutation(60)[:20]  # as many test features as samples, drawn with seed + 1
    assert (m["cls_precision"], m["cls_recall"]) == F.precision_recall(test_feats[sub], feats, k=3)
    real = pixel_outputs(None, splits["train"][np.random.default_rng(7).choice(80, size=20, replace=False)])[1]
    assert floor["cls_fid"] == F.fid_from_features(real, test_feats)
    assert (floor["cls_precision"], floor["cls_recall"]) == F.precision_recall(test_feats[sub], real, k=3)
    assert floor["cls_fid"] != m["cls_fid"]


def test_classifier_options_reach_the_metrics(evaluator, tmp_path):
    M, splits, _ = evaluator
    samples = grey(20, 1)
    test_feats = pixel_outputs(None, splits["test"])[1]
    feats = pixel_outputs(None, samples)[1]
    base, _ = M.classifier_metrics(samples, None, ["cls_fid", "cls_pr"], "mnist", data_dir=tmp_path)
    first10, _ = M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, max_ref=10)
    assert first10["cls_fid"] == F.fid_from_features(feats, test_feats[:10]) != base["cls_fid"]
    sub = np.random.default_rng(1).permutation(60)[:20]  # default seed 0, + 1
    assert (base["cls_precision"], base["cls_recall"]) == F.precision_recall(test_feats[sub], feats, k=3)
    k1, k1_floor = M.classifier_metrics(samples, None, ["cls_pr"], "mnist", data_dir=tmp_path, k=1)
    assert (k1["cls_precision"], k1["cls_recall"]) == F.precision_recall(test_feats[sub], feats, k=1)
    real = pixel_outputs(None, splits["train"][np.random.default_rng(0).choice(80, size=20, replace=False)])[1]
    assert (k1_floor["cls_precision"], k1_floor["cls_recall"]) == F.precision_recall(test_feats[sub], real, k=1)
    assert k1_floor != M.classifier_metrics(samples, None, ["cls_pr"], "mnist", data_dir=tmp_path)[1]
    assert M.classifier_metrics(samples, None, ["cls_pr"], "mnist", data_dir=tmp_path, with_floor=False)[1] == {}
    other_seed = M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, seed=3)[1]
    assert other_seed["cls_fid"] != M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path)[1]["cls_fid"]
    # Inception metrics are not this suite's: nothing computed, nothing read
    assert M.classifier_metrics(samples, None, ["fid", "is"], "mnist", data_dir=tmp_path) == ({}, {})


def test_test_set_features_are_computed_once_per_reference(evaluator, tmp_path):
    M, _, reads = evaluator
    samples = grey(10, 2)
    for _ in range(2):
        M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, with_floor=False)
    assert (reads["test"], reads["train"]) == (1, 0)
    M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, with_floor=False, max_ref=30)
    assert reads["test"] == 2  # another reference
    for _ in range(2):  # a caller's own network: its features are not the cached ones
        M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, model=ScaledNet(2.0), with_floor=False)
    assert reads["test"] == 4
    # ... nor left in the cache for the shipped network
    shipped = M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, with_floor=False)[0]
    assert shipped["cls_fid"] == F.fid_from_features(pixel_outputs(None, samples)[1],
                                                     pixel_outputs(None, evaluator[1]["test"])[1])
    # another data folder or weights file is another reference
    M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path, classifier_path="b.pt", with_floor=False)
    assert reads["test"] == 6
    (tmp_path / "other").mkdir()
    M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path / "other", classifier_path="b.pt",
                         with_floor=False)
    assert reads["test"] == 7


def test_the_data_folder_defaults_to_the_datasets(evaluator, tmp_path, monkeypatch):
    M, _, reads = evaluator
    asked = []
    monkeypatch.setattr(M, "default_data_dir", lambda dataset: asked.append(dataset) or tmp_path)
    M.classifier_metrics(grey(4, 0), None, ["cls_fid"], "fashion-mnist", with_floor=False)
    assert asked == ["fashion-mnist"]
    M.classifier_metrics(grey(4, 0), None, ["cls_fid"], "mnist", data_dir=tmp_path / "x", with_floor=False)
    assert asked == ["fashion-mnist"]  # a given folder is used as it is


def test_the_evaluator_network_is_the_one_given_or_the_one_named(evaluator, tmp_path):
    M, _, reads = evaluator
    M.classifier_metrics(grey(4, 0), None, ["counts"], "fashion-mnist", classifier_path="my.pt")
    assert reads["classifier"] == [("fashion-mnist", "my.pt")]
    M.classifier_metrics(grey(4, 0), None, ["counts"], "mnist", model=nn.Identity())
    assert reads["classifier"] == [("fashion-mnist", "my.pt")]  # a given network is not loaded again


def test_k_sets_the_smallest_sample_count(evaluator, tmp_path):
    M, _, _ = evaluator
    m, _ = M.classifier_metrics(grey(2, 0), None, ["cls_pr"], "mnist", data_dir=tmp_path, k=1, with_floor=False)
    assert set(m) == {"cls_precision", "cls_recall"}  # two samples: a covariance and a 1-NN radius
    with pytest.raises(DitlabError, match="at least 2 samples"):
        M.classifier_metrics(grey(1, 0), None, ["cls_pr"], "mnist", data_dir=tmp_path, k=1)


@pytest.mark.parametrize("images, labels, metrics, message", [
    (grey(4, 0)[:, :14], None, ["counts"], "28x28 greyscale"),
    (grey(3, 0), None, ["cls_fid"], "at least 4 samples"),
    (grey(3, 0), None, ["cls_pr"], "at least 4 samples"),
    (grey(4, 0), None, ["class_acc"], "needs a class label"),
    (grey(4, 0), np.array([1, 2, -1, 3]), ["class_acc"], "needs a class label"),
    (grey(4, 0), np.array([1, 2, 10, 3]), ["counts"], "must lie in [0, 10)"),
])
def test_classifier_input_errors(evaluator, tmp_path, images, labels, metrics, message):
    M, _, _ = evaluator
    with pytest.raises(DitlabError, match=message.replace("[", r"\[").replace(")", r"\)")):
        M.classifier_metrics(images, labels, metrics, "mnist", data_dir=tmp_path)


def test_four_samples_are_enough_for_k_3(evaluator, tmp_path):
    M, splits, _ = evaluator
    samples = grey(4, 5)
    m, _ = M.classifier_metrics(samples, None, ["cls_fid"], "mnist", data_dir=tmp_path)
    assert m["cls_fid"] == F.fid_from_features(pixel_outputs(None, samples)[1], pixel_outputs(None, splits["test"])[1])


# ---- sample files -----------------------------------------------------------------------------------


def _npz(tmp_path, labels=None, arr=None) -> Path:
    path = tmp_path / "s.npz"
    arrays = {"arr_0": grey(4, 0) if arr is None else arr}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("labels", [
    np.array([0, 3, -1, 9]),  # -1: no class
    np.array([0.0, 3.0, -1.0, 9.0], np.float32),  # whole numbers stored as floats
    np.array([[0], [3], [-1], [9]]),  # a column
])
def test_sample_labels_are_read_as_int64_class_indices(tmp_path, labels):
    images, got = load_samples(_npz(tmp_path, labels))
    assert got.dtype == np.int64 and got.tolist() == [0, 3, -1, 9] and images.shape == (4, 28, 28, 1)


@pytest.mark.parametrize("labels, message", [
    (np.array([0.0, 2.5, 1.0, 1.0]), "whole class indices"),
    (np.array([0.0, np.inf, 1.0, 1.0]), "whole class indices"),
    (np.array(["0", "1", "2", "3"]), "whole class indices"),
    (np.array([0, -2, 1, 1]), "class indices >= 0"),
    (np.array([0, 1, 2]), "4 images but 3 labels"),
])
def test_sample_labels_that_are_no_class_indices_are_refused(tmp_path, labels, message):
    with pytest.raises(DitlabError, match=message):
        load_samples(_npz(tmp_path, labels))


def test_a_bad_sample_array_is_named_in_the_error(tmp_path):
    with pytest.raises(DitlabError, match="s.npz arr_0 contain NaN"):
        load_samples(_npz(tmp_path, arr=np.full((2, 28, 28, 1), np.nan, np.float32)))


def test_float_images_map_to_uint8_as_the_official_sampler_does():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 0.999, 1.0, -1.0005, 1.0005], np.float32).reshape(1, 2, 4)
    got = as_uint8_images(x)  # [N, H, W] grey gets its channel
    assert got.shape == (1, 2, 4, 1) and got.dtype == np.uint8
    # clamp(127.5 x + 128, 0, 255) then truncation: DiT's sample_ddp.py
    assert got.reshape(-1).tolist() == [0, 64, 128, 191, 255, 255, 0, 255]
    # the tolerance itself is inside the range (float64, so that -1.001 is the bound exactly)
    assert as_uint8_images(np.array([-1.001, 1.001, 0.0, 0.0]).reshape(1, 2, 2, 1)).reshape(-1).tolist() == [0, 255, 128, 128]
    rgb = np.full((2, 3, 3, 3), -0.25, np.float64)
    assert (as_uint8_images(rgb) == 96).all()
    plain = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    assert as_uint8_images(plain) is plain


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 4, 4, 2), np.uint8), "must be \\[N, H, W, 1 or 3\\]"),
    (np.zeros((2, 4, 4, 1, 1), np.uint8), "must be \\[N, H, W, 1 or 3\\]"),
    (np.zeros((2, 4, 4, 1), np.int32), "uint8 or float"),
    (np.full((1, 2, 2, 1), -1.002), "must lie in \\[-1, 1\\]"),
    (np.full((1, 2, 2, 1), 1.002), "must lie in \\[-1, 1\\]"),
    (np.array([0.0, 0.5, 1.0, 0.2]).reshape(1, 2, 2, 1), "looks like \\[0, 1\\]"),
    (np.array([0.2, 0.5, 0.9, 0.3]).reshape(1, 2, 2, 1), "looks like \\[0, 1\\]"),
])
def test_images_that_are_not_samples_are_refused(images, message):
    with pytest.raises(DitlabError, match=message):
        as_uint8_images(images)


def test_labels_below_minus_one_are_refused():
    check_labels(np.array([-1, 0, 9]), 10)
    with pytest.raises(DitlabError, match="got -2"):
        check_labels(np.array([0, -2]), 10)
