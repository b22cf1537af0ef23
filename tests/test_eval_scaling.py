"""Power-law fits recover known exponents; the CLI plots and reports them."""

import json

import numpy as np
import pytest
from scipy.optimize import curve_fit

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.eval.scaling import fit_power_law


def test_recovers_exact_power_law():
    x = np.geomspace(0.3, 120, 12)
    f = fit_power_law(x, 200 * x**-0.37)
    assert f.b == pytest.approx(-0.37, abs=1e-10) and f.a == pytest.approx(200, rel=1e-10)
    assert f.r2 == pytest.approx(1.0)


def test_noisy_fit_agrees_with_curve_fit():
    rng = np.random.default_rng(0)
    x = np.geomspace(1, 1000, 40)
    y = 50 * x**-0.5 * np.exp(0.05 * rng.normal(size=x.size))  # multiplicative noise
    f = fit_power_law(x, y)
    assert abs(f.b + 0.5) < 3 * f.b_stderr + 1e-3 and 0.95 < f.r2 < 1
    (a, b), _ = curve_fit(lambda x, a, b: a * x**b, x, y, p0=(10, -0.3))  # least squares in y-space
    assert f.b == pytest.approx(b, abs=0.03) and f.a == pytest.approx(a, rel=0.15)


def test_bad_inputs():
    with pytest.raises(DitlabError, match="positive"):
        fit_power_law([1, 2], [1, -1])
    with pytest.raises(DitlabError, match="distinct"):
        fit_power_law([1, 1], [1, 2])


def test_scaling_cli(tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    lines = ["model,gflops,fid"]
    for model, a in [("S", 80), ("B", 60)]:
        for g in (1, 10, 100):
            lines.append(f"{model},{g},{a * g ** -0.3}")
    csv.write_text("\n".join(lines) + "\n")
    png, js = tmp_path / "p.png", tmp_path / "f.json"
    assert main(["scaling", "--csv", str(csv), "--x", "gflops", "--y", "fid", "--group", "model",
                 "--out", str(png), "--json", str(js)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fits = json.loads(js.read_text())
    assert fits["S"]["b"] == pytest.approx(-0.3) and fits["B"]["a"] == pytest.approx(60)
    assert "-0.3000" in capsys.readouterr().out
    assert main(["scaling", "--csv", str(csv), "--y", "loss"]) == 2
    assert "no column 'loss'" in capsys.readouterr().err
