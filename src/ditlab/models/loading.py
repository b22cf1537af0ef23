"""Read model weights from safetensors or torch files (ditlab or official DiT) and load them strictly.

Accepted layouts: a raw state dict (the released DiT-XL-2-256x256.pt), a dict holding "model"
and/or "ema" (the official train.py checkpoint, which also pickles its argparse args), and
safetensors files. Prefixes added by DDP ("module.") and torch.compile ("_orig_mod.") are removed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError

_PREFIXES = ("module.", "_orig_mod.")


def _first_line(e: BaseException) -> str:
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    if marker in str(e):  # torch's long weights_only message: keep the first sentence of its reason,
        i = next(k for k, t in enumerate(text) if marker in t)  # on the marker's line or the next one
        reason = next((t.strip() for t in [text[i].split(marker, 1)[1], *text[i + 1 : i + 2]] if t.strip()), "")
        return "not a torch checkpoint of tensors: " + (reason.split(". ")[0].rstrip(".") or "unpickling refused")
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_state_dict_file(path: str | Path, prefer_ema: bool = True) -> dict[str, Tensor]:
    """The state dict stored in `path`; from an {"model", "ema"} checkpoint, EMA unless prefer_ema=False."""
    path = Path(path)
    if not path.exists():
        raise DitlabError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise DitlabError(f"checkpoint {path} is a directory; give a weights file (.safetensors, .pt, .pth)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # weights_only: never execute pickled code; the official train.py also stores its
            # argparse.Namespace, which is allowed explicitly.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint at all
        raise DitlabError(f"cannot read checkpoint {path} ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise DitlabError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if "ema" in obj or "model" in obj:
        key = "ema" if (prefer_ema and "ema" in obj) or "model" not in obj else "model"
        obj = obj[key]
        if not isinstance(obj, dict):
            raise DitlabError(f"checkpoint {path}: entry '{key}' is a {type(obj).__name__}, not a state dict")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, Tensor):
            raise DitlabError(f"checkpoint {path}: entry '{name}' is a {type(value).__name__}, not a tensor")
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        state[name] = value
    return state


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one DitlabError line naming missing/unexpected keys and shape differences, if any."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes, 3)}")
    if problems:
        raise DitlabError(f"{source} does not match the model; " + "; ".join(problems))


def load_weights(model: nn.Module, path: str | Path | dict[str, Tensor], prefer_ema: bool = True,
                 source: str | None = None) -> nn.Module:
    """Load a weights file (or a state dict) into `model` with strict key and shape checking.

    `source` names the weights in error messages (default: the path).
    """
    if isinstance(path, dict):
        state, where = path, "state dict"
    else:
        state, where = load_state_dict_file(path, prefer_ema=prefer_ema), f"checkpoint {path}"
    check_state_dict(model, state, f"checkpoint {source}" if source else where)
    model.load_state_dict(state, strict=True)
    return model
