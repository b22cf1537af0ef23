"""Muon on the transformer blocks' matrices and AdamW on the rest (`optim.name=muon`).

Muon (Jordan et al. 2024; `torch.optim.Muon`) replaces a 2-D weight's Nesterov momentum by an
approximately semi-orthogonal matrix with the same singular vectors (five Newton-Schulz iterations),
so every direction of the update moves at about the same rate. It is meant for hidden matrices only:
here the weights of the nn.Linear layers inside `model.blocks` (attention, MLP, adaLN modulation);
embeddings, the timestep and label embedders, biases, norms and the output layer stay with AdamW, as
in the Muon recipes. The update is scaled to AdamW's RMS (0.2 sqrt(max(rows, cols)), Liu et al. 2025:
`adjust_lr_fn="match_rms_adamw"`), so both share `optim.lr`, its schedule and `optim.weight_decay`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditlab.config import OptimConfig
from ditlab.errors import DitlabError


def muon_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters Muon updates: the weights of the nn.Linear layers inside `model.blocks`."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise DitlabError(f"optim.name=muon needs a transformer with blocks ({type(model).__name__} has none); "
                          "use optim.name=adamw")
    return [f"blocks.{name}.weight" for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]


class MuonAdamW:
    """Muon on the blocks' matrices, AdamW on every other parameter, used as one optimizer: the trainer
    sets each group's lr, steps, zeroes and checkpoints it like a torch optimizer."""

    def __init__(self, model: nn.Module, o: OptimConfig, fused: bool | None):
        if not hasattr(torch.optim, "Muon"):
            raise DitlabError(f"optim.name=muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        named = dict(model.named_parameters())
        hidden = set(muon_parameter_names(model))
        self.muon = torch.optim.Muon([p for n, p in named.items() if n in hidden], lr=o.lr, weight_decay=o.weight_decay,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW([p for n, p in named.items() if n not in hidden], lr=o.lr,
                                       betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused)
        self.param_groups = self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"adamw", "muon"}:
            raise KeyError("saved by another optimizer than optim.name=muon")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
