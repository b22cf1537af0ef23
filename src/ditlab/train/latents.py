"""Encode a dataset once with a VAE/tokenizer into sharded latent files (`data.source: latents`).

The layout of the output folder is described in `ditlab.data.latents`, which reads it back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader
from tqdm import tqdm

from ditlab.codecs import load_codec
from ditlab.config import Config, save_config
from ditlab.data import build_dataset
from ditlab.data.latents import FORMAT, INDEX_FILE
from ditlab.errors import DitlabError
from ditlab.io import write_atomic


def extract_latents(cfg: Config, out_dir: str | Path, *, batch_size: int = 64, shard_size: int = 10000,
                    flip: bool = False, device: str | None = None, dtype: str = "float32",
                    progress: bool = True) -> Path:
    """Encode `cfg.data` with `load_codec(cfg.vae)` into `out_dir`; returns the index path."""
    if cfg.data.source == "latents":
        raise DitlabError("extract-latents needs a pixel data source (mnist, fashion-mnist, folder, mnist-embedded)")
    if not cfg.vae.path:
        raise DitlabError("extract-latents needs vae.path (a diffusers AutoencoderKL dir or a ditlab tokenizer)")
    store = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if store is None:
        raise DitlabError(f"--dtype must be float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codec = load_codec(cfg.vae, device=device)
    dataset = build_dataset(cfg)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX_FILE).unlink(missing_ok=True)  # the index is written last: no index = incomplete
    except OSError as e:
        raise DitlabError(f"cannot write to {out}: {e.strerror or e}") from None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)  # posterior samples are seeded
    shards, buf, shape = [], {"latents": [], "latents_flip": [], "labels": []}, None
    t0 = time.time()

    def flush() -> None:
        if not buf["labels"]:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.items() if v}
        name = f"shard_{len(shards):05d}.safetensors"
        try:
            write_atomic(out / name, safetensors_bytes(tensors))
        except OSError as e:
            raise DitlabError(f"cannot write latent shard {out / name}: {e.strerror or e}") from None
        shards.append({"file": name, "count": len(tensors["labels"])})
        for v in buf.values():
            v.clear()

    with torch.no_grad():
        for x, y in tqdm(loader, desc="extract-latents", disable=not progress):
            x = x.to(device)
            z = codec.encode(x, generator=gen)
            shape = tuple(z.shape[1:])
            buf["latents"].append(z.to(store).cpu())
            if flip:
                buf["latents_flip"].append(codec.encode(x.flip(-1), generator=gen).to(store).cpu())
            buf["labels"].append(y.long().cpu())
            if sum(len(b) for b in buf["labels"]) >= shard_size:
                flush()
        flush()
    index = {
        "format": FORMAT,
        "num_samples": sum(s["count"] for s in shards),
        "latent_shape": list(shape),
        "num_classes": int(getattr(dataset, "num_classes", 0)),
        "flip": flip,
        "dtype": dtype,
        "source": cfg.data.source,
        "image_size": cfg.data.image_size,
        "vae": str(cfg.vae.path),
        "scale_factor": float(codec.scale_factor),
        "shards": shards,
        "seconds": round(time.time() - t0, 1),
    }
    save_config(cfg, out / "config.yaml")
    write_atomic(out / INDEX_FILE, json.dumps(index, indent=1).encode())
    return out / INDEX_FILE
