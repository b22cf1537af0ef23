"""Findings' pages: per finding `report.md`, `results.json`, curves, loss curves and sample grids,
and `REPORT.md` over all of them, assembled from the units' results files (see `suite`).

Each expectation of a finding becomes a verdict from the statistics (`stats`): per arm the
per-seed values at the stated point of training, the sampling variance of each value as a floor
under the seed spread, a Welch interval of the difference (paired by seed when both arms sample
the same trained models). A finding reproduces when all its expectations do (`verdict: any`: when
one reading does), contradicts when one contradicts (`any`: when all do), and is otherwise
inconclusive; `pending` until every arm has its results.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from ditlab.config import is_language_model
from ditlab.experiments import scaling_study
from ditlab.experiments.specs import METRICS, Finding, Profile, split_point
from ditlab.experiments.stats import arm_stats, binomial_variance, combine, mean_interval, verdict
from ditlab.experiments.suite import EVALUATOR_DATA, ArmRun, Unit, point_step, read_record
from ditlab.io import figure, save_figure, save_text

METRIC_NAMES = {"acc": "class accuracy", "fid": "FID (evaluator features)", "psnr": "tokenizer PSNR (dB)",
                "bpb": "bits per byte (validation)"}
COLUMN = {"acc": "acc", "fid": "FID", "bpb": "bpb"}


def curve_metrics(arms: dict) -> list[str]:
    """The metrics measured along training: bits per byte for byte LMs; FID for images, and class
    accuracy where the evaluator CNN scored them (MNIST, Fashion-MNIST; not Inception-scored data)."""
    if any(is_language_model(a["unit"].cfg) for a in arms.values()):
        return ["bpb"]
    return ["acc", "fid"] if all(a["unit"].cfg.data.source in EVALUATOR_DATA for a in arms.values()) else ["fid"]


def _arm_values(finding: Finding, arm_runs: list[ArmRun], units: dict[str, Unit], out: Path) -> dict:
    """{arm: {"seeds": {seed: {"points": {step: metrics}, "train": {...}, "psnr": (value, var)}}, "unit": Unit}}"""
    arms: dict[str, dict] = {}
    for ar in arm_runs:
        if ar.finding != finding.id:
            continue
        unit = units[ar.unit]
        entry = arms.setdefault(ar.arm, {"seeds": {}, "unit": unit, "eval": unit.evals[ar.eval]})
        record = read_record(out, ar.unit) or {}
        seed = {"points": {int(p): m for p, m in record.get("evals", {}).get(ar.eval, {}).get("points", {}).items()},
                "train": record.get("train"), "unit": ar.unit, "eval": ar.eval}
        tok = read_record(out, ar.tokenizer) if ar.tokenizer else None
        if tok:
            seed["psnr"] = (tok["psnr"], tok["psnr_var"])
        if record.get("memory_use"):
            seed["memory_use"] = record["memory_use"]
        entry["seeds"][ar.seed] = seed
    return arms


def _values(arm: dict, metric: str, step: int | None) -> tuple[list[float], list[float]] | None:
    """Per-seed values and sampling variances of a metric at a step; None while any is missing."""
    vals, vars_ = [], []
    for seed in arm["seeds"].values():
        if metric == "psnr":
            if "psnr" not in seed:
                return None
            v, var = seed["psnr"]
        else:
            m = seed["points"].get(step)
            if m is None or metric not in m:
                return None
            # an accuracy's sampling variance follows from it and the sample count
            v = m[metric]
            var = binomial_variance(v, m["n"]) if metric == "acc" else m[f"{metric}_var"]
        vals.append(v)
        vars_.append(var)
    return (vals, vars_) if vals else None


def judge(finding: Finding, profile: Profile, arms: dict) -> tuple[str, list[dict]]:
    """The finding's verdict and each expectation's result."""
    results = []
    for e in finding.expectations_for(profile.name):
        higher = METRICS[e.metric]
        stats_by_name, pending = {}, []
        for name in e.arms:
            arm, frac = split_point(name)
            step = point_step(arms[arm]["unit"].cfg.train.steps, frac)
            got = _values(arms[arm], e.metric, step)
            if got is None:
                pending.append(name)
            else:  # the unit behind each seed: arms sampled from the same models are compared paired
                stats_by_name[name] = arm_stats(*got, models=[s["unit"] for s in arms[arm]["seeds"].values()])
        result = {"metric": e.metric, "claim": e.claim, "arms": e.arms, "higher_is_better": higher}
        if pending:
            result.update(verdict="pending", pending=pending)
        else:
            margin = e.margin
            if e.relative_margin is not None:
                margin = e.relative_margin * abs(stats_by_name[e.arms[-1]].mean)
            v = verdict(e.claim, stats_by_name, e.arms, higher_is_better=higher, margin=margin)
            result.update(v.as_dict())
            result["arm_values"] = {n: s.values for n, s in stats_by_name.items()}
        results.append(result)
    parts = [r["verdict"] for r in results]
    if "pending" in parts:
        overall = "pending"
    elif finding.verdict == "any":
        overall = ("reproduces" if "reproduces" in parts else
                   "contradicts" if all(p == "contradicts" for p in parts) else "inconclusive")
    else:
        overall = combine(parts)
    return overall, results


def arms_at_chance(arms: dict) -> dict[str, str]:
    """Image arms whose samples at the end of training are not recognised above chance.

    An arm is at chance when the lower end of the 95% interval of its class accuracy (over seeds,
    floored by the binomial sampling variance) is at or below 1 / classes. Its FID then compares
    samples that do not show their class yet: early training, which claims about trained models
    do not speak of. Returns {arm: "mean ± half-width"}.
    """
    out = {}
    for name, arm in arms.items():
        cfg = arm["unit"].cfg
        if is_language_model(cfg) or cfg.model.num_classes < 2 or cfg.data.source not in EVALUATOR_DATA:
            continue
        got = _values(arm, "acc", cfg.train.steps)
        if got is None:
            continue
        mean, half = mean_interval(*got)
        if mean - half <= 1.0 / cfg.model.num_classes:
            out[name] = f"{mean:.3f} ± {half:.3f}"
    return out


def _statement(r: dict) -> str:
    sign = " > " if r["claim"] in ("better", "ordering") else " ≈ " if r["claim"] == "equivalent" else " ≥ "
    return sign.join(r["arms"])


def _effects_text(r: dict) -> str:
    if r["verdict"] == "pending":
        return f"waiting for {', '.join(r['pending'])}"
    parts = [f"{e['a']} vs {e['b']}: {e['estimate']:+.3g} [{e['low']:+.3g}, {e['high']:+.3g}]" for e in r["effects"]]
    margin = f" (margin ±{r['margin']:.3g})" if r.get("margin") is not None else ""
    return "; ".join(parts) + margin


def _x_axes(unit: Unit, train: dict, steps: list[int]) -> list[tuple[str, list[float], str]]:
    """The two x axes of the curves: epochs and training Gflops for images, steps and wall time for LMs."""
    batch = unit.cfg.optim.batch_size
    if is_language_model(unit.cfg):
        per_step = (train.get("train_s") or float("nan")) / unit.cfg.train.steps
        return [("training step", steps, "linear"), ("training time (s, at the run's mean step rate)",
                                                      [p * per_step for p in steps], "linear")]
    fwd = train.get("fwd_gflops") or float("nan")
    return [("epochs", [p * batch / unit.dataset_images for p in steps], "linear"),
            ("training Gflops (3 x forward x images)", [3 * fwd * p * batch for p in steps], "log")]


def _amount(unit: Unit) -> str:
    """How much data a unit's budget is: epochs of an image set, bytes of a corpus."""
    seen = unit.cfg.train.steps * unit.cfg.optim.batch_size
    if is_language_model(unit.cfg):
        return f"{seen * unit.cfg.model.lm_seq_len / 1e6:.3g} M bytes"
    return f"{seen / unit.dataset_images:.2g} epochs"


def _plot(finding: Finding, arms: dict, folder: Path) -> list[str]:
    written = []
    metrics = curve_metrics(arms)
    # an arm's curve: the points that every seed of it has reached
    complete = {name: [p for p in arm["unit"].points if _values(arm, metrics[0], p) is not None] for name, arm in arms.items()}
    if any(complete.values()):
        with figure(nrows=2, ncols=len(metrics), figsize=(5.5 * len(metrics), 7.5), squeeze=False) as (fig, axes):
            for name, arm in arms.items():
                steps = complete[name]
                if not steps:
                    continue
                unit = arm["unit"]
                train = next(iter(arm["seeds"].values()))["train"] or {}
                axes_x = _x_axes(unit, train, steps)
                for col, metric in enumerate(metrics):
                    mean, half = zip(*[mean_interval(*_values(arm, metric, p)) for p in steps])
                    for row, (label, x, scale) in enumerate(axes_x):
                        ax = axes[row][col]
                        line, = ax.plot(x, mean, marker="o", label=name)
                        ax.fill_between(x, np.subtract(mean, half), np.add(mean, half), color=line.get_color(), alpha=0.2)
                        ax.set(xlabel=label, ylabel=METRIC_NAMES[metric], xscale=scale,
                               yscale="log" if metric in ("fid", "bpb") else "linear")
            axes[0][0].legend(fontsize=8)
            fig.suptitle(f"Finding {finding.id}: {finding.title} (mean ± 95% CI over seeds)", fontsize=10)
            written.append(save_figure(fig, folder / "curves.png"))
    with figure(figsize=(6.5, 4)) as (fig, ax):
        shown = set()
        for name, arm in arms.items():
            units = tuple(sorted(s["unit"] for s in arm["seeds"].values()))
            losses = [s["train"]["loss"] for s in arm["seeds"].values() if s["train"] and s["train"].get("loss")]
            if units in shown or not losses or len(losses) != len(arm["seeds"]):
                continue
            shown.add(units)
            n = min(len(x) for x in losses)
            steps = [row[0] for row in losses[0][:n]]
            ax.plot(steps, np.mean([[row[1] for row in x[:n]] for x in losses], axis=0), label=name)
        if shown:
            ax.set(xlabel="training step", ylabel="training loss (mean over seeds)", yscale="log")
            ax.legend(fontsize=8)
            written.append(save_figure(fig, folder / "loss.png"))
    return written


def memory_use_section(arms: dict, folder: Path) -> tuple[list[str], list[str]]:
    """Byte LMs: bits per byte by segment of the window at the end of training, memory on and reset
    at every segment, mean over seeds with 95% CIs; a figure of both. Returns (report lines, figures)."""
    rows, curves = [], {}
    for name, arm in arms.items():
        uses = [s.get("memory_use") for s in arm["seeds"].values()]
        if not uses or not all(uses):
            continue
        spans = uses[0]["spans"]
        on = np.array([[sp["memory"] for sp in u["spans"]] for u in uses])  # [seeds, spans]
        reset = np.array([[sp["reset"] for sp in u["spans"]] for u in uses]) if "reset" in spans[0] else None
        for i, sp in enumerate(spans):
            cells = [_seed_interval(on[:, i])]
            cells += (["—", "—"] if reset is None else
                      [_seed_interval(reset[:, i]), _seed_interval(reset[:, i] - on[:, i], signed=True)])
            rows.append(f"| {name} | {sp['positions'][0]}-{sp['positions'][1] - 1} | " + " | ".join(cells) + " |")
        centres = [(a + b) / 2 for a, b in (sp["positions"] for sp in spans)]
        curves[name] = (centres, on.mean(0), None if reset is None else reset.mean(0))
    if not rows:
        return [], []
    lines = ["", "## Memory use (end of training)", "",
             "Bits per byte by position in the window on the same validation bytes, with the memory on and reset at "
             "every segment (an Infini model then sees only its own segment; a vanilla model has no memory to reset). "
             "Gain = reset - on: positive where the memory carries context across segments. Mean ± 95% CI over seeds.", "",
             "| arm | bytes | memory on | memory reset | gain |", "|---|---|---|---|---|", *rows]
    with figure(figsize=(6.5, 4)) as (fig, ax):
        for name, (x, on, reset) in curves.items():
            line, = ax.plot(x, on, marker="o", label=f"{name}, memory on")
            if reset is not None:
                ax.plot(x, reset, marker="x", ls="--", color=line.get_color(), label=f"{name}, memory reset")
        ax.set(xlabel="position in the window (bytes, span centre)", ylabel="bits per byte (mean over seeds)")
        ax.legend(fontsize=8)
        return lines, [save_figure(fig, folder / "memory.png")]


def _seed_interval(values: list[float], signed: bool = False) -> str:
    """mean ± 95% CI half-width over seeds (the value alone for one seed)."""
    fmt = "+.4f" if signed else ".4f"
    if len(values) < 2:
        return f"{values[0]:{fmt}}"
    mean, half = mean_interval(values)
    return f"{mean:{fmt}} ± {half:.4f}"


def _fmt(arm: dict, metric: str, step: int | None) -> str:
    got = _values(arm, metric, step)
    if got is None:
        return "—"
    mean, half = mean_interval(*got)
    digits = 2 if metric in ("fid", "psnr") else 3
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _protocol(cfg, ev: dict, reference: dict | None) -> str:
    if is_language_model(cfg):
        return (f"bits per byte on the first {ev['lm_bytes']:,} bytes of the corpus' validation split, in windows "
                f"of the model's context ({cfg.model.lm_seq_len} bytes; `ditlab lm eval`'s protocol).")
    sampled = (f"{ev['samples']} class-conditional samples (labels cycled over the classes) with the objective's fixed "
               f"sampler (ddim / euler / shortcut; steps {ev['steps']}), guidance {ev['cfg_scale']:g} unless the arm sets "
               "`sample.*`; ")
    if cfg.data.source not in EVALUATOR_DATA:
        return sampled + (f"Inception-v3 FID (pool3, 2048-d) of the decoded samples against the reference statistics "
                          f"`{ev.get('inception_reference')}`.")
    return (sampled + f"class accuracy by ditlab's evaluator CNN; FID of its 128-d features against {ev['reference']} "
            "real test images." + (f" Real-data floor at this sample count: FID {reference['fid']:.2f}." if reference else ""))


def write_finding(finding: Finding, profile: Profile, arm_runs: list[ArmRun], units: dict[str, Unit], out: Path,
                  references: dict[str, dict] | None = None) -> dict:
    """Write OUT/<id>/{report.md, results.json, curves.png, loss.png, grid_<arm>.png}; returns the summary."""
    folder = out / f"finding_{finding.id}"
    folder.mkdir(parents=True, exist_ok=True)
    arms = _arm_values(finding, arm_runs, units, out)
    overall, results = judge(finding, profile, arms)
    extra = scaling_study.analyse(finding, profile, arms, folder, results) if finding.analysis == "scaling" else {}
    overall, results = extra.get("verdict", overall), results + extra.get("results", [])
    any_unit = next(iter(arms.values()))["unit"]
    steps = any_unit.cfg.train.steps
    seeds = max(len(a["seeds"]) for a in arms.values())
    memory_lines, memory_figures = memory_use_section(arms, folder)
    figures = _plot(finding, arms, folder) + extra.get("figures", []) + memory_figures
    grids = {}
    for name, arm in arms.items():
        first = arm["seeds"].get(0)
        src = out / "units" / first["unit"] / f"{first['eval']}.png" if first else None
        if src is not None and src.is_file():
            shutil.copyfile(src, folder / f"grid_{name}.png")
            grids[name] = f"grid_{name}.png"
    # figures of an earlier report (arms or curves this one does not have) would pass for current ones
    for stale in {p.name for p in folder.glob("*.png")} - set(figures) - set(grids.values()):
        (folder / stale).unlink()
    fracs = sorted({f for e in finding.expectations_for(profile.name) for _, f in e.arm_points()} | {1.0})
    ev = {**profile.eval, "points": finding.points_for(profile)}  # a finding may set its own points
    lines = [f"# Finding {finding.id}: {finding.title}", "", f"> {finding.claim}", "", f"Source: {finding.source}.", "",
             f"**Verdict: {overall}** (profile `{profile.name}`, {seeds} seed{'s' * (seeds > 1)}, "
             f"recipe `{finding.recipe}`).", ""]
    chance = arms_at_chance(arms)
    if chance:
        lines += [f"**Early training.** At the end of this budget the samples of {len(chance)} of {len(arms)} arms are not "
                  f"recognised above chance (class accuracy {', '.join(f'{a} {v}' for a, v in chance.items())}; "
                  f"chance {1 / any_unit.cfg.model.num_classes:g}): their comparison is of models that do not draw "
                  "their class yet.", ""]
    if finding.note:
        lines += [finding.note, ""]
    lines += ["## Expectations", "", "| statement | metric | at | effect [95% CI] (positive = as claimed) | verdict |", "|---|---|---|---|---|"]
    for r in results:
        at = ", ".join(sorted({f"{split_point(a)[1]:g} of budget" for a in r["arms"]}))
        lines.append(f"| {_statement(r)} ({r['claim']}) | {r['metric']} ({'higher' if r['higher_is_better'] else 'lower'} is better) "
                     f"| {at} | {_effects_text(r)} | **{r['verdict']}** |")
    metrics = curve_metrics(arms)
    head = ["arm", "overrides"] + [f"{COLUMN[m]} @{f:g}" for f in fracs for m in metrics]
    has_psnr = any("psnr" in s for a in arms.values() for s in a["seeds"].values())
    head += (["PSNR"] if has_psnr else []) + ["params", "fwd Gflops", "samples/s", "seeds done"]
    lines += extra.get("lines", []) + memory_lines  # the scaling analysis, the LMs' memory use
    lines += ["", "## Arms (mean ± 95% CI over seeds)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    arm_rows = {}
    for name, arm in arms.items():
        unit = arm["unit"]
        overrides = ", ".join(f"`{k}={v}`" for k, v in finding.arms_for(profile.name)[name].items()) or "(recipe)"
        row = [name, overrides]
        for f in fracs:
            step = point_step(unit.cfg.train.steps, f)
            row += [_fmt(arm, m, step) for m in metrics]
        trains = [s["train"] for s in arm["seeds"].values() if s["train"]]
        done = sum(1 for s in arm["seeds"].values() if s["points"].get(unit.points[-1]))
        if has_psnr:
            row.append(_fmt(arm, "psnr", None))
        row += [f"{trains[0]['params'] / 1e6:.2f} M" if trains else "—", f"{trains[0]['fwd_gflops']:.4f}" if trains and trains[0]["fwd_gflops"] else "—",
                f"{np.median([t['img_per_s'] for t in trains]):.0f}" if trains else "—", f"{done}/{len(arm['seeds'])}"]
        lines.append("| " + " | ".join(row) + " |")
        arm_rows[name] = {"overrides": finding.arms_for(profile.name)[name], "sampling": arm["eval"],
                          "seeds": {str(k): {"unit": s["unit"], "points": s["points"], "psnr": s.get("psnr"),
                                             "memory_use": s.get("memory_use"),
                                             "train": {k2: v for k2, v in (s["train"] or {}).items() if k2 != "loss"}}
                                    for k, s in arm["seeds"].items()}}
    cfg = any_unit.cfg
    reference = (references or {}).get(cfg.data.source)
    lines += ["", "## Setup", "",
              f"- Budget: {steps} steps of batch {cfg.optim.batch_size} on `{cfg.data.source}` ({_amount(any_unit)}), {'Muon + AdamW' if cfg.optim.name == 'muon' else 'AdamW'} lr {cfg.optim.lr:g}, "
              f"warm-up {cfg.optim.warmup_steps}, grad clip {cfg.optim.grad_clip}, EMA {cfg.train.ema_decay} (warm-up {cfg.train.ema_warmup}).",
              f"- Evaluation at {', '.join(f'{p:g}' for p in ev['points'])} of the budget, EMA weights: " + _protocol(cfg, ev, reference),
              "- Intervals: per arm the seed spread, floored by each value's sampling variance (binomial for accuracy, "
              "bootstrap over samples for FID, over windows for bits per byte); differences by Welch t-intervals, paired by seed where two arms sample the same trained models (`ditlab.experiments.stats`).",
              f"- Regenerate: `ditlab reproduce {finding.id} --profile {profile.name} --seeds {seeds}`.", ""]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    if grids:
        lines += ["## Samples (first seed, end of training; one row per class)", "",
                  "| " + " | ".join(grids) + " |", "|" + "---|" * len(grids),
                  "| " + " | ".join(f"![{name}]({path})" for name, path in grids.items()) + " |", ""]
    save_text(folder / "report.md", "\n".join(lines))
    summary = {"id": finding.id, "title": finding.title, "claim": finding.claim, "source": finding.source,
               "profile": profile.name, "seeds": seeds, "steps": steps, "batch_size": cfg.optim.batch_size,
               "data": cfg.data.source, "amount": _amount(any_unit), "verdict": overall, "expectations": results, "arms": arm_rows,
               "evaluation": ev, "reference": reference, "at_chance": chance}
    save_text(folder / "results.json", json.dumps(summary, indent=1, default=float) + "\n")
    return summary


def write_index(summaries: list[dict], out: Path, profile: Profile) -> Path:
    """OUT/REPORT.md: one row per finding; a summary of verdict "not run" (no arm started) gets a row
    without a page, so that the table always shows the whole suite."""
    counts = defaultdict(int)
    for s in summaries:
        counts[s["verdict"]] += 1
    lines = [f"# ditlab findings: profile `{profile.name}`", "",
             "Each claim of the research notes run as an experiment (`ditlab reproduce`), with the verdict from "
             "the statistics: **reproduces** (every stated comparison holds at 95% confidence), **contradicts** "
             "(a comparison goes significantly the other way), **inconclusive** (the intervals cannot tell), "
             "**pending** (arms still running), **not run** (no arm started yet). *Arms at chance*: image arms "
             "whose samples are not recognised above chance class accuracy at the end of the budget (still early "
             "in training).", "",
             "Totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", "",
             "| finding | claim | measurement (effect [95% CI], positive = as claimed) | seeds | budget | arms at chance | verdict |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        if s["verdict"] == "not run":
            lines.append(f"| {s['id']} | {s['claim']} | — | — | — | — | **not run** |")
            continue
        measured = "<br>".join(f"{r['metric']} {_statement(r)}: {_effects_text(r)} → {r['verdict']}" for r in s["expectations"])
        lines.append(f"| [{s['id']}](finding_{s['id']}/report.md) | {s['claim']} | {measured} | {s['seeds']} | "
                     f"{s['steps']} steps ({s['amount']}) | {', '.join(s.get('at_chance') or {}) or '—'} | **{s['verdict']}** |")
    lines += ["", f"Regenerate: `ditlab reproduce --profile {profile.name}` then `ditlab report --out {out}`.", ""]
    return save_text(out / "REPORT.md", "\n".join(lines))

