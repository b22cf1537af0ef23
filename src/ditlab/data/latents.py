"""Latents written by `ditlab extract-latents` (`ditlab.train.latents`), read as a dataset.

A dataset encoded once with a VAE/tokenizer into sharded safetensors: as in fast-DiT, latent diffusion then trains from the stored latents (`data.source: latents`)
instead of running the VAE encoder on every step. Layout of the output directory:

    index.json                   shapes, counts, shard list, codec and source description
    shard_00000.safetensors      'latents' [n, C, h, w] (scaled by the codec), 'labels' [n]
                                 and, with --flip, 'latents_flip' (latents of mirrored images)
    config.yaml                  the resolved config used for the extraction

Latents of a mirrored image are not the mirrored latents, so random flips need `--flip`
(both versions stored); the dataset then returns both and the trainer picks one per sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from ditlab.errors import DitlabError

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
