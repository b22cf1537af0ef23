"""One typed configuration for a run: dataclasses, read from YAML, overridden from the command line.

    cfg = load_config("configs/mnist.yaml", ["optim.lr=2e-4", "model.name=DiT-S/2"])

Every field has a default, so an empty YAML file is a valid (MNIST, class-conditional) run.
`validate` holds every check of values against each other that needs no model or data; it runs
on each `load_config` and again before training (code may edit a loaded config). The
`objective` section is flat: `OBJECTIVE_FIELDS` says which fields belong to which kind, and a
field of another kind set away from its default is an error; likewise image settings in a
byte-language-model config and LM settings in an image config (`LM_FIELDS`). The resolved
config is saved beside every run and checkpoint (`save_config`); `load_run_config` reads those
back, also the ones older versions of ditlab wrote.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ditlab.errors import DitlabError
from ditlab.io import write_atomic


@dataclass
class ModelConfig:
    name: str = "DiT-S/4"  # a key of ditlab.models.DiT_models, or "unet"
    input_size: int = 28  # image side (pixels, or latent side with a VAE/tokenizer)
    in_channels: int = 1
    num_classes: int = 10  # 0 = unconditional
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = True  # output 2*C channels (eps + interpolated log-variance)
    # Overrides of the named size; None keeps the official value.
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    # Architecture variants; the defaults are the official DiT.
    conditioning: str = "adaln_zero"  # adaln_zero | adaln | cross_attn | in_context
    # embedding | onehot (bias-free Linear: a lookup table, the control) | onehot_mlp | onehot_tokens | scalar
    class_encoding: str = "embedding"
    pos_embed: str = "sincos"  # sincos | rope
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm | dyt
    qk_norm: bool = False
    token_layout: str = "2d"  # 2d | 3d (image as a T=1 clip, Conv3d patches) | channels_as_tokens
    token_dim: int | None = None  # decoupled tokenizer output dim, projected to hidden_size
    step_size_cond: bool = False  # condition on the step size d (shortcut models)
    grad_checkpointing: bool = False
    # U-Net baseline (name: unet)
    unet_channels: int = 64
    unet_channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    unet_num_res_blocks: int = 2
    unet_attn_resolutions: list[int] = field(default_factory=lambda: [7])
    unet_dropout: float = 0.0
    # Byte-level language model (name: byte-lm, ditlab.models.lm). hidden_size, depth, num_heads,
    # mlp_ratio and norm (rmsnorm | layernorm | dyt) apply to it too; None sizes mean 256, 4, 4.
    lm_seq_len: int = 256  # bytes per training window (the whole context of a vanilla model)
    lm_pos: str = "rope"  # rope | learned
    lm_attention: str = "vanilla"  # vanilla | infini (Infini-Attention: segments + compressive memory)
    lm_segment_len: int | None = None  # infini: bytes per segment; divides lm_seq_len
    lm_memory_update: str = "linear"  # infini: linear | delta
    lm_gate_init: float = 0.0  # infini: initial memory gate logit per head (0: half memory, half local)
    lm_bptt: str = "full"  # infini: full | truncated | k (detach the memory every k segments)
    lm_dyt_alpha_init: float = 0.5  # norm=dyt
    lm_embed_scale: bool = False  # a learnable scalar on the byte embeddings, from sqrt(hidden_size) (DyT's LLM recipe)
    lm_dropout: float = 0.0


@dataclass
class ObjectiveConfig:
    kind: str = "gaussian"  # gaussian | flow | shortcut; the fields of each kind: OBJECTIVE_FIELDS
    # Gaussian diffusion (official create_diffusion semantics)
    noise_schedule: str = "linear"  # linear | squaredcos_cap_v2 (cosine) | quadratic
    diffusion_steps: int = 1000
    predict_xstart: bool = False
    use_kl: bool = False
    sigma_small: bool = False
    rescale_learned_sigmas: bool = False
    timestep_sampler: str = "uniform"  # uniform | loss-second-moment (IDDPM importance sampling of t)
    # Flow matching (linear interpolant x_t = (1-t) x0 + t noise, as in SiT)
    prediction: str = "velocity"  # velocity | noise | data
    time_sampling: str = "uniform"  # uniform | logit_normal | lognormal
    time_mean: float = 0.0
    time_std: float = 1.0
    cosine_loss_weight: float = 0.0  # FasterDiT velocity-direction loss
    data_std_target: float | None = None  # FasterDiT: scale data to this std (e.g. 0.82)
    data_std: float | None = None  # std of the data; None = measured on the first batch (kept in the checkpoint)
    # Shortcut models (Frans et al. 2024)
    shortcut_fraction: float = 0.25
    shortcut_base_steps: int = 128


@dataclass
class SampleConfig:
    # None = the objective's own default (gaussian: ddpm 250; flow: euler 250; shortcut: shortcut 4)
    sampler: str | None = None  # gaussian: ddpm | ddim; flow: euler | heun | dopri5; shortcut: shortcut
    steps: int | None = None
    cfg_scale: float = 1.0
    guidance_interval: list[float] | None = None  # [t_lo, t_hi] in [0, 1], t=1 noise: guide only inside
    clip_denoised: bool = True  # clip predicted x0 to [-1, 1] in pixel space
    eta: float = 0.0  # DDIM only
    num_samples: int = 100
    batch_size: int = 100
    seed: int = 0
    # Byte LMs: the text sample written during training, and the defaults of `ditlab lm generate`
    prompt: str = "The "
    max_new_bytes: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # sample among the k most likely bytes; None = all


@dataclass
class DataConfig:
    source: str = "mnist-embedded"  # mnist-embedded | mnist | fashion-mnist | folder | latents | text
    path: str | None = None  # dataset dir (text: a corpus file); None = $DITLAB_DATA/<source> where that applies
    split: str = "train"
    image_size: int = 28
    random_flip: bool = False
    num_workers: int = 0


@dataclass
class VAEConfig:
    path: str | None = None  # local diffusers AutoencoderKL directory or single file
    scale_factor: float = 0.18215
    sample_posterior: bool = True  # encode to a posterior sample (DiT); False = its mean


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon on the transformer blocks' matrices, AdamW on the rest: train/optim.py)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr
    lr_schedule: str = "constant"  # constant | cosine (after warm-up, cosine decay to min_lr)
    min_lr: float = 0.0  # cosine: the floor
    decay_steps: int | None = None  # cosine: the step that reaches min_lr (and stays there); None = train.steps
    grad_clip: float | None = None
    batch_size: int = 256  # global batch, split over ranks


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    time_budget_s: float | None = None  # stop early when wall-clock exceeds this
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay ramps as min(d, (1+n)/(10+n)) so short runs work
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    # CPU fp32: nn.Linear's products in oneDNN instead of MKL (`models/onednn.py`; 1.2-1.8x faster
    # training steps on the AVX-512 CPU measured, same weights). Runs saved without this field read as false.
    onednn_linear: bool = True
    fsdp: bool = False
    grad_accum: int = 1  # micro-batches per rank and step (global batch = world x accum x micro)
    tensorboard: bool = True
    progress: bool = True


CONFIG_FORMAT = 2  # 0.1 wrote no format_version; `load_run_config` reads both


@dataclass
class Config:
    format_version: int = CONFIG_FORMAT  # of the file a run saved (see load_run_config)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


OBJECTIVE_KINDS = ("gaussian", "flow", "shortcut", "next-byte")
# Which `objective` fields each kind reads; the others must keep their defaults.
OBJECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "gaussian": ("noise_schedule", "diffusion_steps", "predict_xstart", "use_kl", "sigma_small",
                 "rescale_learned_sigmas", "timestep_sampler"),
    "flow": ("prediction", "time_sampling", "time_mean", "time_std", "cosine_loss_weight", "data_std_target",
             "data_std"),
    "shortcut": ("shortcut_fraction", "shortcut_base_steps"),
    "next-byte": (),
}
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "muon")

# A byte language model is model.name=byte-lm trained with objective.kind=next-byte on
# data.source=text. It reads only some fields of the sections below (LM_FIELDS, its own ones
# included); the others describe images and must keep their defaults in an LM config, and
# its own ones (LM_ONLY) must keep theirs in an image config, as for the objective kinds.
LM_MODEL = "byte-lm"
LM_ONLY: dict[str, tuple[str, ...]] = {
    "model": ("lm_seq_len", "lm_pos", "lm_attention", "lm_segment_len", "lm_memory_update", "lm_gate_init",
              "lm_bptt", "lm_dyt_alpha_init", "lm_embed_scale", "lm_dropout"),
    "sample": ("prompt", "max_new_bytes", "temperature", "top_k"),
}
LM_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("name", "hidden_size", "depth", "num_heads", "mlp_ratio", "norm", *LM_ONLY["model"]),
    "sample": ("seed", *LM_ONLY["sample"]),
    "data": ("source", "path", "split", "num_workers"),
    "vae": (),
}
# Infini-Attention settings, which a vanilla LM must leave at their defaults.
INFINI_ONLY = ("lm_segment_len", "lm_memory_update", "lm_gate_init", "lm_bptt")


def is_language_model(cfg: Config) -> bool:
    """Whether cfg describes a byte language model (validate makes model, objective and data agree)."""
    return cfg.model.name == LM_MODEL


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or fail naming the field."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise DitlabError(f"config {where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, where) for v in value]
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise DitlabError(f"config {where}: cannot read {value!r} as {hint.__name__}") from None
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise DitlabError(f"config: unknown key '{where}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DitlabError(f"config {where}: expected a section, got {value!r}")
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def split_config_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """Allow `ditlab train key=value ...` without a YAML file."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["optim.lr=2e-4", "model.name=DiT-B/2"] into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise DitlabError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        node = nested
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return nested


def _foreign_objective_fields(cfg: Config) -> list[str]:
    """`objective` fields of another kind than cfg.objective.kind that differ from their defaults."""
    o, default = cfg.objective, ObjectiveConfig()
    own = OBJECTIVE_FIELDS.get(o.kind, ())
    return [name for kind, names in OBJECTIVE_FIELDS.items() if kind != o.kind
            for name in names if name not in own and getattr(o, name) != getattr(default, name)]


def _other_family_fields(cfg: Config) -> list[str]:
    """'section.field' of the settings the config's kind of model does not read, set away from
    their defaults: image settings in a byte-LM config, byte-LM settings in an image config."""
    default, lm = Config(), is_language_model(cfg)
    found = []
    for section, lm_names in (LM_FIELDS if lm else LM_ONLY).items():
        ours, theirs = getattr(cfg, section), getattr(default, section)
        names = [f.name for f in dataclasses.fields(ours) if f.name not in lm_names] if lm else lm_names
        found += [f"{section}.{name}" for name in names if getattr(ours, name) != getattr(theirs, name)]
    return found


def _lm_checks(cfg: Config) -> list[tuple[bool, str]]:
    """validate's checks of a byte-LM config (the model checks its choices, e.g. norm, itself)."""
    m, s = cfg.model, cfg.sample
    infini = m.lm_attention == "infini"
    infini_set = next((name for name in INFINI_ONLY if getattr(m, name) != getattr(ModelConfig(), name)), None)
    return [
        (m.lm_seq_len >= 1, f"model.lm_seq_len must be >= 1, got {m.lm_seq_len}"),
        (not infini or (m.lm_segment_len or 0) >= 1,
         f"model.lm_attention=infini needs model.lm_segment_len >= 1, got {m.lm_segment_len}"),
        (not infini or not m.lm_segment_len or m.lm_seq_len % m.lm_segment_len == 0,
         f"model.lm_seq_len={m.lm_seq_len} is not divisible by model.lm_segment_len={m.lm_segment_len}"),
        (m.lm_attention != "vanilla" or infini_set is None,
         f"model.{infini_set} applies to model.lm_attention=infini only (this model is vanilla)"),
        (len(s.prompt) > 0, "sample.prompt must not be empty"),
        (s.max_new_bytes >= 1, f"sample.max_new_bytes must be >= 1, got {s.max_new_bytes}"),
        (s.temperature >= 0 and math.isfinite(s.temperature), f"sample.temperature must be >= 0, got {s.temperature}"),
        (s.top_k is None or s.top_k >= 1, f"sample.top_k must be >= 1 (or null = all bytes), got {s.top_k}"),
    ]


def _model_size_checks(m: ModelConfig) -> list[tuple[bool, str]]:
    """Sizes of the model section. torch builds a depth-0 or depth -1 DiT without a word (an
    empty block list), which then trains and samples as if it were a model."""
    checks = [(getattr(m, name) is None or getattr(m, name) >= 1,
               f"model.{name} must be >= 1 (or null: the named model's), got {getattr(m, name)}")
              for name in ("hidden_size", "depth", "num_heads", "patch_size", "token_dim")]
    return checks + [
        (m.input_size >= 1, f"model.input_size must be >= 1, got {m.input_size}"),
        (m.in_channels >= 1, f"model.in_channels must be >= 1, got {m.in_channels}"),
        (m.num_classes >= 0, f"model.num_classes must be >= 0 (0 = unconditional), got {m.num_classes}"),
        (m.mlp_ratio > 0 and math.isfinite(m.mlp_ratio), f"model.mlp_ratio must be > 0, got {m.mlp_ratio}"),
        (0 <= m.class_dropout_prob <= 1, f"model.class_dropout_prob must be in [0, 1], got {m.class_dropout_prob}"),
    ]


def validate(cfg: Config) -> Config:
    """Raise one DitlabError line for the first setting that cannot work; return cfg."""
    o, s, t, opt = cfg.objective, cfg.sample, cfg.train, cfg.optim
    if o.kind not in OBJECTIVE_KINDS:
        raise DitlabError(f"unknown objective.kind '{o.kind}' (choose {', '.join(OBJECTIVE_KINDS)})")
    foreign = _foreign_objective_fields(cfg)
    if foreign:
        owner = {name: kind for kind, names in OBJECTIVE_FIELDS.items() for name in names}
        name = foreign[0]
        raise DitlabError(f"objective.{name}={getattr(o, name)!r} belongs to objective.kind {owner[name]}, "
                          f"not {o.kind} (remove it or change objective.kind)")
    lm_parts = (cfg.model.name == LM_MODEL, o.kind == "next-byte", cfg.data.source == "text")
    if any(lm_parts) and not all(lm_parts):
        raise DitlabError(f"a byte language model needs model.name={LM_MODEL}, objective.kind=next-byte and "
                          f"data.source=text together (got {cfg.model.name}, {o.kind}, {cfg.data.source})")
    other = _other_family_fields(cfg)
    if other:
        section, name = other[0].split(".")
        value = getattr(getattr(cfg, section), name)
        if is_language_model(cfg):
            raise DitlabError(f"{other[0]}={value!r} is an image-model setting; a byte language model "
                              f"(model.name={LM_MODEL}) does not read it (remove it)")
        raise DitlabError(f"{other[0]}={value!r} is a byte-language-model setting (model.name={LM_MODEL}); "
                          f"{cfg.model.name} does not read it (remove it)")
    interval = s.guidance_interval
    checks = [
        (s.eta == 0.0 or o.kind == "gaussian", f"sample.eta={s.eta} applies to Gaussian diffusion (ddim) only"),
        (interval is None or (len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0),
         f"sample.guidance_interval must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1, got {interval}"),
        (math.isfinite(s.cfg_scale), f"sample.cfg_scale must be a finite number, got {s.cfg_scale}"),
        *_model_size_checks(cfg.model),
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (s.num_samples >= 1, f"sample.num_samples must be >= 1, got {s.num_samples}"),
        (s.batch_size >= 1, f"sample.batch_size must be >= 1, got {s.batch_size}"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 = only at the end), got {t.ckpt_every}"),
        (t.sample_every >= 0, f"train.sample_every must be >= 0 (0 = only at the end), got {t.sample_every}"),
        (t.keep_last >= 0, f"train.keep_last must be >= 0 (0 = keep every checkpoint), got {t.keep_last}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (t.time_budget_s is None or t.time_budget_s >= 0, f"train.time_budget_s must be >= 0 seconds, got {t.time_budget_s}"),
        (t.precision in PRECISIONS, f"train.precision must be auto, fp32 or bf16, got '{t.precision}'"),
        (opt.name in OPTIMIZERS, f"unknown optim.name '{opt.name}' (choose {', '.join(OPTIMIZERS)})"),
        (opt.name != "muon" or not t.fsdp, "optim.name=muon needs whole matrices, which FSDP shards: use DDP (train.fsdp=false)"),
        (opt.batch_size >= 1, f"optim.batch_size must be >= 1, got {opt.batch_size}"),
        (opt.lr > 0 and math.isfinite(opt.lr), f"optim.lr must be > 0, got {opt.lr}"),
        (len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), f"optim.betas must be two numbers in [0, 1), got {opt.betas}"),
        (opt.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {opt.weight_decay}"),
        (opt.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}"),
        (opt.lr_schedule in LR_SCHEDULES,
         f"unknown optim.lr_schedule '{opt.lr_schedule}' (choose {', '.join(LR_SCHEDULES)})"),
        (0 <= opt.min_lr <= opt.lr, f"optim.min_lr must be in [0, optim.lr={opt.lr}], got {opt.min_lr}"),
        (opt.min_lr == 0 or opt.lr_schedule == "cosine", "optim.min_lr applies to optim.lr_schedule=cosine only"),
        (opt.decay_steps is None or opt.lr_schedule == "cosine", "optim.decay_steps applies to optim.lr_schedule=cosine only"),
        (opt.decay_steps is None or opt.decay_steps >= 1, f"optim.decay_steps must be >= 1, got {opt.decay_steps}"),
        (opt.grad_clip is None or opt.grad_clip >= 0, f"optim.grad_clip must be > 0 (or null/0 = off), got {opt.grad_clip}"),
    ]
    if is_language_model(cfg):
        checks += _lm_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise DitlabError(message)
    return cfg


def config_from_dict(values: dict[str, Any] | None) -> Config:
    cfg = Config()
    _apply(cfg, values or {})
    return cfg


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DitlabError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise DitlabError(f"config file {path} is not UTF-8 text (a binary file?)") from None
    except yaml.YAMLError as e:
        raise DitlabError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise DitlabError(f"config file {path} must hold a mapping of sections")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply dotted overrides, validate."""
    cfg = config_from_dict(_read_yaml(path) if path is not None else {})
    _apply(cfg, parse_overrides(overrides or []))
    return validate(cfg)


def load_run_config(path: str | Path) -> Config:
    """The config.yaml of an existing run, including those written by ditlab 0.1 (no format_version).

    0.1 saved every field, so a run's file holds the fields of all objective kinds, and a flow
    or shortcut run saved `sample.sampler: ddpm` (then the default, meaning "the objective's own
    sampler"). Fields of another kind never took effect: they are reset to their defaults; that
    `ddpm` becomes None, which means the same today. 0.1's `token_layout: 3d` (channels as a
    token axis) is today's `channels_as_tokens`.
    """
    values = _read_yaml(path)
    cfg = config_from_dict(values)
    if "format_version" not in values:
        default = ObjectiveConfig()
        for name in _foreign_objective_fields(cfg):
            setattr(cfg.objective, name, getattr(default, name))
        if cfg.objective.kind != "gaussian" and cfg.sample.sampler == "ddpm":
            cfg.sample.sampler = None
        if cfg.model.token_layout == "3d":
            cfg.model.token_layout = "channels_as_tokens"
        cfg.format_version = CONFIG_FORMAT
    if "onednn_linear" not in (values.get("train") or {}):
        cfg.train.onednn_linear = False  # saved before the option: PyTorch's own products, so a resume is exact
    if cfg.format_version > CONFIG_FORMAT:
        raise DitlabError(f"{path} was written by a newer ditlab (config format {cfg.format_version}); upgrade ditlab")
    return validate(cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config whole or not at all."""
    write_atomic(path, config_yaml(cfg).encode())
