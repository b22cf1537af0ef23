"""Models: the official-compatible DiT and its ablation variants, a U-Net baseline, tokenizers,
and byte-level language models (`model.name=byte-lm`)."""

from __future__ import annotations

from torch import nn

from ditlab.config import LM_MODEL, Config
from ditlab.errors import DitlabError
from ditlab.models.dit import DiT, DiT_models, dit_from_config
from ditlab.models.lm import ByteLM, build_lm, lm_from_config
from ditlab.models.onednn import use_onednn_linear
from ditlab.models.unet import UNet

__all__ = ["ByteLM", "DiT", "DiT_models", "build_lm", "build_model"]


def build_model(cfg: Config) -> nn.Module:
    """Build the model a run's config describes.

    Learned sigma only exists for Gaussian diffusion; shortcut models always condition on the
    step size. Everything else comes from `cfg.model`. With `train.onednn_linear` (the default)
    the linear layers compute their fp32 CPU products in oneDNN (`onednn.py`; same weights).
    """
    model = _build(cfg)
    if cfg.train.onednn_linear:
        use_onednn_linear(model)
    return model


def _build(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.name == LM_MODEL:
        return lm_from_config(m)
    learn_sigma = m.learn_sigma and cfg.objective.kind == "gaussian"
    step_size_cond = m.step_size_cond or cfg.objective.kind == "shortcut"
    if m.name == "unet":
        return UNet.from_config(m, learn_sigma=learn_sigma, step_size_cond=step_size_cond)
    if m.name not in DiT_models:
        raise DitlabError(f"unknown model '{m.name}' (choose one of: {', '.join(DiT_models)}, unet, {LM_MODEL})")
    return dit_from_config(m, learn_sigma=learn_sigma, step_size_cond=step_size_cond)
