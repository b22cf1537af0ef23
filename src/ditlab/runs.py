"""Run folders: their layout, finding and reading checkpoints, and loading a run to sample it.

    RUN/config.yaml                              the run's resolved config
    RUN/log.csv, RUN/tb/, RUN/samples/           training logs and samples (PNG grids; .txt for byte LMs)
    RUN/checkpoints/step_0000500/                model.safetensors, ema.safetensors, state.pt, config.yaml
    RUN/checkpoints/latest                       text file holding "step_0000500"
    RUN/.lock                                    flock'ed by the process training the run (holds its pid)

`load_run(path)` turns any of a run folder, a step folder or a weights file into a `Run`: the
config, the model with its (EMA) weights, the objective with its saved state, and the codec.
Every command that samples a checkpoint goes through it and `ditlab.sampling.generate` (images)
or `ditlab.sampling.generate_text` (byte language models, which have no codec).
(Writing checkpoints is the trainer's job: `ditlab.train.checkpoint`.)
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ditlab.codecs import Codec, load_codec
from ditlab.config import Config, config_to_dict, is_language_model, load_run_config
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


# ---- the run lock --------------------------------------------------------------------------
# One training process per run folder: two writers would interleave log rows, overwrite each
# other's checkpoints and point `latest` at a mix of both. An OS lock (flock on RUN/.lock) is
# freed by the kernel when its holder exits, crashed or not, so a stale lock never needs
# cleaning up by hand. The file holds the holder's pid, for the refusal message.

LOCK = ".lock"
try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked there
    fcntl = None


@dataclass
class _HeldLock:
    fd: int
    created: list[Path]  # folders this process created for the run, outermost first


_HELD: dict[Path, _HeldLock] = {}


def lock_run_dir(run_dir: str | Path) -> None:
    """Create RUN (and its parents) and lock it for this process, or fail with one line naming
    the pid that holds it. Re-entrant within a process; `release_run_dir` or the process's end
    frees it."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        try:
            if os.stat(run_dir / LOCK).st_ino == os.fstat(_HELD[key].fd).st_ino:
                return
        except OSError:
            pass
        os.close(_HELD.pop(key).fd)  # the folder was deleted and made again since: lock the new one
    created = [d for d in [run_dir, *run_dir.parents] if not d.exists()][::-1]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _remove_empty(created)
        raise DitlabError(f"output folder {run_dir} is not writable: {e.strerror or e}") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)  # opening the lock file changed nothing of the other run
            raise DitlabError(f"{run_dir} is in use by another ditlab process (pid {holder}); wait for it "
                              "or stop it, or choose another train.out_dir") from None
        # A filesystem without flock (some network mounts): go on unlocked rather than refuse every run.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # e.g. a full disk: better now than at the first checkpoint
        os.close(fd)
        _remove_empty(created, lock=True)
        raise DitlabError(f"output folder {run_dir} is not writable: {e.strerror or e}") from None
    _HELD[key] = _HeldLock(fd, created)


def release_run_dir(run_dir: str | Path) -> None:
    """Free this process's lock on RUN (a no-op when it holds none). A run folder this process
    created and left holding nothing but the lock (setup failed before training) is removed."""
    held = _HELD.pop(Path(run_dir).resolve(), None)
    if held is None:
        return
    _remove_empty(held.created, lock=True)  # while still locked: nobody else can be starting in it
    os.close(held.fd)


def _remove_empty(created: list[Path], lock: bool = False) -> None:
    """Remove the folders of `created` (innermost first) that hold nothing (but the lock file)."""
    for d in reversed(created):
        try:
            if lock and {p.name for p in d.iterdir()} == {LOCK}:
                (d / LOCK).unlink()
            d.rmdir()
        except OSError:
            return  # not empty, or gone: keep it and everything above it


# ---- resuming -----------------------------------------------------------------------------

# What a resume may change: where the run goes and how long it runs (budget), what it reports
# (logging, sample grids, sampling settings), where its data lives and how it is loaded and
# spread over devices (the data order is a function of (seed, step), any layout with the same
# global batch trains the same run), and the warm-up length. Everything else (model,
# objective, optimizer, batch, seed, EMA, precision, data content, codec scaling) defines the
# experiment: changing it under an existing checkpoint would make one run of two experiments.
RESUMABLE_CHANGES = (
    "train.out_dir", "train.steps", "train.time_budget_s", "train.log_every", "train.ckpt_every",
    "train.sample_every", "train.keep_last", "train.progress", "train.tensorboard", "train.compile", "train.onednn_linear",
    "train.fsdp", "train.grad_accum", "model.grad_checkpointing", "optim.warmup_steps", "data.path",
    "data.num_workers", "vae.path", "sample.*",
)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# Measured state that older checkpoints kept in their config: None in the new config means "take
# the checkpoint's", which is what resuming does.
MEASURED_WHEN_NONE = ("objective.data_std",)


def resume_changes(saved: Config, new: Config) -> list[str]:
    """'key: old -> new' for the settings `new` changes from `saved` that a resume may not change."""
    old, cur = _flat(config_to_dict(saved)), _flat(config_to_dict(new))
    allowed = set(RESUMABLE_CHANGES)
    return [f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in cur if old.get(k) != cur.get(k)
            and k not in allowed and f"{k.split('.')[0]}.*" not in allowed
            and not (k in MEASURED_WHEN_NONE and cur.get(k) is None)]


def check_resume_config(step_dir: Path, cfg: Config) -> None:
    """Refuse to resume `step_dir` with a config that changes the experiment (one line naming the keys)."""
    saved = _config_near(step_dir / "model.safetensors")
    if saved is None:
        return  # a checkpoint without any config: nothing to compare (its weights are still checked)
    changed = resume_changes(saved, cfg)
    if changed:
        raise DitlabError(f"--resume would change the experiment of {step_dir}: {'; '.join(changed)} (a resume "
                          "may change only the budget, logging, sampling and data-loading settings; start a new "
                          "run in another train.out_dir instead)")


def prepare_run_dir(run_dir: str | Path, resume: bool | str | Path, cfg: Config | None = None) -> Path | None:
    """Create and lock RUN; return the step dir to resume from (None: a new run).

    A folder that already holds checkpoints is only continued with `resume`; `resume` may also
    name another checkpoint to start from. With `cfg`, a resume that would change the
    experiment (`RESUMABLE_CHANGES`) is refused. On any refusal the lock is released again.
    """
    run_dir = Path(run_dir)
    lock_run_dir(run_dir)
    try:
        latest = latest_checkpoint(run_dir)
        if resume and resume is not True:
            step_dir = resolve_checkpoint(resume)[0].parent
        elif resume:
            if latest is None:
                raise DitlabError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
            step_dir = latest
        elif latest is not None:
            raise DitlabError(f"{run_dir} already holds checkpoints (latest {latest.name}); "
                              "pass --resume to continue it or choose another train.out_dir")
        else:
            return None
        if cfg is not None:
            check_resume_config(step_dir, cfg)
        return step_dir
    except BaseException:
        release_run_dir(run_dir)
        raise


@dataclass
class Run:
    """A model ready to sample: what `ditlab.sampling.generate` (or `generate_text`) takes."""

    cfg: Config
    model: nn.Module
    objective: Objective
    codec: Codec | None = None
    weights: Path | None = None  # the file the weights came from (None: built in memory)
    step: int | None = None  # training step of those weights, when known

    @property
    def is_language_model(self) -> bool:
        """A byte LM (`model(x) -> logits`, sampled with `generate_text`) rather than an image model."""
        return is_language_model(self.cfg)


def build_run(cfg: Config, state_dict: dict[str, Tensor] | None = None, *, device: str | torch.device = "cpu",
              objective_state: dict | None = None, source: str = "checkpoint", codec: Codec | None = None) -> Run:
    """A Run from a config and weights (e.g. an official .pt read by `ditlab sample`); `codec`: the one
    `cfg.vae` names when the caller has loaded it already (else it is loaded here)."""
    model = build_model(cfg)
    if state_dict is not None:
        check_state_dict(model, state_dict, source)  # one line naming the keys/shapes that differ
        model.load_state_dict(state_dict, strict=True)
    objective = build_objective(cfg)
    if objective_state:
        objective.load_state_dict(objective_state)
    codec = codec.to(device) if codec is not None else load_codec(cfg.vae, device)
    if codec is not None and codec.latent_channels != model.in_channels:
        raise DitlabError(f"the VAE has {codec.latent_channels} latent channels but the model takes {model.in_channels}")
    return Run(cfg, model.to(device).eval(), objective, codec)


def choose_weights(weights: Path, ema: bool) -> Path:
    """The raw weights beside `weights` when `ema=False` and the step holds both, else `weights`."""
    if not ema and weights.name == "ema.safetensors" and (weights.parent / "model.safetensors").is_file():
        return weights.parent / "model.safetensors"
    return weights


def saved_objective_state(weights: Path) -> dict | None:
    """The objective state saved beside ditlab weights (e.g. a flow's measured data std), or None."""
    if not (weights.parent / "state.pt").is_file():
        return None
    return load_state(weights.parent, mmap=True).get("objective")


def load_run(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> Run:
    """Load a ditlab run folder, step folder or weights file (EMA weights unless `ema=False`)."""
    weights, cfg = resolve_checkpoint(Path(path).expanduser())
    if cfg is None:
        raise DitlabError(f"{weights} has no config.yaml beside it (an official DiT checkpoint? "
                          "sample it with `ditlab sample --model ...`)")
    weights = choose_weights(weights, ema)
    run = build_run(cfg, read_weights(weights), device=device, objective_state=saved_objective_state(weights),
                    source=f"checkpoint {weights}")
    run.weights, run.step = weights, checkpoint_step(weights)
    return run
