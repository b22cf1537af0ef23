"""Run folders: their layout, finding and reading checkpoints, and loading a run to sample it.

    RUN/config.yaml                              the run's resolved config
    RUN/log.csv, RUN/tb/, RUN/samples/           training logs and sample grids
    RUN/checkpoints/step_0000500/                model.safetensors, ema.safetensors, state.pt, config.yaml
    RUN/checkpoints/latest                       text file holding "step_0000500"

`load_run(path)` turns any of a run folder, a step folder or a weights file into a `Run`: the
config, the model with its (EMA) weights, the objective with its saved state, and the codec.
Every command that samples a checkpoint goes through it and `ditlab.sampling.generate`.
(Writing checkpoints is the trainer's job: `ditlab.train.checkpoint`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ditlab.codecs import Codec, load_codec
from ditlab.config import Config, load_run_config
from ditlab.errors import DitlabError
from ditlab.models import build_model
from ditlab.models.loading import check_state_dict
from ditlab.objectives import Objective, build_objective

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHT_FILES = ("ema.safetensors", "model.safetensors")  # resolve_checkpoint prefers the EMA


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step directory `RUN/checkpoints/latest` points to, or None when there is none."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    step_dir = ckpt_dir / name
    if not name or not step_dir.is_dir():
        raise DitlabError(f"{pointer} points to '{name}', which does not exist")
    return step_dir


def _config_near(weights: Path) -> Config | None:
    for candidate in (weights.parent / "config.yaml", weights.parent.parent.parent / "config.yaml"):
        if candidate.is_file():
            return load_run_config(candidate)
    return None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Config | None]:
    """(weights file, Config or None) for a run dir, a step dir, `RUN/checkpoints` or a weights file.

    Directories resolve through `latest` to a step directory, where the EMA weights are
    preferred over the raw ones. The config is the step's config.yaml (or the run's).
    """
    path = Path(path)
    if not path.exists():
        raise DitlabError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return path, _config_near(path)
        return path, None  # e.g. an official DiT .pt checkpoint: the caller knows its format
    step_dir = path
    if (path / CHECKPOINTS).is_dir():
        step_dir = latest_checkpoint(path)
        if step_dir is None:
            raise DitlabError(f"run {path} has no checkpoint yet")
    elif (path / LATEST).is_file():
        step_dir = latest_checkpoint(path.parent)
    for name in WEIGHT_FILES:
        if (step_dir / name).is_file():
            return step_dir / name, _config_near(step_dir / name)
    raise DitlabError(f"no {' or '.join(WEIGHT_FILES)} in {step_dir}")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise DitlabError(f"cannot read weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_state(step_dir: str | Path, mmap: bool = False) -> dict:
    """The training state of a step directory (step, optimizer, EMA count, RNG, objective state).

    `mmap=True` maps the file instead of reading it: cheap when only a small entry is needed.
    """
    path = Path(step_dir) / "state.pt"
    if not path.is_file():
        raise DitlabError(f"checkpoint {step_dir} has no state.pt (cannot resume from weights alone)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise DitlabError(f"corrupt checkpoint state {path}: {str(e).splitlines()[0]}") from None


def checkpoint_step(weights: str | Path) -> int | None:
    """The training step stored in a ditlab weights file's metadata (None if absent)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            step = (f.metadata() or {}).get("ditlab_step")
    except Exception:
        return None
    return int(step) if step is not None else None


def resolve_device(name: str) -> torch.device:
    """A device name as a torch.device, failing with one line when it is unknown or absent here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DitlabError(f"unknown --device '{name}' (choose cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DitlabError(f"--device {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DitlabError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def prepare_run_dir(run_dir: str | Path, resume: bool | str | Path) -> Path | None:
    """Create RUN and check it is writable; return the step dir to resume from (None: a new run).

    A folder that already holds checkpoints is only continued with `resume`; `resume` may also
    name another checkpoint to start from.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DitlabError(f"output folder {run_dir} is not writable: {e.strerror or e}") from None
    latest = latest_checkpoint(run_dir)
    if resume and resume is not True:
        return resolve_checkpoint(resume)[0].parent
    if resume:
        if latest is None:
            raise DitlabError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
        return latest
    if latest is not None:
        raise DitlabError(f"{run_dir} already holds checkpoints (latest {latest.name}); "
                          "pass --resume to continue it or choose another train.out_dir")
    return None


@dataclass
class Run:
    """A model ready to sample: what `ditlab.sampling.generate` takes."""

    cfg: Config
    model: nn.Module
    objective: Objective
    codec: Codec | None = None
    weights: Path | None = None  # the file the weights came from (None: built in memory)
    step: int | None = None  # training step of those weights, when known


def build_run(cfg: Config, state_dict: dict[str, Tensor] | None = None, *, device: str | torch.device = "cpu",
              objective_state: dict | None = None, source: str = "checkpoint") -> Run:
    """A Run from a config and weights (e.g. an official .pt read by `ditlab sample`)."""
    model = build_model(cfg)
    if state_dict is not None:
        check_state_dict(model, state_dict, source)  # one line naming the keys/shapes that differ
        model.load_state_dict(state_dict, strict=True)
    objective = build_objective(cfg)
    if objective_state:
        objective.load_state_dict(objective_state)
    codec = load_codec(cfg.vae, device)
    if codec is not None and codec.latent_channels != model.in_channels:
        raise DitlabError(f"the VAE has {codec.latent_channels} latent channels but the model takes {model.in_channels}")
    return Run(cfg, model.to(device).eval(), objective, codec)


def load_run(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> Run:
    """Load a ditlab run folder, step folder or weights file (EMA weights unless `ema=False`)."""
    weights, cfg = resolve_checkpoint(Path(path).expanduser())
    if cfg is None:
        raise DitlabError(f"{weights} has no config.yaml beside it (an official DiT checkpoint? "
                          "sample it with `ditlab sample --model ...`)")
    if not ema and weights.name == "ema.safetensors" and (weights.parent / "model.safetensors").is_file():
        weights = weights.parent / "model.safetensors"
    objective_state = None
    if (weights.parent / "state.pt").is_file():  # e.g. a flow objective's measured data std
        objective_state = load_state(weights.parent, mmap=True).get("objective")
    run = build_run(cfg, read_weights(weights), device=device, objective_state=objective_state,
                    source=f"checkpoint {weights}")
    run.weights, run.step = weights, checkpoint_step(weights)
    return run
