"""benchmarks/bench_gpu.py on the CPU, so that the first GPU lent runs it without surprises: every
variant wired, the table written after every row, honest about the precision, the budget kept,
and MFU = 3 x forward FLOPs x img/s / peak."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compiled = []
    # inductor's compile takes a minute on this CPU; what is tested here is which variants ask for it
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    module.compiled = compiled
    return module


def rows(table: str) -> dict[str, list[str]]:
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "variant" and len(cells) == 6:
            out[cells[0]] = cells[1:]
    return out


def test_every_variant_runs_on_the_cpu_and_the_table_says_what_ran(bench, tmp_path):
    out = tmp_path / "gpu.md"
    argv = ["--device", "cpu", "--model", "DiT-S/8", "--input-size", "8", "--batch", "2", "--steps", "1",
            "--warmup", "0", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "fp32, AdamW" in text and "bf16" not in text.split("MFU against")[0]  # no bf16 on the CPU
    assert f"`python benchmarks/bench_gpu.py {' '.join(argv)}`" in text
    table = rows(text)
    assert list(table) == ["eager", "compiled", "eager, flash", "eager, efficient", "eager, math",
                           "eager, grad checkpointing", "compiled, grad checkpointing"]
    assert len(bench.compiled) == 2  # the two compiled variants, and only they
    for variant, (batch, rate, *_) in table.items():
        assert batch == "2"
        assert rate.startswith("— (") or float(rate) > 0, (variant, rate)  # a rate or the reason there is none
    assert table["eager"][3] == "—"  # no MFU without a peak


def test_mfu_is_three_forward_flops_per_image_over_the_peak(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_steps", lambda *args, **kwargs: 1000.0)  # img/s
    out = tmp_path / "gpu.md"
    assert bench.main(["--device", "cpu", "--model", "DiT-S/8", "--input-size", "32", "--quick",
                       "--peak-tflops", "2", "--out", str(out)]) == 0
    _, rate, tflops, mfu, _ = rows(out.read_text())["eager"]
    # DiT-S/8 at 32x32x4 latents: 0.36 forward Gflops (DiT paper, Table 4); 3x for training
    assert float(rate) == 1000.0 and float(tflops) == pytest.approx(3 * 0.36, abs=3 * 0.005)
    assert float(mfu.rstrip("%")) == pytest.approx(100 * float(tflops) / 2, abs=0.3)


def test_a_run_stopped_from_outside_keeps_the_rows_it_measured(bench, tmp_path, monkeypatch):
    calls = []

    def time_steps(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the second variant is cut short
        return 123.0

    monkeypatch.setattr(bench, "time_steps", time_steps)
    out = tmp_path / "gpu.md"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--model", "DiT-S/8", "--input-size", "8", "--quick", "--out", str(out)])
    table = rows(out.read_text())
    assert list(table) == ["eager"] and table["eager"][:2] == ["32", "123.0"]


def test_the_budget_stops_new_rows_and_no_gpu_is_one_line(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gpu.md"
    assert bench.main(["--device", "cpu", "--model", "DiT-S/8", "--input-size", "8", "--quick",
                       "--budget-s", "0", "--out", str(out)]) == 0
    table = rows(out.read_text())
    assert list(table) == ["eager", "compiled"] and all("past --budget-s 0" in r[1] for r in table.values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device here; nothing was measured") and err.count("\n") == 1
