"""Training objectives and their samplers: one module per objective.

- `gaussian`: DDPM/DDIM Gaussian diffusion with the official DiT semantics (`create_diffusion`).
- `flow`: flow matching / rectified flow (SiT's linear interpolant), with FasterDiT options.
- `shortcut`: shortcut models (Frans et al. 2024), 1 to 128 sampling steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ditlab.errors import DitlabError

if TYPE_CHECKING:
    from ditlab.config import Config
    from ditlab.diffusion.base import Objective


def create_diffusion(*args, **kwargs):
    """Official `create_diffusion` (see ditlab.diffusion.gaussian)."""
    from ditlab.diffusion.gaussian import create_diffusion as _create

    return _create(*args, **kwargs)


def build_objective(cfg: "Config") -> "Objective":
    kind = cfg.objective.kind
    if kind == "gaussian":
        from ditlab.diffusion.gaussian import GaussianObjective as cls
    elif kind == "flow":
        from ditlab.diffusion.flow import FlowObjective as cls
    elif kind == "shortcut":
        from ditlab.diffusion.shortcut import ShortcutObjective as cls
    else:
        raise DitlabError(f"unknown objective.kind '{kind}' (choose gaussian, flow or shortcut)")
    return cls.from_config(cfg)
