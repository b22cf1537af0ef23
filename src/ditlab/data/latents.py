"""`ditlab extract-latents`: encode a dataset once with a VAE/tokenizer into sharded safetensors.

As in fast-DiT, latent diffusion then trains from the stored latents (`data.source: latents`)
instead of running the VAE encoder on every step. Layout of the output directory:

    index.json                   shapes, counts, shard list, codec and source description
    shard_00000.safetensors      'latents' [n, C, h, w] (scaled by the codec), 'labels' [n]
                                 and, with --flip, 'latents_flip' (latents of mirrored images)
    config.yaml                  the resolved config used for the extraction

Latents of a mirrored image are not the mirrored latents, so random flips need `--flip`
(both versions stored); the dataset then returns both and the trainer picks one per sample.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ditlab.errors import DitlabError
from ditlab.train.checkpoint import write_atomic
from ditlab.train.command import split_config_args

INDEX_FILE = "index.json"
FORMAT = "ditlab-latents-v1"


class LatentsDataset(Dataset):
    """Reads latents written by `ditlab extract-latents` (memory-mapped, shard by shard).

    With flipped latents stored (`paired_flip`), an item is the plain and flipped latents
    concatenated on the channel axis; the trainer keeps one half per sample.
    """

    def __init__(self, root: str | Path, use_flip: bool = False):
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise DitlabError(f"no {INDEX_FILE} in {self.root} (write one with ditlab extract-latents)")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DitlabError(f"corrupt latents index {index_path}: {e}") from None
        if index.get("format") != FORMAT:
            raise DitlabError(f"{index_path} is not a {FORMAT} index")
        self.index = index
        self.shape = tuple(index["latent_shape"])
        self.num_classes = int(index.get("num_classes", 0))
        self.has_flip = bool(index.get("flip", False))
        if use_flip and not self.has_flip:
            raise DitlabError(f"data.random_flip needs flipped latents; re-run extract-latents with --flip ({self.root})")
        self.paired_flip = use_flip
        self.counts = [int(s["count"]) for s in index["shards"]]
        self.offsets = torch.tensor([0] + self.counts).cumsum(0).tolist()
        for s in index["shards"]:
            if not (self.root / s["file"]).is_file():
                raise DitlabError(f"missing latent shard {self.root / s['file']}")
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _handle(self, k: int):
        if k not in self._handles:
            path = self.root / self.index["shards"][k]["file"]
            try:
                self._handles[k] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise DitlabError(f"cannot read latent shard {path}: {e}") from None
        return self._handles[k]

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        k = int(torch.searchsorted(torch.tensor(self.offsets[1:]), i, right=True))
        j = i - self.offsets[k]
        f = self._handle(k)
        z = f.get_slice("latents")[j : j + 1][0].float()
        if self.paired_flip:
            z = torch.cat([z, f.get_slice("latents_flip")[j : j + 1][0].float()])
        return z, f.get_slice("labels")[j : j + 1][0].long()


def extract_latents(cfg, out_dir: str | Path, *, batch_size: int = 64, shard_size: int = 10000,
                    flip: bool = False, device: str | None = None, dtype: str = "float32",
                    progress: bool = True) -> Path:
    """Encode `cfg.data` with `load_codec(cfg.vae)` into `out_dir`; returns the index path."""
    from tqdm import tqdm

    from ditlab.data import build_dataset
    from ditlab.models.codec import load_codec

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
    from ditlab.config import save_config

    save_config(cfg, out / "config.yaml")
    write_atomic(out / INDEX_FILE, json.dumps(index, indent=1).encode())
    return out / INDEX_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (data + vae sections); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. vae.path=/models/sd-vae-ft-ema")
    parser.add_argument("--out", required=True, help="output directory for the shards and index.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10000, help="latents per shard file")
    parser.add_argument("--flip", action="store_true", help="also store latents of mirrored images (for data.random_flip)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", help="storage dtype: float32 | float16 | bfloat16")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ditlab.config import load_config

    config, overrides = split_config_args(args.config, list(args.overrides))
    cfg = load_config(config, overrides)
    index = extract_latents(cfg, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                            flip=args.flip, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    info = json.loads(index.read_text())
    print(f"wrote {info['num_samples']} latents of shape {info['latent_shape']} in {len(info['shards'])} shard(s) to {index.parent}")
    return 0
