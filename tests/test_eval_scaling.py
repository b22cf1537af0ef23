"""Power-law fits recover known exponents; the CLI plots and reports them."""

import json
import warnings

import numpy as np
import pytest
from scipy.optimize import curve_fit

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.eval.scaling import bootstrap_exponent, fit_power_law, read_csv


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


# --------------------------------------------------------------------------- edge cases, one at a time


def test_each_bad_input_alone_is_refused():
    good = np.array([1.0, 2.0, 4.0])
    for x, y, message in [
        (np.ones((3, 2)) * good[:, None], np.ones((3, 2)), "1-D"),  # equal shapes, but 2-D
        (good, good[:2], "1-D"),
        ([1.0, np.nan, 4.0], good, "NaN"), (good, [1.0, 2.0, np.inf], "NaN"),  # x alone, y alone
        ([0.0, 2.0, 4.0], good, "positive"), (good, [1.0, 0.0, 2.0], "positive"),  # zero is not positive
    ]:
        with pytest.raises(DitlabError, match=message):
            fit_power_law(x, y)
    for kwargs in (dict(resamples=-1), dict(ci=1.0), dict(ci=0.0), dict(ci=1.95)):
        with pytest.raises(DitlabError, match="resamples >= 0 and a level ci"):
            fit_power_law(good, good, **kwargs)


def test_float32_input_is_fitted_and_evaluated_in_float64():
    """float32 values are exact in float64, so the fit of the float32 array and that of the same
    values in float64 agree to the last bit; logs taken in float32 would differ by ~1e-7."""
    x32 = np.geomspace(1.3, 977.0, 9).astype(np.float32)
    y32 = (7.1 * x32.astype(np.float64) ** -0.41 * (1 + 0.05 * np.sin(np.arange(9)))).astype(np.float32)
    f32, f64 = fit_power_law(x32, y32, resamples=200), fit_power_law(x32.astype(np.float64), y32.astype(np.float64),
                                                                      resamples=200)
    assert f32 == f64
    assert bootstrap_exponent(x32, y32, resamples=200) == bootstrap_exponent(x32.astype(np.float64),
                                                                             y32.astype(np.float64), resamples=200)
    values = f64(x32)
    assert values.dtype == np.float64 and np.array_equal(values, f64.a * x32.astype(np.float64) ** f64.b)


def test_bootstrap_defaults_and_degenerate_resamples():
    x, y = np.geomspace(1, 100, 5), np.array([9.0, 5.0, 4.0, 2.5, 2.0])
    assert bootstrap_exponent(x, y) == bootstrap_exponent(x, y, resamples=2000, seed=0, ci=0.95)
    assert fit_power_law(x, y) == fit_power_law(x, y, resamples=2000, seed=0, ci=0.95)
    # x with one value: every resample is degenerate, none is used
    lo, hi, used = bootstrap_exponent([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert np.isnan(lo) and np.isnan(hi) and used == 0
    # one resample is an interval of one slope
    one = fit_power_law(x, y, resamples=1)
    assert one.resamples == 1 and one.b_lo == one.b_hi
    # 3 points: some resamples repeat one x; they are skipped without a division by zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi, used = bootstrap_exponent([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], resamples=500)
    assert 300 < used < 500  # P(one distinct x of 3) = 3/27, so ~444 used
    # a narrow x range (log-range < 1) is fitted like any other
    lo, hi, used = bootstrap_exponent([1.0, 1.2, 1.5, 1.7], [2.0, 1.8, 1.7, 1.5], resamples=100)
    assert used > 80 and lo < hi < 0


def test_bootstrap_percentiles_of_the_resampled_slopes():
    """The CI is the (tail, 100 - tail) percentile pair of the slopes of the finite resamples,
    here recomputed from the same index draws by an independent least-squares fit (np.polyfit)."""
    x, y = np.geomspace(1, 50, 6), np.array([10.0, 6.0, 5.5, 3.0, 2.9, 1.2])
    for ci in (0.95, 0.6):
        lo, hi, used = bootstrap_exponent(x, y, resamples=400, seed=7, ci=ci)
        idx = np.random.default_rng(7).integers(0, 6, size=(400, 6))
        slopes = [np.polyfit(np.log(x[i]), np.log(y[i]), 1)[0] for i in idx if len(set(i)) > 1]
        tail = (1 - ci) / 2 * 100
        assert used == len(slopes)
        np.testing.assert_allclose([lo, hi], np.percentile(slopes, [tail, 100 - tail]), rtol=1e-9)


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_draws_every_point_or_group(grouped):
    """Points 1..3 lie on a line of slope -1, point 0 (group 0) far off it: a bootstrap that never
    drew it would give lo = hi = -1 exactly."""
    x = np.array([1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0]) if grouped else np.array([1.0, 2.0, 4.0, 8.0])
    y = 16 / x
    y[:2 if grouped else 1] *= 8
    lo, hi, _ = bootstrap_exponent(x, y, groups=x if grouped else None, resamples=300)
    assert lo < -1.1 and hi == pytest.approx(-1.0)


def test_grouped_bootstrap_percentiles_of_whole_group_resamples():
    """Groups (in sorted label order) drawn with replacement, each bringing all of its points;
    recomputed from the same draws by np.polyfit. Group b alone lies on a steeper line."""
    x = np.array([1.0, 2.0, 3.0, 6.0, 10.0, 20.0, 40.0])
    y = np.array([20.0, 10.0, 7.0, 1.75, 2.0, 1.0, 0.6])
    groups = np.array(["c", "c", "b", "b", "a", "a", "a"])
    lo, hi, used = bootstrap_exponent(x, y, groups=groups, resamples=300, seed=3, ci=0.8)
    members = {"a": [4, 5, 6], "b": [2, 3], "c": [0, 1]}
    slopes = []
    for pick in np.random.default_rng(3).integers(0, 3, size=(300, 3)):
        idx = sum((members["abc"[j]] for j in pick), [])
        slopes.append(np.polyfit(np.log(x[idx]), np.log(y[idx]), 1)[0])
    assert used == 300  # every group has two distinct x: no resample is degenerate
    np.testing.assert_allclose([lo, hi], np.percentile(slopes, [10, 90]), rtol=1e-9)


def test_read_csv(tmp_path):
    import csv as csv_module

    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:  # csv's own dialect: \r\n line ends, quoted fields
        w = csv_module.writer(f)
        w.writerow(["model", "gflops", "fid"])
        w.writerows([["S\r\n2", 1, 30], ["S\r\n2", 10, 20], ["B", 5, 25]])
    data = read_csv(path, "gflops", "fid", group="model")
    assert list(data) == ["S\r\n2", "B"]  # a quoted line break stays part of its field
    np.testing.assert_array_equal(data["S\r\n2"][0], [1.0, 10.0])
    assert list(read_csv(path, "gflops", "fid")) == ["all"]
    one = tmp_path / "one.csv"
    one.write_text("gflops,fid\n1,2\n")
    for kwargs in (dict(x="gflops", y="loss"), dict(x="gflops", y="fid", group="model")):
        with pytest.raises(DitlabError, match="no column"):
            read_csv(one, **kwargs)
    bad = tmp_path / "bad.csv"
    bad.write_text("gflops,fid\n1,2\n3,x\n")
    with pytest.raises(DitlabError, match="line 3: non-numeric"):
        read_csv(bad, "gflops", "fid")


def test_plot_shows_each_group_and_its_fitted_line(tmp_path, monkeypatch):
    import ditlab.eval.scaling as scaling

    seen = {}

    def keep(fig, path, dpi=90):
        ax = fig.axes[0]
        seen.update(lines=[(ln.get_xdata(), ln.get_ydata(), ln.get_marker(), ln.get_linestyle(), ln.get_color(),
                            ln.get_label()) for ln in ax.get_lines()],
                    scales=(ax.get_xscale(), ax.get_yscale()), labels=(ax.get_xlabel(), ax.get_ylabel()),
                    legend=[t.get_text() for t in ax.get_legend().get_texts()])

    monkeypatch.setattr(scaling, "save_figure", keep)
    xs = np.array([1.0, 10.0, 100.0])
    data = {"S": (xs, 8 * xs ** -0.5), "B": (xs * 2, np.array([3.0, 2.0, 1.0]))}
    fit = fit_power_law(*data["S"], resamples=0)
    scaling.plot_fits(data, {"S": fit}, tmp_path / "p.png", "Gflops", "FID")
    points_s, line_s, points_b = seen["lines"]  # B has no fit: no line for it
    assert np.array_equal(points_s[0], xs) and np.array_equal(points_s[1], data["S"][1])
    assert points_s[2] == "o" and points_s[3] == "None" and points_b[2] == "o" and np.array_equal(points_b[0], xs * 2)
    assert line_s[0][0] == 1.0 and line_s[0][-1] == pytest.approx(100.0) and line_s[3] == "-"
    np.testing.assert_allclose(line_s[1], fit(line_s[0]), rtol=1e-12)
    assert line_s[4] == points_s[4] != points_b[4]  # the line takes its points' colour
    assert seen["legend"] == [f"S: {fit.a:.3g}·x^{fit.b:.3f} (R²={fit.r2:.3f})"]
    assert seen["scales"] == ("log", "log") and seen["labels"] == ("Gflops", "FID")
