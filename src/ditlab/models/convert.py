"""Convert DiT weights between ditlab/official layout and diffusers' `DiTTransformer2DModel`.

    ditlab convert DiT-XL-2-256x256.pt out/dit-xl-2-diffusers --to diffusers --model DiT-XL/2
    ditlab convert out/dit-xl-2-diffusers dit.safetensors --to ditlab

The two layouts hold the same weights, arranged differently:
  x_embedder.proj                   <-> pos_embed.proj (diffusers recomputes the sin-cos table)
  t_embedder.mlp.{0,2}              <-> transformer_blocks.*.norm1.emb.timestep_embedder.linear_{1,2}
  y_embedder.embedding_table        <-> transformer_blocks.*.norm1.emb.class_embedder.embedding_table
  blocks.i.attn.qkv (fused)         <-> transformer_blocks.i.attn1.to_{q,k,v} (split)
  blocks.i.attn.proj                <-> transformer_blocks.i.attn1.to_out.0
  blocks.i.mlp.fc{1,2}              <-> transformer_blocks.i.ff.net.{0.proj,2}
  blocks.i.adaLN_modulation.1       <-> transformer_blocks.i.norm1.linear
  final_layer.adaLN_modulation.1    <-> proj_out_1;   final_layer.linear <-> proj_out_2
diffusers keeps a copy of the timestep/label embedders in every block; ditlab shares one.

One numerical difference is not a weight layout: diffusers' DiT computes the timestep
frequencies as exp(-ln(10000) i/(half-1)) (`downscale_freq_shift=1`) where the official DiT
uses i/half. `use_official_timestep_frequencies(model)` switches a loaded diffusers model to
the official frequencies; with it, outputs agree to float precision.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ditlab.errors import DitlabError
from ditlab.models.dit import parse_model_name
from ditlab.models.layers import sincos_2d
from ditlab.models.loading import load_state_dict_file

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Per-block renames (qkv is split separately).
_BLOCK_MAP = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_TOP_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_EMB_MAP = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def _depth(state: dict[str, Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise DitlabError(f"blocks in the state dict are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _official_keys(depth: int) -> list[str]:
    """The official DiT state_dict keys, in the official order."""
    wb = lambda name: [f"{name}.weight", f"{name}.bias"]  # noqa: E731
    keys = ["pos_embed", *wb("x_embedder.proj"), *wb("t_embedder.mlp.0"), *wb("t_embedder.mlp.2"),
            "y_embedder.embedding_table.weight"]
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += wb(f"blocks.{i}.{name}")
    return keys + wb("final_layer.linear") + wb("final_layer.adaLN_modulation.1")


def ditlab_to_diffusers(state: dict[str, Tensor], num_heads: int, num_classes: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """An official-layout DiT state dict -> (diffusers state dict, DiTTransformer2DModel config).

    Head count is not stored in the weights, so it is an argument. `num_classes` defaults to the
    label table's rows minus the null row.
    """
    depth = _depth(state, "blocks")
    expected = set(_official_keys(depth))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise DitlabError("only the official DiT architecture converts to diffusers; "
                          f"unexpected keys: {', '.join(extra[:5]) or '-'}; missing keys: {', '.join(missing[:5]) or '-'}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    if hidden % num_heads:
        raise DitlabError(f"hidden size {hidden} is not divisible by num_heads {num_heads}")
    if state["blocks.0.mlp.fc1.weight"].shape[0] != 4 * hidden:
        raise DitlabError("diffusers' DiT supports mlp_ratio 4 only")
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    grid = round(state["pos_embed"].shape[1] ** 0.5)
    table = state["y_embedder.embedding_table.weight"]
    num_classes = table.shape[0] - 1 if num_classes is None else num_classes
    if table.shape[0] == num_classes:  # no null row (trained without label dropout): diffusers always has one
        table = torch.cat([table, table.new_zeros(1, hidden)])
    elif table.shape[0] != num_classes + 1:
        raise DitlabError(f"label table has {table.shape[0]} rows, which fits neither {num_classes} nor {num_classes}+1 classes")

    out: dict[str, Tensor] = {}
    for src, dst in _TOP_MAP.items():
        out[f"{dst}.weight"], out[f"{dst}.bias"] = state[f"{src}.weight"], state[f"{src}.bias"]
    for i in range(depth):
        p, q = f"blocks.{i}", f"transformer_blocks.{i}"
        for src, dst in _BLOCK_MAP.items():
            out[f"{q}.{dst}.weight"], out[f"{q}.{dst}.bias"] = state[f"{p}.{src}.weight"], state[f"{p}.{src}.bias"]
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", state[f"{p}.attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{q}.attn1.to_{name}.{kind}"] = part
        for src, dst in _EMB_MAP.items():  # every diffusers block holds its own copy of the embedders
            if src.endswith("embedding_table"):
                out[f"{q}.{dst}.weight"] = table
            else:
                out[f"{q}.{dst}.weight"], out[f"{q}.{dst}.bias"] = state[f"{src}.weight"], state[f"{src}.bias"]
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}  # no shared storage (safetensors)
    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": num_heads,
        "attention_head_dim": hidden // num_heads,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": depth,
        "sample_size": grid * patch,
        "patch_size": patch,
        "num_embeds_ada_norm": num_classes,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # the official LayerNorm eps (diffusers' default is 1e-5)
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
    }
    return out, config


def diffusers_to_ditlab(state: dict[str, Tensor], sample_size: int) -> dict[str, Tensor]:
    """A diffusers DiTTransformer2DModel state dict -> official-layout DiT state dict.

    `sample_size` (config.json) fixes the sin-cos position table, which diffusers does not save.
    The label table keeps its null row (a ditlab model with class_dropout_prob > 0).
    """
    depth = _depth(state, "transformer_blocks")
    if depth == 0 or "pos_embed.proj.weight" not in state:
        raise DitlabError("not a diffusers DiTTransformer2DModel state dict (no pos_embed.proj / transformer_blocks)")
    hidden, _, patch, _ = state["pos_embed.proj.weight"].shape
    if sample_size % patch:
        raise DitlabError(f"patch size {patch} does not divide sample_size {sample_size}")
    out: dict[str, Tensor] = {"pos_embed": sincos_2d(hidden, sample_size // patch).unsqueeze(0)}
    used = set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise DitlabError(f"diffusers state dict lacks {key}")
        used.add(key)
        return state[key]

    for src, dst in _TOP_MAP.items():
        out[f"{src}.weight"], out[f"{src}.bias"] = take(f"{dst}.weight"), take(f"{dst}.bias")
    for i in range(depth):
        p, q = f"blocks.{i}", f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{p}.attn.qkv.{kind}"] = torch.cat([take(f"{q}.attn1.to_{n}.{kind}") for n in "qkv"])
        for src, dst in _BLOCK_MAP.items():
            out[f"{p}.{src}.weight"], out[f"{p}.{src}.bias"] = take(f"{q}.{dst}.weight"), take(f"{q}.{dst}.bias")
    for src, dst in _EMB_MAP.items():
        kinds = ("weight",) if src.endswith("embedding_table") else ("weight", "bias")
        for kind in kinds:
            first = take(f"transformer_blocks.0.{dst}.{kind}")
            for i in range(1, depth):
                if not torch.equal(take(f"transformer_blocks.{i}.{dst}.{kind}"), first):
                    raise DitlabError(f"block {i} of the diffusers model has its own {dst}; ditlab's DiT shares one "
                                      "timestep/label embedder across blocks and cannot represent this model")
            out[f"{src}.{kind}"] = first
    unused = sorted(set(state) - used)
    if unused:
        raise DitlabError(f"diffusers weights not part of the DiT layout: {', '.join(unused[:5])}")
    return {k: out[k].detach().clone().contiguous() for k in _official_keys(depth)}


def use_official_timestep_frequencies(model) -> None:
    """Make a diffusers DiTTransformer2DModel embed timesteps exactly as the official DiT (i/half)."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


# --------------------------------------------------------------------------- CLI


def _save_state(state: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _read_diffusers_dir(path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DitlabError(f"cannot read {path / 'config.json'} ({type(e).__name__})") from None
    if config.get("_class_name", "DiTTransformer2DModel") != "DiTTransformer2DModel":
        raise DitlabError(f"{path} holds a {config['_class_name']}, not a DiTTransformer2DModel")
    weights = [path / DIFFUSERS_WEIGHTS, path / "diffusion_pytorch_model.bin"]
    found = next((w for w in weights if w.is_file()), None)
    if found is None:
        raise DitlabError(f"{path} has no {DIFFUSERS_WEIGHTS}")
    return load_state_dict_file(found), config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="ditlab/official weights file (.safetensors/.pt/.pth), or a diffusers model directory")
    parser.add_argument("output", help="--to diffusers: an output directory; --to ditlab: a .safetensors or .pt file")
    parser.add_argument("--to", required=True, choices=["diffusers", "ditlab"], help="target layout")
    parser.add_argument("--model", default=None, help="DiT name giving the head count, e.g. DiT-XL/2 (needed for --to diffusers)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (overrides --model)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default: label table rows - 1)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="model input side (latent side with a VAE: image size / 8); checked against the weights")
    parser.add_argument("--no-ema", action="store_true", help="from an {model, ema} checkpoint take 'model' instead of 'ema'")


def _resolve_weights(path: Path) -> Path:
    """A run or step directory of the trainer -> its weights file (when that helper is installed)."""
    if path.is_dir() and not (path / "config.json").is_file():
        try:
            from ditlab.train.checkpoint import resolve_checkpoint
        except ImportError:
            raise DitlabError(f"{path} is a directory without a diffusers config.json") from None
        return Path(resolve_checkpoint(path)[0])
    return path


def run(args: argparse.Namespace) -> int:
    src = Path(args.input)
    if not src.exists():
        raise DitlabError(f"input not found: {src}")
    is_diffusers = src.is_dir() and (src / "config.json").is_file()
    out = Path(args.output)
    if args.to == "diffusers":
        if is_diffusers:
            raise DitlabError(f"{src} is already a diffusers model")
        if args.num_heads is None and args.model is None:
            raise DitlabError("--to diffusers needs --model (e.g. DiT-XL/2) or --num-heads: heads are not stored in the weights")
        heads = args.num_heads or parse_model_name(args.model)[2]
        state = load_state_dict_file(_resolve_weights(src), prefer_ema=not args.no_ema)
        converted, config = ditlab_to_diffusers(state, num_heads=heads, num_classes=args.num_classes)
        if args.input_size is not None and args.input_size != config["sample_size"]:
            raise DitlabError(f"--input-size {args.input_size} does not match the weights' position table "
                              f"(sample_size {config['sample_size']})")
        if out.exists() and not out.is_dir():
            raise DitlabError(f"output {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        _save_state(converted, out / DIFFUSERS_WEIGHTS)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote diffusers DiTTransformer2DModel ({config['num_layers']} layers, hidden "
              f"{config['num_attention_heads'] * config['attention_head_dim']}) to {out}")
        return 0
    if is_diffusers:
        state, config = _read_diffusers_dir(src)
        sample_size = config.get("sample_size") or args.input_size
        if sample_size is None:
            raise DitlabError("diffusers config has no sample_size; pass --input-size")
        converted = diffusers_to_ditlab(state, int(sample_size))
    else:  # an official/ditlab checkpoint: normalise it to a plain state dict (EMA by default)
        converted = load_state_dict_file(_resolve_weights(src), prefer_ema=not args.no_ema)
    if args.input_size is not None and "pos_embed" in converted and "x_embedder.proj.weight" in converted:
        side = round(converted["pos_embed"].shape[1] ** 0.5) * converted["x_embedder.proj.weight"].shape[-1]
        if side != args.input_size:
            raise DitlabError(f"--input-size {args.input_size} does not match the weights' position table (input size {side})")
    _save_state(converted, out)
    print(f"wrote ditlab state dict ({len(converted)} tensors) to {out}")
    return 0
