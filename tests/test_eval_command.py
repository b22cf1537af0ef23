"""`ditlab eval` end to end: sample files, checkpoints, reference files and bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ditlab.cli import main

DATA = Path(os.environ.get("DITLAB_DATA", "../shared/data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
HAS_MNIST = (DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


def embedded(n: int):
    from ditlab.data.mnist import load_embedded_mnist

    images, labels = load_embedded_mnist()
    idx = torch.arange(0, 5000, 5000 // n)[:n]
    return images[idx].permute(0, 2, 3, 1).numpy(), labels[idx].numpy()


def test_class_accuracy_and_counts_from_npz(tmp_path, capsys):
    images, labels = embedded(200)
    np.savez(tmp_path / "s.npz", arr_0=images, labels=labels)
    out = tmp_path / "m.json"
    grid = tmp_path / "grid.png"
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--dataset", "mnist",
                 "--metrics", "class_acc,counts", "--out", str(out), "--grid", str(grid)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["class_acc"] >= 0.98
    assert sum(m[f"count_{c}"] for c in range(10)) == 200
    assert abs(m["count_3"] - 20) <= 3  # 20 of each class
    assert "class_acc" in capsys.readouterr().out and grid.exists()


@pytest.mark.skipif(not HAS_MNIST, reason="shared MNIST not present")
def test_classifier_fid_real_vs_noise_with_floor(tmp_path):
    images, labels = embedded(300)
    np.savez(tmp_path / "real.npz", arr_0=images, labels=labels)
    noise = np.random.default_rng(0).integers(0, 256, images.shape).astype(np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise, labels=labels)
    res = {}
    for name in ("real", "noise"):
        assert main(["eval", "--samples", str(tmp_path / f"{name}.npz"), "--dataset", "mnist", "--data",
                     str(DATA / "mnist"), "--metrics", "cls_fid,cls_pr", "--max-ref", "1000", "--out", str(tmp_path / f"{name}.json")]) == 0
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    real, floor = res["real"]["metrics"], res["real"]["floor"]
    # Real digits score like the floor (real train images); noise is far away and off-manifold.
    assert real["cls_fid"] < 3 * floor["cls_fid"] + 1
    assert res["noise"]["metrics"]["cls_fid"] > 20 * real["cls_fid"]
    assert real["cls_precision"] > 0.6 and res["noise"]["metrics"]["cls_precision"] < 0.05


class FakeInception(nn.Module):
    """Stands in for the 95 MB Inception: same output dict, tiny random projections."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.p = nn.Parameter(torch.randn(3 * 8 * 8, 16, generator=g))
        self.fc = nn.Linear(16, 1008)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear").flatten(1)
        f = x @ self.p
        return {"pool3": f, "spatial": f[:, :7] ** 2, "logits": self.fc(f)}


def test_inception_metrics_wiring(tmp_path, monkeypatch, capsys):
    import ditlab.commands.eval as eval_command

    monkeypatch.setattr(eval_command, "load_inception", lambda path: FakeInception().eval())
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    np.savez(tmp_path / "adm_ref.npz", arr_0=imgs)  # ADM-style reference batch: images only
    # 1) reference statistics from images; 2) samples vs those statistics and vs the batch.
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--inception", "x.pth",
                 "--save-ref", str(tmp_path / "ref.npz")]) == 0
    ref = np.load(tmp_path / "ref.npz")
    assert set(ref.files) == {"mu", "sigma", "mu_s", "sigma_s"} and ref["sigma"].shape == (16, 16)
    for reference in ("ref.npz", "adm_ref.npz"):
        out = tmp_path / f"{reference}.json"
        metrics = "fid,sfid,is" if reference == "ref.npz" else "fid,sfid,is,pr"
        assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--inception", "x.pth", "--ref",
                     str(tmp_path / reference), "--metrics", metrics, "--out", str(out)]) == 0
        m = json.loads(out.read_text())["metrics"]
        assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6 and m["is"] >= 1.0  # same images
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    capsys.readouterr()
    # Precision/recall needs reference images, not only statistics.
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--inception", "x.pth", "--ref",
                 str(tmp_path / "ref.npz"), "--metrics", "pr"]) == 2
    assert "reference images" in capsys.readouterr().err


def _run_eval(args, capsys):
    code = main(["eval", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    good = np.zeros((4, 28, 28, 1), np.uint8)
    cases = {
        "nan.npz": (dict(arr_0=np.full((4, 28, 28, 1), np.nan, np.float32)), ["--dataset", "mnist"], "NaN"),
        "range.npz": (dict(arr_0=np.full((4, 28, 28, 1), 200.0, np.float32)), ["--dataset", "mnist"], "[-1, 1]"),
        "size.npz": (dict(arr_0=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4)), ["--dataset", "mnist"], "28x28"),
        "one.npz": (dict(arr_0=good[:1], labels=np.zeros(1)), ["--dataset", "mnist", "--metrics", "cls_fid",
                                                                "--data", str(DATA / "mnist")], "at least"),
        "nolabels.npz": (dict(arr_0=good), ["--dataset", "mnist", "--metrics", "class_acc"], "label"),
        "noref.npz": (dict(arr_0=good), ["--metrics", "fid", "--inception", str(tmp_path / "pt_inception.pth")],
                      "pt_inception-2015-12-05"),
        "badmetric.npz": (dict(arr_0=good), ["--metrics", "fidd"], "unknown metric"),
    }
    for name, (arrays, extra, message) in cases.items():
        if name == "one.npz" and not HAS_MNIST:
            continue
        np.savez(tmp_path / name, **arrays)
        code, err = _run_eval(["--samples", str(tmp_path / name), *extra], capsys)
        assert code == 2, name
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, (name, err)
    code, err = _run_eval(["--samples", str(tmp_path / "missing.npz")], capsys)
    assert code == 2 and "not found" in err


def test_eval_checkpoint_samples_and_evaluates(tmp_path, capsys):
    pytest.importorskip("ditlab.models.dit")
    from ditlab.config import load_config
    from ditlab.models import build_model
    from ditlab.train.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                             "objective.kind=flow", "sample.sampler=euler", "sample.steps=2", "data.source=mnist"])
    model = build_model(cfg)
    sd = model.state_dict()
    save_checkpoint(tmp_path / "run", 10, sd, sd, {"step": 10}, cfg)
    out = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--num-samples", "20", "--metrics", "class_acc,counts",
                 "--batch-size", "10", "--out", str(out), "--save-samples", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["dataset"] == "mnist" and res["num_samples"] == 20
    saved = np.load(tmp_path / "s.npz")
    assert saved["arr_0"].shape == (20, 28, 28, 1) and list(saved["labels"]) == [i % 10 for i in range(20)]
    # An untrained model scores anything; what is checked is that the metrics are those of the
    # saved samples and labels, as the evaluator CNN classifies them.
    from ditlab.eval.classifier import classifier_outputs, load_classifier

    predicted = classifier_outputs(load_classifier("mnist"), saved["arr_0"])[0].argmax(1).numpy()
    assert res["metrics"]["class_acc"] == float((predicted == saved["labels"]).mean())
    assert [res["metrics"][f"count_{c}"] for c in range(10)] == np.bincount(predicted, minlength=10).tolist()
    capsys.readouterr()
    # Missing Inception weights fail before any sampling.
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--metrics", "fid", "--ref", "r.npz",
                 "--inception", str(tmp_path / "none.pth"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "sampling" not in captured.out and "pt_inception" in captured.err
    # A sampler typo or an unavailable device is an error, not a silent fallback.
    for flags, message in ((["--sampler", "heum"], "unknown sampler 'heum'"), (["--device", "tpu"], "--device")):
        assert main(["eval", "--ckpt", str(tmp_path / "run"), "--num-samples", "2", "--metrics", "counts",
                     "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
