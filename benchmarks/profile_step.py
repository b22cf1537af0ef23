"""Where a training step of ditlab's trainer goes, phase by phase, and the step against the
official DiT's, side by side in one process.

    python benchmarks/profile_step.py [--cases quickstart,h128,h256,dits4] [--steps 6] [--repeats 5]
    DITLAB_OFFICIAL_DIT=/path/to/DiT PYTHONPATH=$DITLAB_OFFICIAL_DIT:/tmp/timm_pkg:benchmarks/stubs \\
        python benchmarks/profile_step.py --official      # adds the ratios (see benchmarks/README.md)

The trainer's own objects do the work (a `Trainer` built from the quickstart recipe with each
case's model and batch): its data loader and `prepare_batch` (data), `objective.loss` (forward),
`.backward()` (backward), gradient clipping (clip), the stacked loss read back as floats and
checked (sync), `optimizer.step()` + `zero_grad` (optim), `ema.update` (ema) and the log window
(log), in the trainer's order. Each phase is timed with perf_counter (CPU ops finish before they
return, so the times are the ops' own); the table gives per-phase medians over all timed steps.

With --official (a facebookresearch/DiT checkout): the official model with the same weights
trains through the same data, objective and clipping, but with the official train.py's
optimizer (`torch.optim.AdamW(params, lr, weight_decay=0)`: the per-parameter loop on CPU) and
its `update_ema` (a mul_ and add_ per parameter). ditlab and official alternate, `--steps` steps
each, `--repeats` times; the ratio is of the medians of the per-step times. Sampling: ditlab's
`create_diffusion(str(N))` p_sample_loop with `forward_with_cfg` (as the official sample.py:
doubled batch, guidance 4) against the official diffusion and model, same noise, alternating.

ditlab's linear layers compute in oneDNN, as `build_model` gives them on CPU (`--no-onednn`: with
PyTorch's own products, `train.onednn_linear=false`).

--ops prints the torch.profiler op table of a few ditlab steps (self CPU time) and the share of
matrix products in it, the ceiling for anything that is not a faster matmul.

The machine's load is printed with the results: these are shared-CPU timings, compare ratios
from one run, not absolute rates across runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

from ditlab.commands.quickstart import quickstart_config_path
from ditlab.config import load_config
from ditlab.models import DiT
from ditlab.models.onednn import use_onednn_linear
from ditlab.train import distributed as D
from ditlab.train import trainer as trainer_module
from ditlab.train.batch import prepare_batch
from ditlab.train.logger import Window
from ditlab.train.order import mix_seed
from ditlab.train.threads import CpuOthers

# The quickstart recipe's shape, and the three shapes of bench_throughput.py (same batches).
CASES = {
    "quickstart": dict(input_size=28, in_channels=1, patch_size=4, hidden_size=128, depth=4, num_heads=4, num_classes=10, batch=32),
    "h128": dict(input_size=28, in_channels=1, patch_size=4, hidden_size=128, depth=4, num_heads=4, num_classes=10, batch=128),
    "h256": dict(input_size=28, in_channels=1, patch_size=2, hidden_size=256, depth=6, num_heads=4, num_classes=10, batch=64),
    "dits4": dict(input_size=32, in_channels=4, patch_size=4, hidden_size=384, depth=12, num_heads=6, num_classes=1000, batch=32),
}
PHASES = ("data", "forward", "backward", "clip", "sync", "optim", "ema", "log")


class Synthetic(torch.utils.data.Dataset):
    """Random images/latents and labels for shapes the shipped MNIST sample does not have."""

    def __init__(self, c: int, size: int, num_classes: int, n: int = 2048):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, c, size, size, generator=g).clamp(-1, 1)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def build_trainer(case: dict, out: Path, onednn: bool = True):
    kw = {k: v for k, v in case.items() if k != "batch"}
    overrides = [f"model.{k}={v}" for k, v in kw.items()] + [
        f"optim.batch_size={case['batch']}", f"train.out_dir={out}", "train.tensorboard=false", "train.progress=false",
        f"train.onednn_linear={str(onednn).lower()}"]
    cfg = load_config(quickstart_config_path(), overrides)
    real = trainer_module.build_dataset
    if (case["in_channels"], case["input_size"]) != (1, 28):
        trainer_module.build_dataset = lambda cfg: Synthetic(case["in_channels"], case["input_size"], case["num_classes"])
    try:
        return trainer_module.Trainer(cfg, device="cpu")
    finally:
        trainer_module.build_dataset = real


def official_update_ema(ema_model, model, decay):
    """The official train.py's update_ema."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in OrderedDict(model.named_parameters()).items():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


class Stepper:
    """One training step in the trainer's order, each phase timed; `official` swaps in the official model's step."""

    def __init__(self, tr, official_model=None):
        self.tr, self.cfg = tr, tr.cfg
        self.loader = iter(tr._loader(10**9))
        self.window = Window()
        if official_model is None:
            self.model, self.opt, self.ema = tr.model, tr.optimizer, lambda: tr.ema.update(tr.raw)
        else:
            self.model = official_model
            self.opt = torch.optim.AdamW(official_model.parameters(), lr=self.cfg.optim.lr, weight_decay=0)
            ema = copy.deepcopy(official_model).requires_grad_(False)
            self.ema = lambda: official_update_ema(ema, official_model, tr.ema.current_decay())
        self.model.train()

    def step(self) -> dict[str, float]:
        tr, cfg = self.tr, self.cfg
        t = [time.perf_counter()]
        seed = mix_seed(cfg.train.seed, tr.step, 0)
        x, y = next(self.loader)
        x, y = prepare_batch(x, y, num_classes=tr.raw.num_classes, device=tr.device, gen_cpu=torch.Generator().manual_seed(seed),
                             paired_flip=False, random_flip=cfg.data.random_flip)
        t.append(time.perf_counter())
        torch.manual_seed(seed)
        out = tr.objective.loss(self.model, x, y, generator=torch.Generator().manual_seed(seed))
        t.append(time.perf_counter())
        out["loss"].backward()
        t.append(time.perf_counter())
        D.clip_gradients(self.model, cfg.optim.grad_clip, False)
        t.append(time.perf_counter())
        terms = {k: v.detach().float() for k, v in out.items()}
        names = sorted(terms)
        logged = dict(zip(names, torch.stack([terms[k] for k in names]).cpu().tolist()))
        assert logged["loss"] == logged["loss"]
        t.append(time.perf_counter())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        self.ema()
        t.append(time.perf_counter())
        self.window.add(logged)
        t.append(time.perf_counter())
        return {p: t[i + 1] - t[i] for i, p in enumerate(PHASES)}


def load_official(path: str):
    spec = importlib.util.spec_from_file_location("official_dit_models", Path(path) / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_state() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except OSError:
        return "load average n/a"


@torch.no_grad()
def sample_rate(model, diffusion, case: dict, n: int, noise: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    z = torch.cat([noise, noise])
    y = torch.cat([labels, torch.full_like(labels, case["num_classes"])])
    start = time.perf_counter()
    diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                            model_kwargs=dict(y=y, cfg_scale=4.0), progress=False, device="cpu")
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="quickstart,h128,h256,dits4", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--official", nargs="?", const=os.environ.get("DITLAB_OFFICIAL_DIT"), default=None,
                        help="compare with the official DiT at PATH (default: $DITLAB_OFFICIAL_DIT)")
    parser.add_argument("--sample-steps", type=int, default=10, help="diffusion steps of the sampling comparison (0: skip)")
    parser.add_argument("--sample-batch", type=int, default=16, help="images per sampling run (2x through the model)")
    parser.add_argument("--ops", action="store_true", help="print the op profile of ditlab's step")
    parser.add_argument("--no-onednn", action="store_true",
                        help="ditlab's linear layers with PyTorch's own products (train.onednn_linear=false)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    official = None
    if args.official:
        official = load_official(args.official)
        sys.path.insert(0, args.official)
        from diffusion import create_diffusion as official_create_diffusion  # the official package
    others = CpuOthers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, {load_state()} at start")
    tmp = tempfile.TemporaryDirectory()
    for name in args.cases.split(","):
        case = CASES[name]
        tr = build_trainer(case, Path(tmp.name) / name, onednn=not args.no_onednn)
        ours = Stepper(tr)
        theirs = None
        if official is not None:
            kw = {k: v for k, v in case.items() if k != "batch"}
            om = official.DiT(**kw, learn_sigma=tr.raw.learn_sigma)
            om.load_state_dict(tr.raw.state_dict())
            theirs = Stepper(tr, om)
        for s in (ours, theirs):  # warm-up (first-call allocations, oneDNN primitive caches)
            if s is not None:
                s.step()
        times: dict[str, list[dict]] = {"ditlab": [], "official": []}
        others(1)
        for _ in range(args.repeats):
            for label, s in (("ditlab", ours), ("official", theirs)):
                if s is not None:
                    times[label] += [s.step() for _ in range(args.steps)]
        busy = others(torch.get_num_threads())
        b = case["batch"]
        med = {p: statistics.median(t[p] for t in times["ditlab"]) for p in PHASES}
        step = statistics.median(sum(t.values()) for t in times["ditlab"])
        print(f"\n{name}: {case} | other processes busy on {busy:.2f} cores, {load_state()}")
        print("  ditlab step   " + "  ".join(f"{p} {1e3 * med[p]:.1f}" for p in PHASES) + "  (ms, medians)")
        print("  share         " + "  ".join(f"{p} {100 * med[p] / sum(med.values()):.0f}%" for p in PHASES))
        print(f"  ditlab        {1e3 * step:.1f} ms/step = {b / step:.0f} img/s")
        if theirs is not None:
            omed = {p: statistics.median(t[p] for t in times["official"]) for p in PHASES}
            ostep = statistics.median(sum(t.values()) for t in times["official"])
            print("  official step " + "  ".join(f"{p} {1e3 * omed[p]:.1f}" for p in PHASES))
            print(f"  official      {1e3 * ostep:.1f} ms/step = {b / ostep:.0f} img/s   train ratio ditlab/official x{ostep / step:.2f}")
            if args.sample_steps:
                from ditlab.diffusion import create_diffusion

                n = args.sample_batch
                g = torch.Generator().manual_seed(0)
                noise = torch.randn(n, case["in_channels"], case["input_size"], case["input_size"], generator=g)
                labels = torch.randint(0, case["num_classes"], (n,), generator=g)
                ours_s = DiT(**kw)  # learned sigma, as the official sample.py's models
                theirs_s = official.DiT(**kw)
                theirs_s.load_state_dict(ours_s.state_dict())
                if tr.cfg.train.onednn_linear:  # as build_model (and so `ditlab sample`) gives it
                    use_onednn_linear(ours_s)
                pairs = (("ditlab", ours_s, create_diffusion(str(args.sample_steps))),
                         ("official", theirs_s, official_create_diffusion(str(args.sample_steps))))
                rates = {"ditlab": [], "official": []}
                for _ in range(args.repeats):
                    for label, model, diff in pairs:
                        rates[label].append(sample_rate(model, diff, case, n, noise, labels))
                sm = {k: statistics.median(v) for k, v in rates.items()}
                print(f"  sampling      {args.sample_steps} DDPM steps, {n} images (cfg 4): ditlab {sm['ditlab']:.1f} vs official "
                      f"{sm['official']:.1f} img/s   ratio x{sm['ditlab'] / sm['official']:.2f}")
        if args.ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    ours.step()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            products = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")
            mm = sum(e.self_cpu_time_total for e in events if e.key in products)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            print(f"  matrix products: {100 * mm / total:.0f}% of self CPU time")
    print(f"\n{load_state()} at the end")


if __name__ == "__main__":
    main()
