"""The findings suite: specs, planning, `ditlab reproduce` end to end, resume after a kill, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.experiments.specs import (FINDINGS_DIR, arm_config, check_finding, load_findings, load_suite, parse_finding,
                                      select)
from ditlab.experiments.stats import VERDICTS
from ditlab.experiments.suite import plan
from ditlab.runs import step_dir_name


def test_every_packaged_spec_validates():
    recipes, profiles = load_suite()
    findings = load_findings()
    # the notes' findings: byte LMs 1-3, image models 4-18 (and 10b), the DiT paper's scaling 19-20 (and on MNIST, 19m)
    assert set(findings) == {str(i) for i in range(1, 21)} | {"10b", "19m"}
    for f in findings.values():
        check_finding(f, recipes, profiles)  # arms build valid configs and models in every profile
    # the arms' overrides reach the config: finding 7's arms differ in depth only
    cfgs = {arm: arm_config(findings["7"], arm, profiles["cpu"], recipes)[0] for arm in findings["7"].arms}
    assert {a: c.model.depth for a, c in cfgs.items()} == {"d6": 6, "d4": 4, "d2": 2}
    assert len({c.model.hidden_size for c in cfgs.values()}) == 1


def test_shared_arms_are_one_unit(tmp_path):
    recipes, profiles = load_suite()
    findings = load_findings()
    chosen = select(findings, ["4", "8", "10"])
    units, arm_runs = plan(chosen, profiles["smoke"], recipes, 2, tmp_path)
    assert len(arm_runs) == (3 + 3 + 6) * 2
    # 4's T1000 is 8's sincos (the recipe as it is); 10's guidance arms share the U-Net T1000 model
    assert len(units) == (3 + 2 + 3) * 2
    by = {(a.finding, a.arm, a.seed): a for a in arm_runs}
    assert by[("4", "T1000", 0)].unit == by[("8", "sincos", 0)].unit
    assert by[("4", "T1000", 0)].unit != by[("4", "T1000", 1)].unit  # seeds are separate runs
    cfg_arms = [by[("10", a, 0)] for a in ("T1000", "cfg0.5", "cfg1.5", "cfg2.5")]
    assert len({a.unit for a in cfg_arms}) == 1 and len({a.eval for a in cfg_arms}) == 3
    assert cfg_arms[0].eval == cfg_arms[2].eval  # the smoke profile samples with guidance 1.5 anyway
    # the key does not depend on where this machine keeps its data or its results
    again, _ = plan(chosen, profiles["smoke"], recipes, 2, tmp_path / "elsewhere")
    assert set(again) == set(units)


def _write_findings(folder: Path, steps: int, arms: dict, expect: list, points=(0.5, 1.0)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suite = yaml.safe_load((FINDINGS_DIR / "suite.yaml").read_text())
    suite["profiles"]["smoke"]["budget"] = {"steps": steps}
    suite["profiles"]["smoke"]["eval"]["points"] = list(points)
    (folder / "suite.yaml").write_text(yaml.safe_dump(suite))
    spec = {"id": "t1", "title": "test", "claim": "A beats B", "source": "test", "recipe": "flow",
            "arms": arms, "expect": expect}
    (folder / "f01_test.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_smoke_finding_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reproduce", "11", "--profile", "smoke", "--out", str(out)]) == 0
    page = out / "finding_11"
    for name in ("report.md", "results.json", "curves.png", "loss.png", "grid_ddpm.png", "grid_flow.png"):
        assert (page / name).is_file(), name
    res = json.loads((page / "results.json").read_text())
    assert res["verdict"] in VERDICTS
    (e,) = res["expectations"]
    assert e["claim"] == "noninferior" and e["verdict"] in VERDICTS and len(e["effects"]) == 1
    steps = res["steps"]
    for arm in ("ddpm", "flow"):
        (seed,) = res["arms"][arm]["seeds"].values()
        assert sorted(int(p) for p in seed["points"]) == [steps // 2, steps]
        assert 0 <= seed["points"][str(steps)]["acc"] <= 1 and seed["points"][str(steps)]["n"] == 20
    # the flow@0.5 effect is computed from the half-budget point, the ddpm one from the end
    flow_half = res["arms"]["flow"]["seeds"]["0"]["points"][str(steps // 2)]["fid"]
    ddpm_end = res["arms"]["ddpm"]["seeds"]["0"]["points"][str(steps)]["fid"]
    assert e["effects"][0]["estimate"] == pytest.approx(ddpm_end - flow_half)  # lower FID is better
    index = (out / "REPORT.md").read_text()
    assert "[11](finding_11/report.md)" in index and f"**{res['verdict']}**" in index
    assert (out / ".gitignore").read_text().startswith("runs/")
    capsys.readouterr()
    # a second run trains nothing; `ditlab report` rewrites the same pages from the results files
    assert main(["reproduce", "11", "--profile", "smoke", "--out", str(out)]) == 0
    assert "0 to run" in capsys.readouterr().out
    before = (out / "REPORT.md").read_text()
    (page / "grid_an_arm_of_an_earlier_spec.png").write_bytes(b"")
    (out / "finding_13").mkdir()
    (out / "finding_13" / "report.md").write_text("a page of results that are no longer planned")
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "REPORT.md").read_text() == before
    # the table lists the whole suite: a finding with no arm started has a row, no page
    rows = [line for line in before.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == len(load_findings())
    for fid in load_findings():
        has_page = (out / f"finding_{fid}").is_dir()
        assert sum(r.startswith(f"| [{fid}](finding_{fid}/report.md) |") for r in rows) == has_page
        assert sum(r.startswith(f"| {fid} | ") and r.endswith("**not run** |") for r in rows) == (not has_page)
    assert not (out / "finding_13").exists() and "| 13 | " in before
    # reporting one finding rewrites its page only; every other row stays as its page has it
    other = dict(json.loads((page / "results.json").read_text()), id="13", verdict="contradicts")
    (out / "finding_13").mkdir()
    (out / "finding_13" / "results.json").write_text(json.dumps(other))
    assert main(["report", "11", "--out", str(out)]) == 0
    after = (out / "REPORT.md").read_text()
    (row13,) = [r for r in after.splitlines() if r.startswith("| [13](finding_13/report.md) |")]
    assert row13.endswith("**contradicts** |") and after.count("| [11](finding_11/report.md) |") == 1
    assert len(after.splitlines()) == len(before.splitlines())  # the same table, one row no longer "not run"
    (out / "finding_13" / "results.json").write_text("{")
    capsys.readouterr()
    assert main(["report", "11", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "finding_13/results.json is not a results file" in err and err.count("\n") == 1
    shutil.rmtree(out / "finding_13")
    assert sorted(p.name for p in page.glob("*.png")) == ["curves.png", "grid_ddpm.png", "grid_flow.png", "loss.png"]


def test_tokenizer_arm_trains_the_same_tokenizer_as_the_command(tmp_path, capsys):
    """A tokenizer arm trains its tokenizer, then a DiT on its tokens; the tokenizer is the one that
    `ditlab train-tokenizer` trains with the same settings, and its PSNR is recomputed from the file."""
    findings = _write_findings(tmp_path / "specs", 2, {"dim4": {"tokenizer.kind": "conv1", "tokenizer.token_dim": 4,
                                                               "model.patch_size": 1}},
                               [{"metric": "psnr", "claim": "equivalent", "arms": ["dim4", "dim4"], "margin": 1.0}], points=(1.0,))
    out = tmp_path / "out"
    assert main(["reproduce", "--profile", "smoke", "--findings", str(findings), "--out", str(out), "--threads", "1"]) == 0
    (record,) = [json.loads(p.read_text()) for p in (out / "units").glob("flow-*.json")]
    tok = record["tokenizer"]
    assert record["config"]["model"]["in_channels"] == 4 and record["config"]["model"]["input_size"] == 14
    settings = tok["tokenizer"]
    assert main(["train-tokenizer", "--kind", "conv1", "--token-dim", "4", "--data", settings["data"],
                 "--steps", str(settings["steps"]), "--batch-size", str(settings["batch_size"]),
                 "--seed", str(settings["seed"]), "--device", "cpu", "--out", str(tmp_path / "cmd")]) == 0
    capsys.readouterr()
    from ditlab.codecs.tokenizers import evaluate_psnr, load_tokenizer
    from ditlab.train.tokenizer import load_images

    suite_tok = load_tokenizer(out / "runs" / tok["key"])
    command_tok = load_tokenizer(tmp_path / "cmd")
    for name, value in suite_tok.state_dict().items():
        assert torch.equal(value, command_tok.state_dict()[name]), name
    test = load_images(settings["data"], None, "test")
    assert tok["psnr"] == pytest.approx(evaluate_psnr(suite_tok, test), abs=1e-9)
    assert json.loads((tmp_path / "cmd" / "metrics.json").read_text())["test_psnr"] == pytest.approx(tok["psnr"], abs=1e-9)
    assert tok["psnr_var"] > 0


def test_plan_and_shards_partition_the_units(tmp_path, capsys):
    args = ["reproduce", "4", "8", "--profile", "smoke", "--seeds", "2", "--out", str(tmp_path), "--plan"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    units = [ln.split("--unit ")[1].split()[0] for ln in lines[:-1]]
    assert lines[-1].startswith("ditlab report") and len(units) == len(set(units)) == (3 + 3 - 1) * 2  # 8's sincos arm is 4's T1000
    shards = []
    for i in range(2):
        assert main([*args, "--shard", f"{i}/2"]) == 0
        shards.append({ln.split("--unit ")[1].split()[0] for ln in capsys.readouterr().out.splitlines()[:-1]})
    assert shards[0] | shards[1] == set(units) and not shards[0] & shards[1]


def test_processes_on_one_results_folder_share_its_units(tmp_path):
    """Two `reproduce` processes started together on one folder (as `--jobs 2` starts its workers)
    train each unit once between them: each claims the next unit the other has not."""
    findings = _write_findings(tmp_path / "specs", 40, {f"d{d}": {"model.depth": d} for d in (1, 2, 3)},
                               [{"metric": "fid", "claim": "ordering", "arms": ["d3", "d2", "d1"]}], points=(1.0,))
    cmd = [sys.executable, "-m", "ditlab.cli", "reproduce", "--profile", "smoke", "--findings", str(findings),
           "--threads", "1", "--out", str(tmp_path / "out"), "--no-report"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    trained = [line.split("]")[0].lstrip("0123456789: [") for out, _ in outputs for line in out.splitlines()
               if "] training to step" in line]
    assert sorted(trained) == sorted(p.stem for p in (tmp_path / "out" / "units").glob("*.json"))
    assert len(trained) == len(set(trained)) == 3


def test_a_new_evaluation_point_before_the_kept_checkpoint_trains_again(tmp_path, capsys):
    """Scoring keeps only the final checkpoint; a later request for an earlier point (another finding
    sharing the unit, a new profile point) trains the unit again from the start, exactly."""
    arms, expect = {"a": {"model.depth": 1}}, [{"metric": "fid", "claim": "equivalent", "arms": ["a", "a"], "margin": 1.0}]
    out = tmp_path / "out"
    args = ["reproduce", "--profile", "smoke", "--out", str(out), "--threads", "1", "--no-report", "--findings"]
    assert main([*args, str(_write_findings(tmp_path / "end", 20, arms, expect, points=(1.0,)))]) == 0
    (path,) = (out / "units").glob("*.json")
    before = json.loads(path.read_text())["evals"]
    assert main([*args, str(_write_findings(tmp_path / "both", 20, arms, expect, points=(0.5, 1.0)))]) == 0
    assert "training again from the start" in capsys.readouterr().out
    (again,) = (out / "units").glob("*.json")
    assert again == path  # the same unit
    after = json.loads(path.read_text())["evals"]
    (ekey,) = before
    assert sorted(after[ekey]["points"]) == ["10", "20"]
    strip = lambda m: {k: v for k, v in m.items() if k != "eval_s"}
    assert strip(after[ekey]["points"]["20"]) == strip(before[ekey]["points"]["20"])


def test_killed_reproduce_resumes_without_retraining_finished_units(tmp_path):
    findings = _write_findings(tmp_path / "specs", 400, {"a": {"model.depth": 1}, "b": {"model.depth": 2}},
                               [{"metric": "fid", "claim": "better", "arms": ["a", "b"]}])
    base = [sys.executable, "-m", "ditlab.cli", "reproduce", "--profile", "smoke", "--findings", str(findings), "--threads", "1"]
    out = tmp_path / "out"
    plan_lines = subprocess.run([*base, "--out", str(out), "--plan"], capture_output=True, text=True, check=True).stdout.splitlines()
    key_a, key_b = (ln.split("--unit ")[1].split()[0] for ln in plan_lines[:2])
    subprocess.run([*base, "--out", str(out), "--unit", key_a, "--no-report"], check=True, capture_output=True)
    record_a = (out / "units" / f"{key_a}.json").read_bytes()

    # kill the full run while it trains unit b, after its first checkpoint (step 200)
    proc = subprocess.Popen([*base, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "runs" / key_b / "checkpoints" / step_dir_name(200)
    deadline = time.time() + 120
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "rerun to resume" in err and err.count("\n") == 1
    assert not (out / "units" / f"{key_b}.json").exists()

    done = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 to run" in done.stdout and f"[{key_b}] resuming" in done.stdout and f"[{key_a}] training" not in done.stdout
    assert (out / "units" / f"{key_a}.json").read_bytes() == record_a
    # scored units keep only their final checkpoint
    final = step_dir_name(json.loads((out / "units" / f"{key_b}.json").read_text())["steps"])
    assert sorted(p.name for p in (out / "runs" / key_b / "checkpoints").iterdir()) == ["latest", final]
    # exact resume: the same metrics as an uninterrupted run of unit b
    fresh = tmp_path / "fresh"
    subprocess.run([*base, "--out", str(fresh), "--unit", key_b, "--no-report"], check=True, capture_output=True)
    resumed = json.loads((out / "units" / f"{key_b}.json").read_text())["evals"]
    uninterrupted = json.loads((fresh / "units" / f"{key_b}.json").read_text())["evals"]
    strip = lambda ev: {k: {p: {m: v for m, v in x.items() if m != "eval_s"} for p, x in e["points"].items()}
                        for k, e in ev.items()}
    assert strip(resumed) == strip(uninterrupted)


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "99", "--profile", "smoke"], "unknown finding id(s) 99"),
    (["reproduce", "7", "--profile", "laptop"], "unknown profile 'laptop'"),
    (["reproduce", "7", "--profile", "smoke", "--shard", "2/2"], "need 0 <= i < n"),
    (["reproduce", "7", "--profile", "smoke", "--seeds", "0"], "--seeds must be at least 1"),
    (["report", "--out", "nowhere"], "no suite results"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("arms, expect, message", [
    ({"a": {"model.depthh": 2}, "b": {}}, [{"metric": "fid", "claim": "better", "arms": ["a", "b"]}], "unknown key 'model.depthh'"),
    ({"a": {"model.depth": 2}, "b": {}}, [{"metric": "loss", "claim": "better", "arms": ["a", "b"]}], "unknown metric 'loss'"),
    ({"a": {"model.depth": 2}, "b": {}}, [{"metric": "fid", "claim": "better", "arms": ["a", "c"]}], "no arm 'c'"),
    ({"a": {"model.depth": 2}, "b": {}}, [{"metric": "fid", "claim": "equivalent", "arms": ["a", "b"]}], "margin"),
    ({"a": {"model.depth": 2}, "b": {}}, [{"metric": "fid", "claim": "better", "arms": ["a@0.3", "b"]}], "not an evaluated point"),
    ({"a": {"model.name": "unet"}, "b": {}}, [{"metric": "fid", "claim": "better", "arms": ["a", "b"]}], "does not use the DiT"),
    ({"a": {"tokenizer.kind": "conv9"}, "b": {}}, [{"metric": "fid", "claim": "better", "arms": ["a", "b"]}], "not offered"),
])
def test_bad_specs_are_one_line(arms, expect, message, tmp_path, capsys):
    findings = _write_findings(tmp_path / "specs", 4, arms, expect)
    assert main(["reproduce", "--profile", "smoke", "--findings", str(findings), "--out", str(tmp_path / "o"), "--plan"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_finding_may_keep_its_own_budget_and_points_in_a_profile(tmp_path):
    recipes, profiles = load_suite()
    spec = {"id": "x", "title": "t", "claim": "c", "source": "s", "recipe": "flow", "arms": {"a": {}},
            "expect": [{"metric": "fid", "claim": "better", "arms": ["a@0.5", "a"]}]}
    (unit,) = plan([parse_finding(spec)], profiles["smoke"], recipes, 1, tmp_path)[0].values()
    assert unit.points == [2, 4]  # the profile's 4 steps, scored at its points 0.5 and 1
    own = parse_finding({**spec, "profiles": {"smoke": {"budget": {"steps": 12}, "points": [0.25, 0.5, 1]}}})
    check_finding(own, recipes, profiles)
    (unit,) = plan([own], profiles["smoke"], recipes, 1, tmp_path)[0].values()
    assert unit.points == [3, 6, 12] and unit.cfg.train.steps == 12
    (gpu_unit,) = plan([own], profiles["gpu"], recipes, 1, tmp_path)[0].values()
    assert gpu_unit.points == [round(f * gpu_unit.cfg.train.steps) for f in profiles["gpu"].eval["points"]]
    for bad, message in [({"budget": {"steps": 0}}, "budget must be"), ({"budget": {"epochs": 1, "steps": 2}}, "budget must be"),
                         ({"points": [0, 1]}, "points must be"), ({"points": 0.5}, "points must be")]:
        with pytest.raises(DitlabError, match=message):
            parse_finding({**spec, "profiles": {"smoke": bad}})
    with pytest.raises(DitlabError, match="unknown profile 'laptop'"):
        check_finding(parse_finding({**spec, "profiles": {"laptop": {"budget": {"steps": 3}}}}), recipes, profiles)


def test_a_spec_must_say_what_it_claims():
    with pytest.raises(DitlabError, match="missing expect"):
        parse_finding({"id": "x", "title": "t", "claim": "c", "source": "s", "recipe": "dit", "arms": {"a": {}}})
    with pytest.raises(DitlabError, match="unknown key"):
        parse_finding({"id": "x", "title": "t", "claim": "c", "source": "s", "recipe": "dit", "arms": {}, "expect": [],
                       "seed": 3})


def test_committed_reports_hold_results_not_checkpoints():
    # a suite folder commits results files, pages and plots; its run folders stay out of git
    root = Path(__file__).resolve().parents[1] / "reports"
    if not root.is_dir():
        pytest.skip("no reports folder in this checkout")
    for path in root.rglob("*"):
        if path.is_file() and "runs" not in path.relative_to(root).parts:
            assert path.suffix in (".md", ".json", ".png", ".txt") or path.name == ".gitignore", path
            assert path.stat().st_size < 2_000_000, path


def test_committed_summary_lists_every_finding_with_its_pages_verdict():
    suite = Path(__file__).resolve().parents[1] / "reports" / "cpu"
    index = suite / "REPORT.md"
    if not index.is_file():
        pytest.skip("no committed cpu summary in this checkout")
    rows = {r.split(" | ")[0]: r for r in index.read_text().splitlines() if r.startswith("| ") and "**" in r}
    assert len(rows) == len(load_findings())
    for fid in load_findings():
        results = suite / f"finding_{fid}" / "results.json"
        verdict = json.loads(results.read_text())["verdict"] if results.is_file() else "not run"
        key = f"| [{fid}](finding_{fid}/report.md)" if results.is_file() else f"| {fid}"
        assert rows[key].endswith(f"**{verdict}** |"), fid


def test_committed_results_keep_their_keys(tmp_path):
    """The suite resumes from committed results only while their units' keys stay the same: a change
    to what makes a key (a new config option, say) must not orphan them. The byte-LM findings plan
    without any dataset, so their committed units are checked here."""
    committed = Path(__file__).resolve().parents[1] / "reports" / "cpu" / "units"
    if not committed.is_dir():
        pytest.skip("no committed cpu results in this checkout")
    recipes, profiles = load_suite()
    units, arm_runs = plan(select(load_findings(), ["1", "2", "3"]), profiles["cpu"], recipes, 3, tmp_path)
    assert len(units) == 18 and set(units) <= {p.stem for p in committed.glob("*.json")}
    # ... and they hold every evaluation the plan asks for, so nothing trains again
    from ditlab.experiments.suite import needs_work, read_record

    assert not [k for k, u in units.items() if needs_work(u, read_record(committed.parent, k))]
    # a later option at its default stays out of the identity; set, it makes a new unit
    from ditlab.experiments.suite import training_identity

    cfg = next(iter(units.values())).cfg
    assert "lm_embed_scale" not in training_identity(cfg, None)["config"]["model"]
    cfg.model.lm_embed_scale = True
    assert training_identity(cfg, None)["config"]["model"]["lm_embed_scale"] is True


def test_language_model_findings_run_end_to_end(tmp_path):
    # findings 1-3 on a small corpus given as the data root (<root>/text/gcide.txt.gz)
    import gzip

    words = [b"alpha ", b"beta ", b"gamma ", b"delta. ", b"The ", b"of ", b"dictionary "]
    text = b"".join(words[(i * 7 + i // 3) % len(words)] for i in range(40000))
    (tmp_path / "data" / "text").mkdir(parents=True)
    with gzip.open(tmp_path / "data" / "text" / "gcide.txt.gz", "wb") as f:
        f.write(text)
    out = tmp_path / "out"
    assert main(["reproduce", "2", "--profile", "smoke", "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    res = json.loads((out / "finding_2" / "results.json").read_text())
    assert res["verdict"] in VERDICTS and (out / "finding_2" / "curves.png").is_file()
    for arm in ("full", "truncated"):
        (seed,) = res["arms"][arm]["seeds"].values()
        end = seed["points"][str(res["steps"])]
        # a barely trained byte model is close to uniform: about 8 bits per byte, never above ~8.5
        assert 6.0 < end["bpb"] < 8.5 and end["bpb_var"] > 0
        assert end["n"] == 2048 - 1  # every byte of the first 2,048 but the first is predicted once
    (e,) = res["expectations"]
    assert e["claim"] == "equivalent" and e["margin"] == pytest.approx(0.02 * np.mean(e["arm_values"]["full"]))
    # memory use at the end of training: bits per byte by segment, memory on and reset, recomputed
    # here from the final checkpoint position by position
    from ditlab.data.text import ByteCorpus
    from ditlab.eval.lm import bpb_by_position
    from ditlab.runs import load_run

    (seed,) = res["arms"]["full"]["seeds"].values()
    use = seed["memory_use"]
    run = load_run(out / "runs" / seed["unit"] / "checkpoints" / step_dir_name(res["steps"]))
    seq_len, segment = run.cfg.model.lm_seq_len, run.cfg.model.lm_segment_len
    corpus = ByteCorpus(str(tmp_path / "data" / "text" / "gcide.txt.gz"), "val")
    for memory, key in ((True, "memory"), (False, "reset")):
        per_position = bpb_by_position(run.model, corpus, seq_len, 16, max_windows=(2048 - 1) // seq_len, memory=memory)
        assert [sp[key] for sp in use["spans"]] == pytest.approx(per_position.reshape(-1, segment).mean(1), rel=1e-12)
    assert [sp["positions"] for sp in use["spans"]] == [[a, a + segment] for a in range(0, seq_len, segment)]
    report = (out / "finding_2" / "report.md").read_text()
    assert "## Memory use" in report and (out / "finding_2" / "memory.png").is_file()
    # a committed record without memory use, on a machine without its checkpoints: retrained, then measured
    import shutil

    record_path = out / "units" / f"{seed['unit']}.json"
    record = json.loads(record_path.read_text())
    del record["memory_use"]
    record_path.write_text(json.dumps(record))
    shutil.rmtree(out / "runs" / seed["unit"])
    assert main(["reproduce", "2", "--profile", "smoke", "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    assert json.loads(record_path.read_text())["memory_use"] == use


def _synthetic_arms(values: dict[str, list[float]], steps: int = 10, models: dict[str, str] | None = None) -> dict:
    """pages' per-arm structure with FIDs at the end of training (sampling variance 0.01); each arm
    trains its own units unless `models` names another arm whose units it samples."""
    from types import SimpleNamespace

    unit = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(steps=steps)))
    models = models or {}
    return {arm: {"unit": unit, "seeds": {i: {"points": {steps: {"fid": v, "fid_var": 0.01}}, "unit": f"{models.get(arm, arm)}-{i}"}
                                          for i, v in enumerate(vals)}}
            for arm, vals in values.items()}


def test_a_finding_verdict_from_its_expectations():
    from ditlab.experiments.pages import judge
    from ditlab.experiments.specs import Expectation, Finding

    _, profiles = load_suite()
    better = lambda a, b: Expectation("fid", "better", [a, b])
    f = Finding("x", "t", "c", "s", "dit", {}, [better("one", "base"), better("two", "base")], verdict="any")
    arms = _synthetic_arms({"base": [10.0, 10.2, 9.9], "one": [5.0, 5.1, 4.9], "two": [15.0, 15.2, 14.8]})
    overall, parts = judge(f, profiles["smoke"], arms)
    assert [p["verdict"] for p in parts] == ["reproduces", "contradicts"] and overall == "reproduces"
    f.verdict = "all"
    assert judge(f, profiles["smoke"], arms)[0] == "contradicts"
    # a relative margin is a share of the reference (last) arm's mean
    eq = Finding("x", "t", "c", "s", "dit", {}, [Expectation("fid", "equivalent", ["one", "base"], relative_margin=0.1)])
    close = _synthetic_arms({"base": [10.0, 10.1, 9.9], "one": [10.2, 10.3, 10.1]})
    (part,) = judge(eq, profiles["smoke"], close)[1]
    assert part["margin"] == pytest.approx(1.0) and part["verdict"] == "reproduces"
    # an arm without its result keeps the finding pending
    del close["one"]["seeds"][2]["points"][10]
    assert judge(eq, profiles["smoke"], close)[0] == "pending"
    # two ways of sampling the same three models are compared seed by seed
    steps = Finding("x", "t", "c", "s", "dit", {}, [better("s8", "s2")])
    values = {"s8": [20.0, 30.0, 40.0], "s2": [21.0, 31.5, 40.9]}
    assert judge(steps, profiles["smoke"], _synthetic_arms(values))[0] == "inconclusive"
    (part,) = judge(steps, profiles["smoke"], _synthetic_arms(values, models={"s2": "s8"}))[1]
    assert part["verdict"] == "reproduces" and part["effects"][0]["df"] == 2.0


def test_arms_at_chance_accuracy_are_flagged_from_their_interval():
    """An arm is flagged when the lower end of its accuracy interval is at or below 1 / classes."""
    from types import SimpleNamespace

    from ditlab.config import Config
    from ditlab.experiments.pages import arms_at_chance
    from ditlab.experiments.stats import binomial_variance

    cfg = Config()
    cfg.train.steps = 10
    n = 1000

    def arm(accs):
        return {"unit": SimpleNamespace(cfg=cfg), "seeds": {i: {"points": {10: {"acc": a, "n": n}}} for i, a in enumerate(accs)}}

    arms = {"chance": arm([0.10, 0.11, 0.09]), "learned": arm([0.60, 0.62, 0.61]), "close": arm([0.13, 0.14, 0.15])}
    flagged = arms_at_chance(arms)
    assert list(flagged) == ["chance"]
    # the flag follows the Welch/t interval: mean 0.10, seed sd 0.01 (> the binomial floor), t(2) quantile 4.303
    half = 4.302653 * max(0.01**2, np.mean([binomial_variance(a, n) for a in (0.10, 0.11, 0.09)])) ** 0.5 / 3**0.5
    assert flagged["chance"] == f"{0.10:.3f} ± {half:.3f}"
    # one seed at 0.13 of 1,000 samples: the binomial interval (±0.021) clears 0.10; of 100 samples it does not
    assert not arms_at_chance({"one": arm([0.13])})
    n = 100
    assert list(arms_at_chance({"one": arm([0.13])})) == ["one"]
    cfg.model.num_classes = 0  # unconditional models have no class accuracy to be at chance
    assert not arms_at_chance(arms)


def test_inception_scorer_scores_decoded_samples_against_the_reference(tmp_path):
    """Data the evaluator CNN does not know (ImageNet latents) is scored by Inception FID of the samples
    against the profile's reference file, never the reference against itself; no class accuracy."""
    from ditlab.config import Config
    from ditlab.eval.fid import FrechetReference, feature_stats
    from ditlab.eval.inception import FIDInceptionV3, load_inception
    from ditlab.eval.metrics import inception_features
    from ditlab.experiments.suite import InceptionScorer, build_scorer

    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")  # random weights: the wiring is under test
    rng = np.random.default_rng(0)
    samples, real = (rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    np.savez(tmp_path / "ref.npz", arr_0=real)
    cfg = Config()
    cfg.data.source = "latents"
    protocol = {"inception": str(tmp_path / "inception.pth"), "inception_reference": str(tmp_path / "ref.npz")}
    scorer = build_scorer(cfg, protocol)
    assert isinstance(scorer, InceptionScorer)
    m = scorer.score(samples, np.arange(6) % 3, seed=0)
    net = load_inception(tmp_path / "inception.pth")
    expected = FrechetReference(*feature_stats(inception_features(net, real)["pool3"])).distance(
        inception_features(net, samples)["pool3"])
    assert m["fid"] == pytest.approx(expected, rel=1e-9) and m["fid"] > 0
    assert m["fid_var"] > 0 and m["n"] == 6 and "acc" not in m
    with pytest.raises(DitlabError, match="eval.inception_reference"):
        build_scorer(cfg, {})
