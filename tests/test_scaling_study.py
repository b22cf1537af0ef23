"""Findings 19/20 (DiT scaling): the spec keys they use, the analysis on synthetic grids with known
answers, and the smoke profile end to end through the CLI."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest

from ditlab.cli import main
from ditlab.config import Config
from ditlab.errors import DitlabError
from ditlab.experiments import scaling_study
from ditlab.experiments.specs import arm_config, check_finding, load_findings, load_suite, parse_finding
from ditlab.experiments.suite import Unit, plan

STEPS = [25, 50, 100]  # evaluated at 1/4, 1/2 and all of the budget
BATCH = 32


def arm(gflops, fids, *, hidden=64, depth=2, heads=2, patch=4, params=None, var=0.25, name="DiT-S/4"):
    """A fake arm as pages._arm_values gives it: `fids` is one curve (FID per evaluated step) per seed."""
    cfg = Config()
    m = cfg.model
    m.name, m.hidden_size, m.depth, m.num_heads, m.patch_size = name, hidden, depth, heads, patch
    if name == "unet":
        m.hidden_size = m.depth = m.num_heads = m.patch_size = None
    cfg.optim.batch_size = BATCH
    unit = Unit("k", cfg, True, None, list(STEPS), 60000)
    train = {"fwd_gflops": gflops, "params": params or hidden * hidden * depth * 12}
    seeds = {s: {"points": {st: {"fid": f, "fid_var": var} for st, f in zip(STEPS, curve)}, "train": train, "unit": "k",
                 "eval": "e"} for s, curve in enumerate(fids)}
    return {"seeds": seeds, "unit": unit, "eval": {}}


def finding(claims):
    return parse_finding({"id": "99", "title": "t", "claim": "c", "source": "s", "recipe": "flow", "arms": {"a": {}},
                          "analysis": {"kind": "scaling", "claims": claims}})


def analyse(claims, arms, tmp_path):
    _, profiles = load_suite()
    return scaling_study.analyse(finding(claims), profiles["cpu"], arms, tmp_path, [])


def law(exponent, rng, sigma=0.03, detrend=False, sizes=((64, 2, 2), (96, 3, 3), (128, 4, 4)), patches=(7, 4, 2)):
    """A 3 x 3 grid whose final FID is 100 * Gflops^exponent times log-normal noise (`detrend`:
    noise without a trend in log Gflops, so that the fitted exponent is exactly `exponent`)."""
    g = np.array([0.002 * (i + 1) ** 2.5 * (28 // p) ** 2 for i in range(len(sizes)) for p in patches])
    noise, lg = sigma * rng.normal(size=g.size), np.log(g)
    if detrend:
        noise -= np.polyfit(lg, noise, 1)[0] * (lg - lg.mean())
    ends = iter(100 * g**exponent * np.exp(noise))
    gs = iter(g)
    return {f"{h}-{p}": arm(next(gs), [[(e := next(ends)) * 1.6, e * 1.2, e]], hidden=h, depth=d, heads=n, patch=p)
            for h, d, n in sizes for p in patches}


def test_power_law_verdicts_follow_the_exponent(tmp_path):
    rng = np.random.default_rng(0)
    falling = analyse(["power_law"], law(-0.3, rng), tmp_path)
    assert falling["verdict"] == "reproduces"
    (r,) = falling["results"]
    assert r["claim"] == "power_law" and r["fit"]["b"] == pytest.approx(-0.3, abs=0.05)
    assert r["fit"]["b_hi"] < 0 and r["effects"][0]["low"] > 0  # oriented: positive = as claimed
    assert analyse(["power_law"], law(0.3, rng), tmp_path)["verdict"] == "contradicts"
    flat = analyse(["power_law"], law(0.0, rng, sigma=0.2, detrend=True), tmp_path)
    assert flat["verdict"] == "inconclusive"
    assert flat["results"][0]["fit"]["b"] == pytest.approx(0, abs=1e-9)
    assert flat["results"][0]["fit"]["b_lo"] < 0 < flat["results"][0]["fit"]["b_hi"]
    assert {"scaling_gflops.png", "scaling_compute.png"} <= set(falling["figures"])
    assert (tmp_path / "scaling_gflops.png").read_bytes()[:4] == b"\x89PNG"
    details = json.loads((tmp_path / "scaling.json").read_text())
    assert len(details["points"]) == 9 and details["parts"]["power_law"]["verdict"] == "inconclusive"


def test_power_law_groups_seeds_and_waits_for_missing_arms(tmp_path):
    arms = law(-0.3, np.random.default_rng(1))
    first = next(iter(arms.values()))
    first["seeds"][1] = copy.deepcopy(first["seeds"][0])  # a second seed of one grid point
    r = analyse(["power_law"], arms, tmp_path)["results"][0]
    assert r["grouped"] and r["fit"]["n"] == 10
    del first["seeds"][1]["points"][STEPS[-1]]  # that seed has not finished
    out = analyse(["power_law"], arms, tmp_path)
    assert out["verdict"] == "pending" and out["results"][0]["pending"] == [next(iter(arms))]


def curve(c0, gflops, exponent=-0.3):
    """FID at each evaluated step of a model whose FID is c0 * (training Gflops / 9600)^exponent."""
    return [c0 * (3 * gflops * s * BATCH / 9600) ** exponent for s in STEPS]


def test_matched_compute_interpolates_in_log_log():
    large = scaling_study.points_of({"L": arm(3.0, [curve(150, 3.0)])})[0]
    c = 3 * 1.0 * STEPS[-1] * BATCH  # where a model of 1 Gflops ends
    (fid,), (var,) = large.at(c)
    assert fid == pytest.approx(150 * (c / 9600) ** -0.3)  # a power law is a line in log-log: exact
    assert 0 < var < 1 and large.at(c / 10) is None and large.at(large.compute(STEPS[-1]) * 2) is None


@pytest.mark.parametrize("c_large, expected", [(150, "reproduces"), (260, "contradicts"), (200, "inconclusive")])
def test_compute_efficiency_verdicts(tmp_path, c_large, expected):
    noise = [0.99, 1.0, 1.01]
    arms = {"S": arm(1.0, [np.multiply(curve(200, 1.0), k) for k in noise], hidden=64),
            "B": arm(3.0, [np.multiply(curve(c_large, 3.0), k) for k in noise], hidden=96, depth=3, heads=3)}
    out = analyse(["compute_efficiency"], arms, tmp_path)
    assert out["verdict"] == expected
    (pair,) = out["results"][0]["pairs"]
    assert pair["better"] == "B" and pair["other"] == "S" and pair["compute"] == pytest.approx(3 * 1.0 * 100 * BATCH)


def test_compute_efficiency_needs_overlapping_curves(tmp_path):
    arms = {"S": arm(1.0, [curve(200, 1.0)]), "XL": arm(10.0, [curve(50, 10.0)], hidden=192, depth=6, heads=6)}
    out = analyse(["compute_efficiency"], arms, tmp_path)
    assert out["verdict"] == "inconclusive" and "overlap" in out["results"][0]["pairs"][0]["note"]


def test_patch_vs_params_and_the_unet_context(tmp_path):
    def grid(fid_s2):
        return {"S4": arm(5.6, [[60, 50, 40]], patch=4, params=184_000),
                "S2": arm(29.0, [[40, 30, fid_s2]], patch=2, params=192_000),
                "B4": arm(18.0, [[50, 40, 30]], hidden=96, depth=3, heads=3, patch=4, params=564_000),
                "unet": arm(19.0, [[80, 70, 60]], name="unet", params=1_200_000)}

    out = analyse(["patch_vs_params"], grid(25.0), tmp_path)
    assert out["verdict"] == "reproduces"
    (pair,) = out["results"][0]["pairs"]
    assert (pair["base"], pair["halved_patch"], pair["grown_model"]) == ("S4", "S2", "B4")
    assert analyse(["patch_vs_params"], grid(45.0), tmp_path)["verdict"] == "contradicts"
    # a larger model more than 2x the finer patch's Gflops away is no matched comparison
    far = grid(25.0)
    far["B4"] = arm(70.0, [[50, 40, 30]], hidden=96, depth=3, heads=3, patch=4, params=564_000)
    (tmp_path / "far").mkdir()
    (res,) = analyse(["patch_vs_params"], far, tmp_path / "far")["results"]
    assert res["verdict"] == "inconclusive" and res["pairs"] == []
    # the U-Net is no grid point; its comparison is context, not part of the verdict
    assert [r["claim"] for r in out["results"]] == ["patch_vs_params"]
    assert "**unet_vs_dit** (context)" in "\n".join(out["lines"])
    unet = json.loads((tmp_path / "scaling.json").read_text())["parts"]["unet_vs_dit"]
    assert unet["pairs"][0]["better"] == "B4" and unet["verdict"] == "reproduces"


BASE = {"id": "99", "title": "t", "claim": "c", "source": "s", "recipe": "flow",
        "arms": {"S4": {"model.hidden_size": 64, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 4}}}


def test_analysis_findings_need_no_expectations():
    recipes, profiles = load_suite()
    f = parse_finding({**BASE, "analysis": "scaling"})
    check_finding(f, recipes, profiles)
    assert f.analysis == "scaling" and f.analysis_claims == ["power_law", "patch_vs_params", "compute_efficiency"]
    for bad in ({}, {"expect": []}):
        with pytest.raises(DitlabError, match="expect"):
            parse_finding({**BASE, **bad})
    with pytest.raises(DitlabError, match="analysis claims"):
        parse_finding({**BASE, "analysis": {"kind": "scaling", "claims": ["bigger_is_better"]}})
    with pytest.raises(DitlabError, match="unknown analysis"):
        parse_finding({**BASE, "analysis": "vibes"})
    with pytest.raises(DitlabError, match="points"):
        parse_finding({**BASE, "analysis": "scaling", "points": [0, 1]})
    with pytest.raises(DitlabError, match="seed_arms"):
        check_finding(parse_finding({**BASE, "analysis": "scaling", "seed_arms": ["XL2"]}), recipes, profiles)


def test_seed_arms_points_and_shared_units(tmp_path):
    recipes, profiles = load_suite()
    findings = load_findings()
    f19, f20 = findings["19"], findings["20"]
    for f in (f19, f20):
        check_finding(f, recipes, profiles)
    units, runs = plan([f19, f20], profiles["smoke"], recipes, 3, tmp_path)
    seeds = {(r.finding, r.arm): 0 for r in runs}
    for r in runs:
        seeds[r.finding, r.arm] += 1
    assert seeds == {**{("19", a): 1 for a in ("S4", "S2", "B2")}, ("19", "B4"): 3,
                     **{("20", a): 1 for a in ("S4", "S2", "B2", "unet")}, ("20", "B4"): 3}
    assert len(units) == 7  # finding 20 trains only its U-Net: the grid's units are finding 19's
    assert all(u.points == [1, 2, 4] and u.cfg.train.ckpt_every == 1 for u in units.values())
    # the budget is rounded up so that 1/4, 1/2 and 1 of it are whole steps and checkpoints
    units, _ = plan([f19], dataclasses.replace(profiles["smoke"], budget={"steps": 563}), recipes, 1, tmp_path)
    assert {tuple(u.points) for u in units.values()} == {(141, 282, 564)}
    assert {u.cfg.train.ckpt_every for u in units.values()} == {141}
    assert arm_config(f19, "XL4", profiles["cpu"], recipes)[0].data.source == "fashion-mnist"


def test_smoke_profile_end_to_end(tmp_path, capsys):
    assert main(["reproduce", "19", "20", "--profile", "smoke", "--out", str(tmp_path)]) == 0
    assert len(list((tmp_path / "units").glob("*.json"))) == 5  # 4 grid points, shared, and the U-Net
    for fid, claims in (("19", ["power_law", "patch_vs_params"]), ("20", ["compute_efficiency"])):
        folder = tmp_path / f"finding_{fid}"
        for name in ("report.md", "results.json", "scaling.json", "scaling_gflops.png", "scaling_compute.png"):
            assert (folder / name).is_file(), name
        results = json.loads((folder / "results.json").read_text())
        assert [r["claim"] for r in results["expectations"]] == claims
        assert results["verdict"] in ("reproduces", "contradicts", "inconclusive")
        page = (folder / "report.md").read_text()
        assert "## Scaling analysis" in page and "![scaling_compute.png](scaling_compute.png)" in page
    assert "(unet_vs_dit" not in (tmp_path / "REPORT.md").read_text()  # context, not a verdict
    capsys.readouterr()
    js = tmp_path / "fit.json"
    assert main(["scaling", "--suite", str(tmp_path), "--finding", "20", "--json", str(js)]) == 0
    assert "unet: a U-Net, not a grid point" in capsys.readouterr().out
    fit = json.loads(js.read_text())["finding 20"]
    assert fit["n"] == 4 and math.isfinite(fit["b"])
    assert main(["scaling", "--suite", str(tmp_path / "nowhere")]) == 2
