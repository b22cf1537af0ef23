"""Training objectives and their samplers, one module per objective, one interface (`Objective`).

- `gaussian`: DDPM/DDIM Gaussian diffusion with the official DiT semantics (`create_diffusion`).
- `flow`: flow matching / rectified flow (SiT's linear interpolant), with FasterDiT options.
- `shortcut`: shortcut models (Frans et al. 2024), 1 to 128 sampling steps.
- `next-byte`: next-byte prediction for byte-level language models (its own model convention).

Objectives know nothing of models beyond the call convention in `base.py`.
"""

from __future__ import annotations

from ditlab.config import Config
from ditlab.errors import DitlabError
from ditlab.objectives.base import Objective
from ditlab.objectives.flow import FlowObjective
from ditlab.objectives.gaussian import GaussianObjective
from ditlab.objectives.next_byte import NextByteObjective
from ditlab.objectives.shortcut import ShortcutObjective

__all__ = ["FlowObjective", "GaussianObjective", "NextByteObjective", "Objective", "ShortcutObjective",
           "build_objective"]


def build_objective(cfg: Config) -> Objective:
    """The objective `cfg.objective` describes (its guidance interval from `cfg.sample`)."""
    kinds = {"gaussian": GaussianObjective, "flow": FlowObjective, "shortcut": ShortcutObjective,
             "next-byte": NextByteObjective}
    if cfg.objective.kind not in kinds:
        raise DitlabError(f"unknown objective.kind '{cfg.objective.kind}' (choose {', '.join(kinds)})")
    return kinds[cfg.objective.kind].from_config(cfg)
