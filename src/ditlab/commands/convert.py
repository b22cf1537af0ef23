"""`ditlab convert`: DiT weights between the ditlab/official layout and diffusers' DiTTransformer2DModel.

    ditlab convert DiT-XL-2-256x256.pt out/dit-xl-2-diffusers --to diffusers --model DiT-XL/2
    ditlab convert out/dit-xl-2-diffusers dit.safetensors --to ditlab
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from ditlab.errors import DitlabError
from ditlab.models.convert import DIFFUSERS_WEIGHTS, diffusers_to_ditlab, ditlab_to_diffusers
from ditlab.models.dit import parse_model_name
from ditlab.models.loading import load_state_dict_file
from ditlab.runs import resolve_checkpoint


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
    """A run or step directory of the trainer -> its weights file."""
    if path.is_dir() and not (path / "config.json").is_file():
        return resolve_checkpoint(path)[0]
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
        if args.num_heads is not None and args.num_heads < 1:
            raise DitlabError(f"--num-heads must be >= 1, got {args.num_heads}")
        state = load_state_dict_file(_resolve_weights(src), prefer_ema=not args.no_ema)
        heads = args.num_heads
        if heads is None:
            # The name gives the head count only for weights of that size: DiT-XL/2's 16 heads on a
            # hidden-64 model would write a config that the weights contradict.
            _, hidden, heads, _ = parse_model_name(args.model)
            embed = state.get("x_embedder.proj.weight")
            if embed is not None and embed.shape[0] != hidden:
                raise DitlabError(f"--model {args.model} has hidden size {hidden}, but these weights have "
                                  f"{embed.shape[0]}: name the model they were trained as, or give --num-heads")
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
