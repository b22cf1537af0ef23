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
    assert f([0.1, 2.0, 500.0]) == pytest.approx(200 * np.array([0.1, 2.0, 500.0]) ** -0.37, rel=1e-9)  # the fitted law


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


def synthetic(rng, a=-0.4, c=5.0, sigma=0.1, n=10):
    x = np.geomspace(1, 1000, n)
    return x, c * x**a * np.exp(sigma * rng.normal(size=n))


def test_fit_recovers_exponent_and_constant_with_a_covering_ci():
    a, c, sigma, n = -0.4, 5.0, 0.1, 10
    x, y = synthetic(np.random.default_rng(3), a, c, sigma, n)
    f = fit_power_law(x, y, seed=0)
    # The OLS slope's sd is sigma / sd(log x) / sqrt(n); the intercept's (at log x = 0, the edge of
    # the data) is about sigma * sqrt(1/n + mean(log x)^2 / Sxx). Allow 4 of each.
    lx = np.log(x)
    sxx = ((lx - lx.mean()) ** 2).sum()
    sd_b, sd_loga = sigma / np.sqrt(sxx), sigma * np.sqrt(1 / n + lx.mean() ** 2 / sxx)
    assert abs(f.b - a) < 4 * sd_b
    assert abs(np.log(f.a) - np.log(c)) < 4 * sd_loga
    assert f.b_lo < f.b < f.b_hi and f.b_lo <= a <= f.b_hi
    assert 2 * f.b_stderr < f.b_hi - f.b_lo < 8 * f.b_stderr  # about 2 x 1.96 standard errors wide
    assert f.resamples > 1900 and f.r == pytest.approx(np.corrcoef(lx, np.log(y))[0, 1]) and f.r < -0.95
    assert fit_power_law(x, y, seed=0) == f  # the seed fixes the interval
    assert fit_power_law(x, y, seed=1).b_lo != f.b_lo


def test_bootstrap_ci_covers_the_truth_in_most_datasets():
    rng = np.random.default_rng(0)
    covered = [f.b_lo <= -0.4 <= f.b_hi
               for f in (fit_power_law(*synthetic(rng), resamples=300, seed=i) for i in range(200))]
    assert 0.85 <= np.mean(covered) <= 0.99  # a percentile pairs bootstrap at n=10 covers about 90%


def test_grouped_bootstrap_resamples_grid_points():
    from ditlab.eval.scaling import fit_grouped

    rng = np.random.default_rng(5)
    x = np.repeat(np.geomspace(1, 1000, 6), 3)  # 3 seeds per grid point
    y = 5 * x**-0.4 * np.exp(0.1 * rng.normal(size=x.size))
    g, plain = fit_grouped(x, y, groups=x, seed=0), fit_power_law(x, y, seed=0)
    assert (g.a, g.b, g.r2, g.n) == (plain.a, plain.b, plain.r2, plain.n)  # same point estimate
    assert g.b_lo <= -0.4 <= g.b_hi and g.b_lo != plain.b_lo
    # the bootstrap settings reach it: a 50% interval is narrower, resamples=0 skips the bootstrap
    half = fit_grouped(x, y, groups=x, seed=0, ci=0.5, resamples=500)
    assert g.b_lo < half.b_lo <= half.b_hi < g.b_hi and (half.ci, half.resamples) == (0.5, 500)
    assert fit_grouped(x, y, groups=x, resamples=0).resamples == 0
    with pytest.raises(DitlabError, match="one label per point"):
        fit_grouped(x, y, groups=x[:-1])


def test_too_few_points_is_one_line_error():
    for x, y in (([1, 2], [3, 4]), ([1, 2, 2, 1], [3, 4, 5, 6]), ([5], [1])):
        with pytest.raises(DitlabError, match="at least 3 distinct x") as e:
            fit_power_law(x, y)
        assert "\n" not in str(e.value)
    fit_power_law([1, 2, 3], [3, 2, 1])  # 3 are enough


def test_scaling_cli_prints_ci_and_refuses_two_rows(tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    csv.write_text("gflops,fid\n" + "".join(f"{g},{30 * g ** -0.5 * (1.05 if i % 2 else 0.95)}\n"
                                            for i, g in enumerate((1, 2, 4, 8, 16, 32))))
    assert main(["scaling", "--csv", str(csv), "--resamples", "500", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "95% CI of b" in out and "500 resamples" in out
    f = fit_power_law(*np.loadtxt(csv, delimiter=",", skiprows=1).T, resamples=500, seed=1)
    assert f"[{f.b_lo:.4f}, {f.b_hi:.4f}]" in out
    two = tmp_path / "two.csv"
    two.write_text("gflops,fid\n1,30\n10,15\n")
    assert main(["scaling", "--csv", str(two)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 distinct gflops" in err
