"""Scaling studies as findings (`analysis: scaling` in a spec): the DiT paper's Fig. 8, Fig. 9 and Table 4.

`analyse` takes a finding's per-arm results (as `pages` gathers them) and judges the claims its
spec names (`analysis: {kind: scaling, claims: [...]}`); `pages.write_finding` merges the results
into the finding's page and `results.json`. It writes `scaling_gflops.png`, `scaling_compute.png`
and `scaling.json` (every number behind them) into the finding's folder.

Conventions
- A grid point is an arm that trains a DiT: its model size is (hidden, depth, heads) (the
  official size of its model name where those are unset), its patch size gives the token count
  (input / patch)^2. Arms with `model.name: unet` are baselines, never grid points.
- Forward Gflops: `fwd_gflops` of the unit's training record (`models/flops.py`): multiply-
  accumulates of one forward pass of one image, attention included, the DiT paper's "Gflops".
- Training Gflops at a checkpoint = 3 x forward Gflops x images seen (step x batch): a backward
  pass costs about two forward passes (the DiT paper's Fig. 9). EMA, optimizer and the evaluation
  sampling are not counted.
- FID is the suite's evaluator-feature FID of the EMA weights (lower is better), with its
  bootstrap sampling variance; per grid point the seeds give a mean, and intervals come from
  `experiments.stats` (seed spread floored by the sampling variance; Welch intervals).

Claims (those named in the spec decide the verdict, together with any `expect` entries):
- `power_law` (Fig. 8, Table 4): FID at the end of training against forward Gflops over the grid
  points, a least-squares line in log-log space (`eval.scaling.fit_power_law`, every seed a point)
  with a 95% percentile-bootstrap CI of the exponent b (grid points resampled whole when they have
  several seeds). Reproduces when the CI lies below 0 (FID falls with Gflops), contradicts when it
  lies above 0, else inconclusive.
- `patch_vs_params`: from each grid point (s, p), *halving the patch* -> (s, p'), the next finer
  patch at the same size, against *growing the model* -> (s', p), the larger size at the same patch
  whose Gflops are closest to those of (s, p') (within a factor 2). Both spend about the same extra
  Gflops, and the difference of their improvements over (s, p) is FID(s', p) - FID(s, p'). The pair
  holds when (s, p'), with fewer parameters, is not worse than (s', p) by more than 10% of
  FID(s', p) (`noninferior`); the claim reproduces when every pair does.
- `compute_efficiency` (Fig. 9): for each patch, each pair of consecutive sizes s < s': at C*, the
  training Gflops where the smaller model's run ends, the larger model's FID (each seed's curve
  interpolated linearly in log compute and log FID between its evaluated points, the sampling
  variance alike) against the smaller model's final FID (`better`: the larger is lower). A pair
  whose larger curve starts after C* cannot be matched and counts as inconclusive.
- `unet_vs_dit`: each U-Net arm against the DiT grid point closest in forward Gflops, at the
  training compute where the cheaper run ends (`better`: the DiT is lower).

The gpu profile of findings 19/20 (runnable, not run here): the official DiT-S/B/L/XL x patch 8/4/2
on ImageNet 256x256 latents (`ditlab extract-latents ... --flip`, at the specs' `data.path`), the
paper's recipe (Gaussian diffusion with learned sigma, AdamW 1e-4, batch 256, EMA 0.9999), set in
the specs' `profiles.gpu.config`; scoring those needs an Inception-FID scorer in the suite.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ditlab.errors import DitlabError
from ditlab.eval.flops import measure
from ditlab.eval.scaling import MIN_DISTINCT_X, fit_power_law
from ditlab.experiments.specs import Finding, Profile
from ditlab.experiments.stats import Effect, arm_stats, combine, effect, judge_better, judge_noninferior, mean_interval
from ditlab.io import figure, save_figure, save_text

MATCH = 2.0  # patch_vs_params: Gflops of the two ways of growing agree within this factor
MARGIN = 0.10  # patch_vs_params: non-inferiority margin, relative to the larger model's FID
STATEMENTS = {
    "power_law": "FID ∝ Gflops^b with b < 0 (power law over the grid)",
    "patch_vs_params": "finer patch, same size ≥ larger size, same patch, at ~equal Gflops (within 10% FID)",
    "compute_efficiency": "larger model has the lower FID at equal training Gflops",
    "unet_vs_dit": "DiT has the lower FID than the U-Net at equal training Gflops",
}


@dataclass
class Point:
    """One arm: a DiT grid point or a U-Net, with each seed's FID curve."""

    name: str
    kind: str  # dit | unet
    size: tuple | None  # DiT: (family, hidden, depth, heads)
    patch: int | None
    tokens: int | None
    gflops: float  # forward, one image
    params: int
    batch: int
    steps: list[int]  # evaluated steps
    curves: dict[int, list[tuple[int, float, float]]]  # seed -> [(step, fid, fid sampling variance)]

    @property
    def size_label(self) -> str:
        family, hidden, depth, heads = self.size
        return f"{hidden}/{depth}/{heads}" if hidden else family

    def compute(self, step: int) -> float:
        """Training Gflops after `step` steps: 3 x forward Gflops x images seen."""
        return 3.0 * self.gflops * step * self.batch

    @property
    def complete(self) -> bool:
        return bool(self.curves) and all(len(c) == len(self.steps) for c in self.curves.values())

    def end(self) -> tuple[list[float], list[float]]:
        return [c[-1][1] for c in self.curves.values()], [c[-1][2] for c in self.curves.values()]

    def at(self, c: float) -> tuple[list[float], list[float]] | None:
        """Per seed (FID, variance) at training compute c; None outside the evaluated range."""
        lx = np.log([self.compute(s) for s in self.steps])
        lc = math.log(c)
        if lc < lx[0] - 1e-9 or lc > lx[-1] + 1e-9:
            return None
        i = int(np.clip(np.searchsorted(lx, lc, side="right") - 1, 0, max(0, len(lx) - 2)))
        w = 0.0 if len(lx) == 1 or lx[i + 1] == lx[i] else float(np.clip((lc - lx[i]) / (lx[i + 1] - lx[i]), 0, 1))
        vals, vars_ = [], []
        for curve in self.curves.values():
            (_, f0, v0), (_, f1, v1) = curve[i], curve[min(i + 1, len(curve) - 1)]
            fid = math.exp((1 - w) * math.log(f0) + w * math.log(f1))
            rel_sd = (1 - w) * math.sqrt(v0) / f0 + w * math.sqrt(v1) / f1  # relative errors, as if correlated
            vals.append(fid)
            vars_.append((rel_sd * fid) ** 2)
        return vals, vars_


def points_of(arms: dict) -> list[Point]:
    """The arms (as `pages._arm_values` gives them) as points, in spec order."""
    points = []
    for name, arm in arms.items():
        unit = arm["unit"]
        m = unit.cfg.model
        trains = [s["train"] for s in arm["seeds"].values() if s.get("train")]
        counted = trains[0] if trains else {}
        if "fwd_gflops" not in counted:
            got = measure(unit.cfg)  # before training: the same counter, on the meta device
            counted = {"fwd_gflops": got["gflops"], "params": got["params"]}
        curves = {}
        for seed, s in sorted(arm["seeds"].items()):
            curves[seed] = [(p, s["points"][p]["fid"], s["points"][p]["fid_var"]) for p in unit.points if p in s["points"]]
        if m.name == "unet":
            kind, size, patch, tokens = "unet", None, None, None
        else:
            patch = m.patch_size or int(m.name.rsplit("/", 1)[1])
            kind, size, tokens = "dit", (m.name.rsplit("/", 1)[0], m.hidden_size, m.depth, m.num_heads), (m.input_size // patch) ** 2
        points.append(Point(name, kind, size, patch, tokens, float(counted["fwd_gflops"]), int(counted["params"]),
                            unit.cfg.optim.batch_size, list(unit.points), curves))
    return points


def _pending(claim: str, names: list[str]) -> dict:
    return {"metric": "fid", "claim": claim, "arms": [STATEMENTS[claim]], "higher_is_better": False,
            "verdict": "pending", "pending": sorted(set(names))}


def _result(claim: str, verdict: str, effects: list, **extra) -> dict:
    return {"metric": "fid", "claim": claim, "arms": [STATEMENTS[claim]], "higher_is_better": False,
            "verdict": verdict, "margin": None, "effects": [e.as_dict() for e in effects], **extra}


# ---- the claims ---------------------------------------------------------------------------------


def power_law(points: list[Point]) -> dict:
    dit = [p for p in points if p.kind == "dit"]
    waiting = [p.name for p in dit if not p.complete]
    if waiting:
        return _pending("power_law", waiting)
    x = [p.gflops for p in dit for _ in p.curves]
    y = [v for p in dit for v in p.end()[0]]
    groups = [p.name for p in dit for _ in p.curves]
    if len(set(x)) < MIN_DISTINCT_X:
        return _result("power_law", "inconclusive", [], note=f"a fit needs {MIN_DISTINCT_X} distinct Gflops, got {len(set(x))}")
    fit = fit_power_law(x, y, groups=groups if len(groups) > len(dit) else None, seed=0)
    verdict = "reproduces" if fit.b_hi < 0 else "contradicts" if fit.b_lo > 0 else "inconclusive"
    e = Effect("−exponent", "0", -fit.b, -fit.b_hi, -fit.b_lo, math.inf, fit.ci)
    return _result("power_law", verdict, [e], fit=asdict(fit), grouped=len(groups) > len(dit))


def patch_pairs(points: list[Point]) -> list[tuple[Point, Point, Point]]:
    """(base (s, p), halved patch (s, p'), grown model (s', p)) for every base that has both."""
    dit = [p for p in points if p.kind == "dit"]
    pairs = []
    for base in dit:
        finer = [p for p in dit if p.size == base.size and p.patch < base.patch]
        grown = [p for p in dit if p.patch == base.patch and p.size != base.size and p.params > base.params]
        if not finer or not grown:
            continue
        fine = max(finer, key=lambda p: p.patch)
        best = min(grown, key=lambda g: abs(math.log(g.gflops / fine.gflops)))
        if abs(math.log(best.gflops / fine.gflops)) <= math.log(MATCH):
            pairs.append((base, fine, best))
    return pairs


def patch_vs_params(points: list[Point]) -> dict:
    pairs = patch_pairs(points)
    waiting = [p.name for trio in pairs for p in trio if not p.complete]
    if waiting:
        return _pending("patch_vs_params", waiting)
    effects, verdicts, rows = [], [], []
    for base, fine, grown in pairs:
        f, g, b = arm_stats(*fine.end()), arm_stats(*grown.end()), arm_stats(*base.end())
        e = effect(f, g, higher_is_better=False, names=(fine.name, grown.name))
        margin = MARGIN * g.mean
        verdicts.append(judge_noninferior(e, margin))
        effects.append(e)
        rows.append({"base": base.name, "halved_patch": fine.name, "grown_model": grown.name, "fid_base": b.mean,
                     "fid_halved_patch": f.mean, "fid_grown_model": g.mean, "gflops": [base.gflops, fine.gflops, grown.gflops],
                     "params": [base.params, fine.params, grown.params], "margin": margin, "verdict": verdicts[-1],
                     "effect": e.as_dict()})
    if not pairs:
        return _result("patch_vs_params", "inconclusive", [], pairs=[],
                       note=f"no grid point has both a finer patch and a larger model within {MATCH:g}x its Gflops")
    return _result("patch_vs_params", combine(verdicts), effects, pairs=rows)


def matched(a: Point, b: Point) -> dict | None:
    """Both points' per-seed FIDs at C*, the training compute where the cheaper run ends; None
    when the other run's curve does not reach down to C*."""
    c = min(a.compute(a.steps[-1]), b.compute(b.steps[-1]))
    va, vb = a.at(c), b.at(c)
    if va is None or vb is None:
        return None
    return {"compute": c, a.name: va, b.name: vb}


def _matched_effects(claim: str, pairs: list[tuple[Point, Point]]) -> dict:
    """`better` over (claimed better, other) pairs at matched training compute."""
    waiting = [p.name for pair in pairs for p in pair if not p.complete]
    if waiting:
        return _pending(claim, waiting)
    effects, verdicts, rows = [], [], []
    for good, other in pairs:
        m = matched(good, other)
        row = {"better": good.name, "other": other.name, "gflops": [good.gflops, other.gflops]}
        if m is None:
            verdicts.append("inconclusive")
            rows.append({**row, "verdict": "inconclusive", "note": "the curves do not overlap in training compute"})
            continue
        e = effect(arm_stats(*m[good.name]), arm_stats(*m[other.name]), higher_is_better=False, names=(good.name, other.name))
        verdicts.append(judge_better(e))
        effects.append(e)
        rows.append({**row, "compute": m["compute"], "fid_better": float(np.mean(m[good.name][0])),
                     "fid_other": float(np.mean(m[other.name][0])), "verdict": verdicts[-1], "effect": e.as_dict()})
    if not pairs:
        return _result(claim, "inconclusive", [], pairs=[], note="no pair of arms to compare")
    return _result(claim, combine(verdicts), effects, pairs=rows)


def compute_efficiency(points: list[Point]) -> dict:
    dit = [p for p in points if p.kind == "dit"]
    pairs = []
    for patch in sorted({p.patch for p in dit}):
        row = sorted([p for p in dit if p.patch == patch], key=lambda p: p.params)
        pairs += [(large, small) for small, large in zip(row, row[1:])]
    return _matched_effects("compute_efficiency", pairs)


def unet_vs_dit(points: list[Point]) -> dict:
    dit = [p for p in points if p.kind == "dit"]
    pairs = [(min(dit, key=lambda d: abs(math.log(d.gflops / u.gflops))), u) for u in points if u.kind == "unet" and dit]
    return _matched_effects("unet_vs_dit", pairs)


CLAIMS = {"power_law": power_law, "patch_vs_params": patch_vs_params, "compute_efficiency": compute_efficiency,
          "unet_vs_dit": unet_vs_dit}


# ---- figures ------------------------------------------------------------------------------------


def _plots(points: list[Point], fit: dict | None, folder: Path) -> list[str]:
    from matplotlib import colormaps

    sizes = sorted({p.size for p in points if p.kind == "dit"}, key=lambda s: min(p.params for p in points if p.size == s))
    patches = sorted({p.patch for p in points if p.kind == "dit"}, reverse=True)
    colours = {s: colormaps["viridis"](i / max(1, len(sizes) - 1) * 0.9) for i, s in enumerate(sizes)}
    markers = dict(zip(patches, "s^o*Dv"))
    styles = dict(zip(patches, [":", "--", "-", "-."]))
    written = []

    with figure(figsize=(6.5, 4.5)) as (fig, ax):
        shown = False
        for p in points:
            if not p.curves or not all(c and c[-1][0] == p.steps[-1] for c in p.curves.values()):
                continue
            mean, half = mean_interval(*p.end())
            colour, marker = ("black", "X") if p.kind == "unet" else (colours[p.size], markers[p.patch])
            label = f"{p.name} (U-Net, not fitted)" if p.kind == "unet" else f"{p.name}: {p.size_label}, patch {p.patch}"
            ax.errorbar([p.gflops], [mean], yerr=[[min(half, mean * 0.99)], [half]], fmt=marker, color=colour, label=label,
                        capsize=3)
            shown = True
        if fit:
            xs = np.geomspace(min(p.gflops for p in points if p.kind == "dit"), max(p.gflops for p in points if p.kind == "dit"), 50)
            ax.plot(xs, fit["a"] * xs ** fit["b"], "-", color="grey",
                    label=f"fit: FID = {fit['a']:.3g}·G^{fit['b']:.3f}, b 95% CI [{fit['b_lo']:.3f}, {fit['b_hi']:.3f}], "
                          f"r = {fit['r']:.2f}")
        if shown:
            ax.set(xscale="log", yscale="log", xlabel="forward Gflops per image", ylabel="FID at the end of training (mean ± 95% CI)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
            written.append(save_figure(fig, folder / "scaling_gflops.png", dpi=100))

    with figure(figsize=(6.5, 4.5)) as (fig, ax):
        shown = False
        for p in points:
            steps = [s for i, s in enumerate(p.steps) if p.curves and all(len(c) > i for c in p.curves.values())]
            if not steps:
                continue
            fids = [np.mean([c[i][1] for c in p.curves.values()]) for i in range(len(steps))]
            x = [p.compute(s) for s in steps]
            if p.kind == "unet":
                ax.plot(x, fids, "X-", color="black", lw=2, label=f"{p.name} (U-Net)")
            else:
                ax.plot(x, fids, marker=markers[p.patch], ls=styles[p.patch], color=colours[p.size],
                        label=f"{p.name}: {p.size_label}, patch {p.patch}")
            shown = True
        if shown:
            ax.set(xscale="log", yscale="log", xlabel="training Gflops (3 x forward x images seen)", ylabel="FID (mean over seeds)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
            written.append(save_figure(fig, folder / "scaling_compute.png", dpi=100))
    return written


# ---- the page -----------------------------------------------------------------------------------


def _ci(e: dict) -> str:
    return f"{e['estimate']:+.3g} [{e['low']:+.3g}, {e['high']:+.3g}]"


def _lines(points: list[Point], parts: dict[str, dict], claimed: list[str]) -> list[str]:
    lines = ["", "## Scaling analysis", "",
             "Forward Gflops: multiply-accumulates of one forward pass of one image (the DiT paper's Gflops); "
             "training Gflops = 3 x forward Gflops x images seen. FID at the end of training, mean ± 95% CI over seeds "
             "(floored by the bootstrap sampling variance). Parts marked *context* are reported, not judged.", "",
             "| arm | model | patch | tokens | params | fwd Gflops | training Gflops (end) | FID (end) | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ends = [c for c in p.curves.values() if c and c[-1][0] == p.steps[-1]]
        fid = "—"
        if ends:
            mean, half = mean_interval([c[-1][1] for c in ends], [c[-1][2] for c in ends])
            fid = f"{mean:.2f} ± {half:.2f}"
        model = "U-Net" if p.kind == "unet" else f"DiT {p.size_label}"
        lines.append(f"| {p.name} | {model} | {p.patch or '—'} | {p.tokens or '—'} | {p.params / 1e6:.2f} M | {p.gflops:.4g} "
                     f"| {p.compute(p.steps[-1]):.3g} | {fid} | {len(ends)}/{len(p.curves)} |")
    for claim, r in parts.items():
        tag = "claim" if claim in claimed else "context"
        lines += ["", f"**{claim}** ({tag}): {STATEMENTS[claim]} → **{r['verdict']}**" +
                  (f" (waiting for {', '.join(r['pending'])})" if r["verdict"] == "pending" else "") + "."]
        if r.get("note"):
            lines.append(f"{r['note']}.")
        if claim == "power_law" and r.get("fit"):
            f = r["fit"]
            lines.append(f"FID = {f['a']:.4g} · Gflops^b with b = {f['b']:.4f}, 95% bootstrap CI [{f['b_lo']:.4f}, {f['b_hi']:.4f}] "
                         f"({f['resamples']} resamples{', grid points resampled whole' if r['grouped'] else ''}), "
                         f"r = {f['r']:.3f}, R² = {f['r2']:.3f}, {f['n']} runs.")
        if claim == "patch_vs_params" and r.get("pairs"):
            lines += ["From each base (s, p): halve the patch → (s, p'); grow the model → (s', p) at about the same Gflops. "
                      "Effect = FID(s', p) − FID(s, p') (positive: the finer patch wins); the pair holds when the effect's "
                      f"95% CI lies above −{MARGIN:.0%} of FID(s', p).", "",
                      "| base | halve patch | grow model | Gflops (base, halved, grown) | params (base, halved, grown) "
                      "| FID base | FID halved | FID grown | effect [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
            for q in r["pairs"]:
                lines.append(f"| {q['base']} | {q['halved_patch']} | {q['grown_model']} | {', '.join(f'{g:.3g}' for g in q['gflops'])} "
                             f"| {', '.join(f'{n / 1e6:.2f} M' for n in q['params'])} | {q['fid_base']:.2f} | {q['fid_halved_patch']:.2f} "
                             f"| {q['fid_grown_model']:.2f} | {_ci(q['effect'])} (margin {q['margin']:.3g}) | {q['verdict']} |")
        if claim in ("compute_efficiency", "unet_vs_dit") and r.get("pairs"):
            lines += ["At C*, the training Gflops where the cheaper run ends, the other run's FID is interpolated in log "
                      "compute and log FID between its evaluated points. Effect = FID(other) − FID(claimed better).", "",
                      "| claimed better | other | C* (training Gflops) | FID better | FID other | effect [95% CI] | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for q in r["pairs"]:
                if "effect" in q:
                    lines.append(f"| {q['better']} | {q['other']} | {q['compute']:.3g} | {q['fid_better']:.2f} | {q['fid_other']:.2f} "
                                 f"| {_ci(q['effect'])} | {q['verdict']} |")
                else:
                    lines.append(f"| {q['better']} | {q['other']} | — | — | — | {q['note']} | {q['verdict']} |")
    return lines


def _overall(finding: Finding, verdicts: list[str]) -> str:
    if "pending" in verdicts:
        return "pending"
    if finding.verdict == "any":
        return ("reproduces" if "reproduces" in verdicts else
                "contradicts" if verdicts and all(v == "contradicts" for v in verdicts) else "inconclusive")
    return combine(verdicts)


def analyse(finding: Finding, profile: Profile, arms: dict, folder: Path, results: list[dict]) -> dict:
    """The scaling claims of `finding` judged on its arms' results (`results`: its `expect` entries'
    results, judged by `pages`). Returns {"verdict", "results" (the claimed parts, expectation-like),
    "figures", "lines" (a markdown section)}; writes scaling.json and the figures into `folder`."""
    if finding.analysis != "scaling":
        raise DitlabError(f"finding {finding.id}: analysis '{finding.analysis}' is not a scaling study")
    points = points_of(arms)
    parts = {c: CLAIMS[c](points) for c in finding.analysis_claims}
    if any(p.kind == "unet" for p in points) and "unet_vs_dit" not in parts:
        parts["unet_vs_dit"] = unet_vs_dit(points)  # for context
    fit = parts["power_law"].get("fit") if "power_law" in parts else None
    if fit is None and any(p.kind == "dit" and p.complete for p in points):
        complete = [p for p in points if p.kind == "dit" and p.complete]
        if len({p.gflops for p in complete}) >= MIN_DISTINCT_X:  # the line for the figure, not judged
            fit = asdict(fit_power_law([p.gflops for p in complete for _ in p.curves], [v for p in complete for v in p.end()[0]]))
    figures = _plots(points, fit, folder)
    claimed = [parts[c] for c in finding.analysis_claims]
    verdict = _overall(finding, [r["verdict"] for r in results] + [r["verdict"] for r in claimed])
    details = {"profile": profile.name, "claims": finding.analysis_claims, "verdict": verdict, "parts": parts,
               "points": [{"arm": p.name, "kind": p.kind, "size": p.size and list(p.size), "patch": p.patch, "tokens": p.tokens,
                           "params": p.params, "fwd_gflops": p.gflops, "batch": p.batch,
                           "curves": {str(s): [[st_, p.compute(st_), f, v] for st_, f, v in c] for s, c in p.curves.items()}}
                          for p in points],
               "columns": "curves: seed -> [step, training Gflops, FID, FID sampling variance]"}
    save_text(folder / "scaling.json", json.dumps(details, indent=1, default=float) + "\n")
    return {"verdict": verdict, "results": claimed, "figures": figures, "lines": _lines(points, parts, finding.analysis_claims)}
