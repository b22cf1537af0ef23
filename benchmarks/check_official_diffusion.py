"""Side-by-side check: ditlab's Gaussian diffusion against facebookresearch/DiT's `diffusion/`.

    python benchmarks/check_official_diffusion.py /path/to/DiT      # or env DITLAB_OFFICIAL_DIT

Runs every method of both implementations on the same inputs, timesteps and noise (the
official loops draw noise from torch's global RNG, so each pair of calls starts from the same
seed) with a small deterministic conv model, prints a table of max |official - ditlab| and exits
1 when any difference exceeds the tolerance. Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

TOL = 1e-5  # float32 arithmetic in the same order gives differences of 0 or a few ulps


class TinyModel(nn.Module):
    """A fixed random conv whose output depends on x, the timestep and the label (DiT-like I/O)."""

    def __init__(self, channels: int, out_channels: int, num_classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, out_channels)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x, t, y):
        tt = torch.sin(t.float() / 97.0).view(-1, 1, 1, 1)
        out = self.conv(x) * (1 + tt) + self.emb(y).view(x.shape[0], -1, 1, 1) * tt
        if out.shape[1] > x.shape[1]:  # learned-sigma channels: keep v in [-1, 1] as a trained model does
            out = torch.cat([out[:, : x.shape[1]], torch.tanh(out[:, x.shape[1]:])], dim=1)
        return out


def _max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max(_max_diff(a[k], b[k]) for k in a if k != "extra" and a[k] is not None)
    if isinstance(a, (tuple, list)):
        return max(_max_diff(u, v) for u, v in zip(a, b))
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double()
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b).double()
    if a.shape != b.shape or not torch.equal(a.isfinite(), b.isfinite()):
        return float("inf")
    a, b = a[a.isfinite()], b[b.isfinite()]
    return (a - b).abs().max().item() if a.numel() else 0.0


def _seeded(fn, seed: int = 123):
    torch.manual_seed(seed)
    return fn()


# name -> create_diffusion kwargs
CONFIGS = {
    "default (learned sigma)": dict(timestep_respacing=""),
    "respaced 250": dict(timestep_respacing="250"),
    "respaced ddim50": dict(timestep_respacing="ddim50"),
    "respaced 10,10,10": dict(timestep_respacing="10,10,10"),
    "cosine, ddim25": dict(timestep_respacing="ddim25", noise_schedule="squaredcos_cap_v2"),
    "fixed large": dict(timestep_respacing="100", learn_sigma=False),
    "fixed small": dict(timestep_respacing="100", learn_sigma=False, sigma_small=True),
    "predict x0": dict(timestep_respacing="", predict_xstart=True),
    "use_kl": dict(timestep_respacing="", use_kl=True),
    "rescale sigmas, T=500": dict(timestep_respacing="", rescale_learned_sigmas=True, diffusion_steps=500),
}


def compare(dit_path: str) -> list[tuple[str, str, float]]:
    sys.path.insert(0, dit_path)
    from diffusion import create_diffusion as official_create  # the official package

    from ditlab.diffusion import create_diffusion

    torch.manual_seed(0)
    B, C, H = 4, 3, 8
    x0 = torch.rand(B, C, H, H) * 2 - 1
    y = torch.tensor([0, 3, 7, 10])
    kw = {"y": y}
    rows = []
    for name, cfg in CONFIGS.items():
        ref, ours = official_create(**cfg), create_diffusion(**cfg)
        learn_sigma = cfg.get("learn_sigma", True)
        model = TinyModel(C, 2 * C if learn_sigma else C).eval()
        T = ref.num_timesteps
        t = torch.tensor([0, 1, T // 2, T - 1])
        noise = torch.randn_like(x0)
        x_t = ref.q_sample(x0, t, noise=noise)

        def row(method, a, b):
            rows.append((name, method, _max_diff(a, b)))

        for attr in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2"):
            row(attr, getattr(ref, attr), getattr(ours, attr))
        row("timestep_map", ref.timestep_map, ours.timestep_map)
        row("q_mean_variance", ref.q_mean_variance(x0, t), ours.q_mean_variance(x0, t))
        row("q_sample", x_t, ours.q_sample(x0, t, noise=noise))
        row("q_posterior_mean_variance", ref.q_posterior_mean_variance(x0, x_t, t), ours.q_posterior_mean_variance(x0, x_t, t))
        with torch.no_grad():
            for clip in (True, False):
                row(f"p_mean_variance clip={clip}", ref.p_mean_variance(model, x_t, t, clip_denoised=clip, model_kwargs=kw),
                    ours.p_mean_variance(model, x_t, t, clip_denoised=clip, model_kwargs=kw))
            row("p_sample", _seeded(lambda: ref.p_sample(model, x_t, t, model_kwargs=kw)),
                _seeded(lambda: ours.p_sample(model, x_t, t, model_kwargs=kw)))
            for eta in (0.0, 0.5):
                row(f"ddim_sample eta={eta}", _seeded(lambda: ref.ddim_sample(model, x_t, t, model_kwargs=kw, eta=eta)),
                    _seeded(lambda: ours.ddim_sample(model, x_t, t, model_kwargs=kw, eta=eta)))
            row("ddim_reverse_sample", ref.ddim_reverse_sample(model, x_t, t, clip_denoised=False, model_kwargs=kw),
                ours.ddim_reverse_sample(model, x_t, t, clip_denoised=False, model_kwargs=kw))
            row("_vb_terms_bpd", ref._vb_terms_bpd(model, x0, x_t, t, model_kwargs=kw),
                ours._vb_terms_bpd(model, x0, x_t, t, model_kwargs=kw))
            row("_prior_bpd", ref._prior_bpd(x0), ours._prior_bpd(x0))
        row("training_losses", ref.training_losses(model, x0, t, model_kwargs=kw, noise=noise),
            ours.training_losses(model, x0, t, model_kwargs=kw, noise=noise))
        # Gradients of the hybrid loss (stop-grad on the mean inside the vb term).
        grads = []
        for impl in (ref, ours):
            model.zero_grad()
            impl.training_losses(model, x0, t, model_kwargs=kw, noise=noise)["loss"].mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        row("training_losses grad", grads[0], grads[1])

    # Whole loops on short respaced processes (every step's noise from the same global seed).
    for respacing in ("10", "ddim10", "3,4,3"):
        for learn_sigma in (True, False):
            name = f"loops {respacing!r} learn_sigma={learn_sigma}"
            ref = official_create(respacing, learn_sigma=learn_sigma)
            ours = create_diffusion(respacing, learn_sigma=learn_sigma)
            model = TinyModel(C, 2 * C if learn_sigma else C).eval()
            z = torch.randn_like(x0)
            for clip in (True, False):
                row_args = dict(noise=z, clip_denoised=clip, model_kwargs=kw)
                rows.append((name, f"p_sample_loop clip={clip}", _max_diff(
                    _seeded(lambda: ref.p_sample_loop(model, z.shape, **row_args)),
                    _seeded(lambda: ours.p_sample_loop(model, z.shape, **row_args)))))
                for eta in (0.0, 1.0):
                    rows.append((name, f"ddim_sample_loop clip={clip} eta={eta}", _max_diff(
                        _seeded(lambda: ref.ddim_sample_loop(model, z.shape, eta=eta, **row_args)),
                        _seeded(lambda: ours.ddim_sample_loop(model, z.shape, eta=eta, **row_args)))))
            rows.append((name, "calc_bpd_loop", _max_diff(
                _seeded(lambda: ref.calc_bpd_loop(model, x0, model_kwargs=kw)),
                _seeded(lambda: ours.calc_bpd_loop(model, x0, model_kwargs=kw)))))
    rows += _compare_full_pipeline()
    return rows


def _compare_full_pipeline() -> list[tuple[str, str, float]]:
    """Official sample.py's loop (DiT.forward_with_cfg on a [cond; null] batch) with official vs
    ditlab model + diffusion, same weights and seed. Needs the official models.py importable
    (timm; see DEVELOPERS.md); skipped otherwise. in_channels=3, where both CFG conventions agree."""
    try:
        from models import DiT as OfficialDiT  # the official models.py
    except Exception as e:  # noqa: BLE001 - any import problem means: skip this section
        print(f"(skipping the full-pipeline comparison: official models.py not importable: {type(e).__name__})")
        return []
    from diffusion import create_diffusion as official_create

    from ditlab.diffusion import create_diffusion
    from ditlab.models.dit import DiT

    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    ref_model = OfficialDiT(**kw).eval()
    g = torch.Generator().manual_seed(1)
    for p in ref_model.parameters():  # the official init zeroes the output layers: randomise everything
        p.data = torch.randn(p.shape, generator=g) * 0.05
    ours_model = DiT(**kw).eval()
    ours_model.load_state_dict(ref_model.state_dict(), strict=True)
    rows = []
    for respacing in ("25", "ddim10"):
        z = torch.randn(2, 3, 8, 8)
        z = torch.cat([z, z])
        y = torch.tensor([1, 7, 10, 10])  # second half: the null label
        mk = dict(y=y, cfg_scale=4.0)
        outs = []
        for create, model in ((official_create, ref_model), (create_diffusion, ours_model)):
            d = create(respacing)
            loop = d.ddim_sample_loop if respacing.startswith("ddim") else d.p_sample_loop
            outs.append(_seeded(lambda: loop(model.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=mk, device="cpu")))
        rows.append((f"official DiT sample loop {respacing!r}", "model + diffusion, cfg 4", _max_diff(*outs)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dit_path", nargs="?", default=os.environ.get("DITLAB_OFFICIAL_DIT"),
                        help="a facebookresearch/DiT checkout (default: $DITLAB_OFFICIAL_DIT)")
    args = parser.parse_args(argv)
    if not args.dit_path or not os.path.isdir(os.path.join(args.dit_path, "diffusion")):
        print("error: give the path of a facebookresearch/DiT checkout (or set DITLAB_OFFICIAL_DIT)", file=sys.stderr)
        return 2
    rows = compare(args.dit_path)
    width = max(len(r[0]) for r in rows)
    mwidth = max(len(r[1]) for r in rows)
    print(f"{'config':<{width}}  {'method':<{mwidth}}  max |official - ditlab|")
    for cfg, method, diff in rows:
        flag = "" if diff <= TOL else "   <-- FAIL"
        print(f"{cfg:<{width}}  {method:<{mwidth}}  {diff:.3e}{flag}")
    bad = [r for r in rows if not r[2] <= TOL]
    print(f"{len(rows)} comparisons, {len(bad)} above {TOL:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
