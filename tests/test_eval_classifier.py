"""The MNIST / Fashion-MNIST evaluator: shipped weights, accuracy on real digits, training CLI."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.eval.classifier import (
    EvalCNN,
    _random_shift,
    class_accuracy,
    classifier_outputs,
    default_data_dir,
    load_classifier,
    load_split,
    to_classifier_input,
    train_classifier,
    weights_path,
)

DATA = Path(os.environ.get("DITLAB_DATA", "../shared/data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
REQUIRED = {"mnist": 0.993, "fashion-mnist": 0.92}


@pytest.mark.parametrize("dataset", list(REQUIRED))
def test_shipped_weights_small_with_metadata(dataset):
    path = weights_path(dataset)
    assert path.exists(), f"{path} must ship with the package"
    assert path.stat().st_size < 2 * 1024 * 1024
    model = load_classifier(dataset)
    assert not model.training
    assert model.metadata["dataset"] == dataset
    assert float(model.metadata["test_accuracy"]) >= REQUIRED[dataset]


def test_mnist_classifier_on_embedded_digits():
    # the 5,000 real MNIST training digits (500 per class) that ship with ditlab, in every install.
    from ditlab.data.mnist import load_embedded_mnist

    images, labels = load_embedded_mnist()
    idx = torch.arange(0, 5000, 5)  # 1,000 digits keeps the test quick
    assert class_accuracy(images[idx], labels[idx], "mnist") >= 0.99
    # uint8 [N,28,28,1] and float [-1,1] inputs are the same images to the classifier.
    x = images[idx[:50]]
    assert class_accuracy(x.permute(0, 2, 3, 1).numpy(), labels[idx[:50]]) == class_accuracy(
        x.float() / 127.5 - 1, labels[idx[:50]])


@pytest.mark.parametrize("dataset", list(REQUIRED))
def test_test_set_accuracy(dataset):
    # Every 4th test image (2,500) keeps this quick; the full-set accuracy is in the metadata
    # (and benchmarks/eval_floors.py). A 2,500-image estimate has a std of ~0.15% (MNIST).
    root = DATA / dataset
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("shared data not present")
    x, y = load_split(root, "test")
    assert len(x) == 10000
    assert class_accuracy(x[::4], y[::4], dataset) >= REQUIRED[dataset] - 0.004


def test_input_validation():
    with pytest.raises(DitlabError, match="28x28"):
        to_classifier_input(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DitlabError, match="NaN"):
        to_classifier_input(torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(DitlabError, match=r"\[-1, 1\]"):
        to_classifier_input(torch.full((2, 1, 28, 28), 255.0))
    with pytest.raises(DitlabError, match="one label per image"):
        class_accuracy(np.zeros((3, 28, 28), np.uint8), [1, 2], model=EvalCNN().eval())


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x803 if array.ndim == 3 else 0x801
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"")
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_train_classifier_cli_end_to_end(tmp_path, capsys):
    # A learnable, shift-invariant toy IDX set: class 0 a horizontal bar, class 1 a vertical one.
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 64)):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            r = rng.integers(6, 20)
            if c == 0:
                x[i, r : r + 3, 4:24] = 255
            else:
                x[i, 4:24, r : r + 3] = 255
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    out = tmp_path / "cls.safetensors"
    code = main(["train-classifier", "--dataset", "mnist", "--data", str(tmp_path), "--out", str(out),
                 "--epochs", "3", "--batch-size", "16", "--width", "8", "--lr", "1e-2"])
    assert code == 0, capsys.readouterr().err
    model = load_classifier("mnist", out)
    assert model.metadata["width"] == "8" and float(model.metadata["test_accuracy"]) > 0.9
    assert main(["train-classifier", "--data", str(tmp_path / "nope")]) == 2
    assert "no t" in capsys.readouterr().err.splitlines()[-1]


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(DitlabError, match="ditlab train-classifier --dataset mnist"):
        load_classifier("mnist", tmp_path / "missing.safetensors")


def _toy_idx(root: Path, n_train: int, n_test: int = 16) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def test_train_classifier_batches_logs_and_metadata(tmp_path, monkeypatch):
    """Every step sees one full batch of distinct images; a log line every 100 steps and one per
    epoch; the file (in a folder made for it) records how it was trained."""
    import ditlab.eval.classifier as classifier

    _toy_idx(tmp_path, n_train=205)
    batches, forward = [], classifier.EvalCNN.forward

    def spy(self, x):
        if self.training:
            batches.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(classifier.EvalCNN, "forward", spy)
    lines = []
    out = tmp_path / "new" / "dir" / "cls.safetensors"
    result = train_classifier("mnist", tmp_path, out, epochs=2, batch_size=2, width=4, log=lines.append)
    assert batches == [2] * 204  # 102 steps an epoch; the odd image left out
    assert [ln.split(" loss")[0] for ln in lines if " step " in ln] == ["epoch 1 step 100/204", "epoch 2 step 200/204"]
    epochs = [ln.split(" (")[0] for ln in lines if "test accuracy" in ln]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1", "epoch 2"]
    assert epochs[1] == f"epoch 2: test accuracy {result['test_accuracy']:.4f}"
    model = load_classifier("mnist", out)
    meta = model.metadata
    assert {k: meta[k] for k in ("dataset", "epochs", "width", "feature_dim", "input")} == \
        {"dataset": "mnist", "epochs": "2", "width": "4", "feature_dim": "128", "input": "[B,1,28,28] float in [-1,1]"}
    assert meta["test_accuracy"] == f"{result['test_accuracy']:.4f}"
    assert 0 <= float(meta["train_seconds"]) <= result["seconds"] + 1 and result["seconds"] < 600
    assert result["dataset"] == "mnist" and result["path"] == str(out)


def test_random_shift_moves_each_image_whole_and_fills_with_background():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 28, 28) * 2 - 1
    shifted = _random_shift(x, 2, g)
    seen = set()
    for img, out in zip(x[:, 0], shifted[:, 0]):
        padded = torch.nn.functional.pad(img, (2, 2, 2, 2), value=-1.0)
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out, padded[dy:dy + 28, dx:dx + 28])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {(dy, dx) for dy in range(5) for dx in range(5)}  # every shift of up to 2 pixels, both axes
    assert torch.equal(_random_shift(x, 2, torch.Generator().manual_seed(0)), shifted)  # the generator decides


def test_default_data_dir(tmp_path, monkeypatch):
    (tmp_path / "env" / "mnist").mkdir(parents=True)
    monkeypatch.setenv("DITLAB_DATA", str(tmp_path / "env"))
    assert default_data_dir("mnist") == tmp_path / "env" / "mnist"
    monkeypatch.delenv("DITLAB_DATA")
    (tmp_path / "shared" / "data" / "fashion-mnist").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_data_dir("fashion-mnist").resolve() == tmp_path / "shared" / "data" / "fashion-mnist"


class _SaysThree(EvalCNN):
    """An evaluator that calls every image a 3."""

    def __init__(self):
        super().__init__(width=4)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[3] = 1.0


def test_class_accuracy_uses_the_given_model_and_any_label_container():
    images = np.zeros((8, 28, 28), dtype=np.uint8)
    labels = [3, 3, 3, 1, 2, 3, 0, 3]
    model = _SaysThree().eval()
    for container in (labels, np.array(labels), torch.tensor(labels), np.array(labels, dtype=np.uint8)):
        assert class_accuracy(images, container, model=model) == 5 / 8
    with pytest.raises(DitlabError, match="one label per image"):
        class_accuracy(images, labels[:-1], model=model)


def test_classifier_input_scaling_bounds_and_layouts():
    u8 = np.array([0, 1, 128, 255], dtype=np.uint8).repeat(196).reshape(1, 28, 28)
    x = to_classifier_input(u8)
    assert x.dtype == torch.float32 and x.shape == (1, 1, 28, 28)
    assert x.flatten()[[0, 196, 392, 588]].tolist() == pytest.approx([-1.0, 1 / 127.5 - 1, 128 / 127.5 - 1, 1.0], abs=1e-7)  # float32 rounding
    nhwc = np.linspace(-1, 1, 2 * 784, dtype=np.float32).reshape(2, 28, 28, 1)
    assert torch.equal(to_classifier_input(nhwc), torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    # slightly outside [-1, 1] (rounding): clamped; clearly outside: refused, on either side
    edge = torch.zeros(1, 1, 28, 28)
    edge[0, 0, 0, :2] = torch.tensor([1.005, -1.005])
    assert to_classifier_input(edge)[0, 0, 0, :3].tolist() == [1.0, -1.0, 0.0]
    for value in (1.5, -1.5):
        with pytest.raises(DitlabError, match=r"\[-1, 1\]"):
            to_classifier_input(torch.full((1, 1, 28, 28), value))
    for shape in ((28, 28), (784,), (2, 28, 28, 3)):
        with pytest.raises(DitlabError, match="28x28"):
            to_classifier_input(np.zeros(shape, np.uint8))


def test_weights_file_metadata_sets_the_architecture(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    small = EvalCNN(width=8, feature_dim=64)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"), metadata={"width": "8", "feature_dim": "64"})
    loaded = load_classifier("mnist", tmp_path / "small.safetensors")
    assert loaded.fc.out_features == 64 and loaded.body[0].out_channels == 8 and not loaded.training
    # without metadata: EvalCNN's defaults, width 32 and 128 features
    save_file(EvalCNN().state_dict(), str(tmp_path / "plain.safetensors"))
    plain = load_classifier("mnist", tmp_path / "plain.safetensors")
    assert plain.fc.out_features == 128 and plain.body[0].out_channels == 32
    assert load_classifier().metadata["dataset"] == "mnist"  # the default: the shipped MNIST evaluator


def test_classifier_outputs_in_batches_equal_one_at_a_time():
    torch.manual_seed(0)
    model = EvalCNN(width=4).eval()
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    logits, feats = classifier_outputs(model, images, batch_size=3)
    assert logits.shape == (7, 10) and feats.shape == (7, 128)
    for i in range(7):
        one_logits, one_feats = classifier_outputs(model, images[i:i + 1])
        torch.testing.assert_close(logits[i:i + 1], one_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats[i:i + 1], one_feats, rtol=1e-5, atol=1e-6)


def test_shipped_weights_were_trained_with_the_default_recipe():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(train_classifier).parameters.items()}
    import argparse

    from ditlab.commands.train_classifier import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cli = vars(parser.parse_args([]))
    assert {k: defaults[k] for k in ("epochs", "batch_size", "lr", "width", "seed")} == \
        {k: cli[k] for k in ("epochs", "batch_size", "lr", "width", "seed")}  # one recipe, API and command
    meta = load_classifier("mnist").metadata
    assert (meta["epochs"], meta["width"]) == (str(defaults["epochs"]), str(defaults["width"]))
    assert load_classifier("fashion-mnist").metadata["width"] == str(defaults["width"])  # trained with --epochs 10


def test_train_classifier_is_the_documented_recipe(tmp_path):
    """AdamW (weight decay 5e-4) under a one-cycle schedule (20% warm-up), label smoothing 0.05,
    random shifts of up to 2 pixels, a seeded permutation each epoch: rebuilt step by step."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    _toy_idx(tmp_path, n_train=40)
    out = tmp_path / "cls.safetensors"
    train_classifier("mnist", tmp_path, out, epochs=2, batch_size=8, lr=2e-3, width=4, seed=3, log=lambda _: None)

    torch.manual_seed(3)
    xtr, ytr = load_split(tmp_path, "train")
    x, y = to_classifier_input(xtr), torch.from_numpy(ytr)
    model = EvalCNN(width=4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=10, pct_start=0.2)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        model.train()
        for idx in torch.randperm(40, generator=g).view(5, 8):
            loss = F.cross_entropy(model(_random_shift(x[idx], 2, g)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    saved = load_file(str(out))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)
