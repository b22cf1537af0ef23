"""Replant the bugs a review planted one at a time (plus a few like them) and check that the tests
named for each fail. Not part of CI; see TESTING.md.

    nice -n 10 python tools/planted_bugs.py            # all
    nice -n 10 python tools/planted_bugs.py ema_raw    # some, by name

Each bug is a one-line replacement in a copy of src/ (never in the work tree), then the named
tests run with that copy first on PYTHONPATH. A bug whose line no longer exists is reported as
STALE: the code moved on, and the entry needs updating (its tests may still be right).
The named tests first run on an unmodified copy (they must pass there). Exit status 1 if any
bug SURVIVED, 2 if the tests fail without any bug, else 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# several ranks against one process: the gloo test starts processes, which mutation testing's
# in-process runs cannot reach (this script puts its planted copy first on their PYTHONPATH)
GLOO_RANKS = ["tests/test_distributed.py::test_two_gloo_processes_match_one"]

# name: (file under src/ditlab, line text, replacement, tests that must fail)
BUGS: dict[str, tuple[str, str, str, list[str]]] = {
    "flow_velocity_sign": ("objectives/flow.py", '"velocity": eps - x0', '"velocity": eps + x0',
                           ["tests/test_objective_targets.py"]),
    "shortcut_velocity_sign": ("objectives/shortcut.py", "target = eps - x0", "target = eps + x0",
                               ["tests/test_objective_targets.py"]),
    "ema_not_updated": ("train/trainer.py", "self.ema.update(self.raw)", "pass",
                        ["tests/test_train_schedules.py"]),
    "ema_saved_as_raw": ("train/trainer.py", "        model_sd, ema_sd, optim_sd = self._state_dicts()",
                         "        model_sd, ema_sd, optim_sd = self._state_dicts(); "
                         "ema_sd = {k: v.clone() for k, v in model_sd.items()}",
                         ["tests/test_train_schedules.py"]),
    "ema_without_warmup": ("train/ema.py", "return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay",
                           "return self.decay", ["tests/test_train_schedules.py"]),
    "muon_takes_the_output_layer": ("train/optim.py", "for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]",
                                    "for name, m in blocks.named_modules() if isinstance(m, nn.Linear)] + "
                                    "['final_layer.linear.weight']", ["tests/test_optim.py"]),
    "muon_at_its_own_scale": ("train/optim.py", 'adjust_lr_fn="match_rms_adamw")', "adjust_lr_fn=None)",
                              ["tests/test_optim.py"]),
    "muon_state_not_restored": ("train/optim.py", '        self.muon.load_state_dict(state["muon"])', "        pass",
                                ["tests/test_optim.py"]),
    "lr_warmup_not_applied": ("train/trainer.py", 'g["lr"] = self.lr_at(self.step)', "pass",
                              ["tests/test_train_schedules.py"]),
    "grad_clip_not_applied": ("train/distributed.py",
                              "return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))",
                              "return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() "
                              "if p.grad is not None]))", ["tests/test_train_schedules.py"]),
    "sampling_labels_zero": ("sampling.py", "y = torch.from_numpy(np.maximum(y_np, 0)).to(device)",
                             "y = torch.from_numpy(np.maximum(y_np, 0) * 0).to(device)",
                             ["tests/test_sampling_labels.py"]),
    "precision_recall_swapped": ("eval/metrics.py", 'result["precision"], result["recall"] = F',
                                 'result["recall"], result["precision"] = F', ["tests/test_eval_wiring.py"]),
    "classifier_pr_swapped": ("eval/metrics.py", 'result["cls_precision"], result["cls_recall"] = F',
                              'result["cls_recall"], result["cls_precision"] = F', ["tests/test_eval_wiring.py"]),
    "fid_reference_vs_reference": ("eval/metrics.py",
                                   'result["fid"] = F.frechet_distance(*F.feature_stats(feats["pool3"]), mu, sigma)',
                                   'result["fid"] = F.frechet_distance(mu, sigma, mu, sigma)',
                                   ["tests/test_eval_wiring.py"]),
    "gaussian_xstart_target": ("objectives/gaussian.py", 'target = x_start if self.mean_type == "start_x" else noise',
                               "target = noise", ["tests/test_official_fixtures.py"]),
    "rescaled_mse_factor": ("objectives/gaussian.py", 'terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)',
                            'terms["vb"] = terms["vb"] * 1.0', ["tests/test_official_fixtures.py"]),
    # the byte language models
    "infini_gate_swapped": ("models/infini_attention.py", "outs.append(gate * a_mem.to(a_dot.dtype) + (1 - gate) * a_dot)",
                            "outs.append((1 - gate) * a_mem.to(a_dot.dtype) + gate * a_dot)", ["tests/test_lm_model.py"]),
    "infini_feature_map": ("models/infini_attention.py", "return F.elu(x) + 1.0", "return torch.sigmoid(x)",
                           ["tests/test_lm_model.py"]),
    "infini_delta_sign": ("models/infini_attention.py", "v = v - memory_retrieve(sigma_k, M, z)",
                          "v = v + memory_retrieve(sigma_k, M, z)", ["tests/test_lm_model.py"]),
    "infini_truncated_never_detaches": ("models/infini_attention.py", "M, z = M.detach(), z.detach()", "pass",
                                        ["tests/test_lm_model.py"]),
    "dyt_without_alpha": ("models/layers.py", "x = torch.tanh(self.alpha * x)", "x = torch.tanh(x)",
                          ["tests/test_lm_model.py"]),
    "bits_in_nats": ("eval/lm.py", "LN2 = math.log(2.0)", "LN2 = 1.0", ["tests/test_lm_data.py"]),
    # the findings' statistics and the scaling analysis
    "welch_df_as_n": ("experiments/stats.py", "df = var**2 / sum(vm**2 / (n - 1) for vm, n in parts)",
                      "df = sum(n for _, n in parts) - 2", ["tests/test_findings_stats.py"]),
    "arm_variance_not_over_n": ("experiments/stats.py", "return ArmStats(float(v.mean()), max(spread, floor) / n, n,",
                                "return ArmStats(float(v.mean()), max(spread, floor), n,", ["tests/test_findings_stats.py"]),
    "noninferior_margin_sign": ("experiments/stats.py", "if e.low > -margin:", "if e.low > margin:",
                                ["tests/test_findings_stats.py"]),
    "power_law_verdict_sign": ("experiments/scaling_study.py",
                               'verdict = "reproduces" if fit.b_hi < 0 else "contradicts" if fit.b_lo > 0 else "inconclusive"',
                               'verdict = "reproduces" if fit.b_lo < 0 else "contradicts" if fit.b_hi > 0 else "inconclusive"',
                               ["tests/test_scaling_study.py"]),
    "patch_pairs_any_gflops": ("experiments/scaling_study.py", "if abs(math.log(best.gflops / fine.gflops)) <= math.log(MATCH):",
                               "if True:", ["tests/test_scaling_study.py"]),
    # several ranks (GLOO_RANKS)
    "ddp_never_syncs": ("train/trainer.py", "env.rank * a + i, last=i == a - 1)", "env.rank * a + i, last=False)",
                        GLOO_RANKS),
    "log_on_every_rank": ("train/trainer.py", "start_step=self.step) if env.is_main else None",
                          "start_step=self.step)", GLOO_RANKS),
    "ranks_share_micro_seeds": ("train/trainer.py", "env.rank * a + i, last=i == a - 1)", "i, last=i == a - 1)",
                                GLOO_RANKS),
    "fsdp_clip_per_shard": ("train/trainer.py", "D.clip_gradients(self.model, cfg.optim.grad_clip, t.fsdp)",
                            "D.clip_gradients(self.model, cfg.optim.grad_clip, False)",
                            GLOO_RANKS),
    "fsdp_save_from_raw": ("train/trainer.py", "tuple[dict, dict, dict]:\n        model = self.model if self.cfg.train.fsdp else self.raw",
                           "tuple[dict, dict, dict]:\n        model = self.raw",
                           GLOO_RANKS),
    "fsdp_resume_into_raw": ("train/trainer.py", "load_state(step_dir)\n        model = self.model if self.cfg.train.fsdp else self.raw",
                             "load_state(step_dir)\n        model = self.raw",
                             GLOO_RANKS),
    "micro_batches_len": ("train/order.py", "return (self.end - self.start) * len(self.micro)",
                          "return (self.end - self.start) // len(self.micro)", ["tests/test_train_order.py"]),
}


def plant(name: str | None, tests: list[str] | None = None) -> str:
    """Plant bug `name` (None: none, the baseline) in a copy of src/ and run its tests."""
    if name is not None:
        rel, line, replacement, tests = BUGS[name]
    with tempfile.TemporaryDirectory(prefix=f"planted-{name}-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        if name is not None:
            path = src / "ditlab" / rel
            text = path.read_text()
            if text.count(line) != 1:
                return "STALE"
            path.write_text(text.replace(line, replacement))
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                               *tests], cwd=ROOT, env=env, capture_output=True, text=True)
        return "KILLED" if proc.returncode == 1 else ("SURVIVED" if proc.returncode == 0 else f"ERROR rc={proc.returncode}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"bugs to plant (default all): {', '.join(BUGS)}")
    names = p.parse_args().names or list(BUGS)
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        p.error(f"unknown bug(s): {', '.join(unknown)}")
    # The tests must pass on the code as it is, or a "killed" would mean nothing.
    baseline = plant(None, sorted({t for n in names for t in BUGS[n][3]}))
    if baseline != "SURVIVED":
        print(f"the tests fail on the unmodified code ({baseline}): fix that first", file=sys.stderr)
        return 2
    survived = False
    for name in names:
        verdict = plant(name)
        survived |= verdict == "SURVIVED"
        print(f"{verdict:9s} {name}  ({', '.join(BUGS[name][3])})", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
