"""Convert DiT weights between ditlab/official layout and diffusers' `DiTTransformer2DModel`.

    ditlab convert DiT-XL-2-256x256.pt out/dit-xl-2-diffusers --to diffusers --model DiT-XL/2
    ditlab convert out/dit-xl-2-diffusers dit.safetensors --to ditlab      (ditlab.commands.convert)

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

import re

import torch
from torch import Tensor

from ditlab.errors import DitlabError
from ditlab.models.layers import sincos_2d

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
