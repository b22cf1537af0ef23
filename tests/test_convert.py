"""Weights: loading official/ditlab checkpoints strictly, and conversion to/from diffusers' DiT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.models.convert import diffusers_to_ditlab, ditlab_to_diffusers, use_official_timestep_frequencies
from ditlab.models.dit import DiT
from ditlab.models.loading import load_state_dict_file, load_weights

from test_runs import RunsCode  # a pickle that would run code

diffusers = pytest.importorskip("diffusers")

KW = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def random_dit(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    model = DiT(**{**KW, **kw}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(n: int = 3, c: int = 4, s: int = 8, ncls: int = 10):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, c, s, s, generator=g), torch.tensor([0, 421, 999])[:n], torch.tensor([1, 7, ncls])[:n]


# --------------------------------------------------------------------------- loading


def test_official_checkpoint_layouts_load_strictly(tmp_path):
    model, other = random_dit(0), random_dit(1)
    x, t, y = inputs()
    # The official train.py checkpoint: model, ema, optimizer state and its argparse args.
    torch.save({"model": other.state_dict(), "ema": model.state_dict(), "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, tmp_path / "0050000.pt")
    target = DiT(**KW).eval()
    load_weights(target, tmp_path / "0050000.pt")  # EMA by default
    assert torch.equal(target(x, t, y), model(x, t, y))
    load_weights(target, tmp_path / "0050000.pt", prefer_ema=False)
    assert torch.equal(target(x, t, y), other(x, t, y))
    # A raw state dict with DDP prefixes, and safetensors.
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "raw.pth")
    assert set(load_state_dict_file(tmp_path / "raw.pth")) == set(model.state_dict())
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    load_weights(target, tmp_path / "w.safetensors")
    assert torch.equal(target(x, t, y), model(x, t, y))


def test_checkpoint_entries_and_pickled_code(tmp_path):
    model, other = random_dit(0), random_dit(1)
    torch.save({"model": model.state_dict(), "ema": other.state_dict()}, tmp_path / "both.pt")
    assert torch.equal(load_state_dict_file(tmp_path / "both.pt")["final_layer.linear.weight"],
                       other.state_dict()["final_layer.linear.weight"])  # EMA by default
    for only in ("model", "ema"):  # a checkpoint with one of the two entries gives that one
        torch.save({only: model.state_dict()}, tmp_path / f"{only}.pt")
        assert set(load_state_dict_file(tmp_path / f"{only}.pt")) == set(model.state_dict())
    target = DiT(**KW).eval()
    load_weights(target, other.state_dict())  # a state dict in memory, checked the same way
    with pytest.raises(DitlabError, match=r"^state dict does not match the model; missing keys: pos_embed, "):
        load_weights(target, {})
    with pytest.raises(DitlabError, match=r"^checkpoint run 7 does not match the model; unexpected keys: extra$"):
        load_weights(target, {**other.state_dict(), "extra": torch.zeros(1)}, source="run 7")
    x, t, y = inputs()
    assert torch.equal(target(x, t, y), other(x, t, y))

    marker = tmp_path / "pwned"
    torch.save({"model": model.state_dict(), "extra": RunsCode(marker)}, tmp_path / "code.pt")
    with pytest.raises(DitlabError) as e:
        load_state_dict_file(tmp_path / "code.pt")
    assert not marker.exists()  # refused, and never run; torch's reason in one line:
    message = str(e.value)
    assert message.startswith(f"cannot read checkpoint {tmp_path / 'code.pt'} (not a torch checkpoint of tensors: "
                              "Unsupported global: GLOBAL ")
    assert message.endswith(" was not an allowed global by default)") and "\n" not in message


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    torch.save(random_dit(0).state_dict(), tmp_path / "small.pt")
    bigger = DiT(**{**KW, "depth": 3, "input_size": 16})
    with pytest.raises(DitlabError) as e:
        load_weights(bigger, tmp_path / "small.pt")
    msg = str(e.value)
    assert "\n" not in msg
    assert ("missing keys: blocks.2.attn.qkv.weight, blocks.2.attn.qkv.bias, blocks.2.attn.proj.weight, "
            "blocks.2.attn.proj.bias, blocks.2.mlp.fc1.weight (+5 more); shape mismatch") in msg
    assert msg.endswith("; shape mismatch: pos_embed (1, 16, 32) vs model (1, 64, 32)")  # one: no "(+n more)"
    assert "pos_embed (1, 16, 32) vs model (1, 64, 32)" in msg
    with pytest.raises(DitlabError, match="unexpected keys: blocks.1"):
        load_weights(DiT(**{**KW, "depth": 1}), tmp_path / "small.pt")


@pytest.mark.parametrize("name, payload, message", [
    ("garbage.pt", b"not a checkpoint", "cannot read checkpoint"),
    ("garbage.safetensors", b"\x00\x01", "cannot read checkpoint"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, payload, message):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(DitlabError, match=message) as e:
        load_state_dict_file(tmp_path / name)
    assert "\n" not in str(e.value)
    if name.endswith(".pt"):  # torch's reason, from the line after its "WeightsUnpickler error:"
        assert "(not a torch checkpoint of tensors: Unsupported operand " in str(e.value)
    else:  # the exception's type and its first line
        assert "(SafetensorError: Error while deserializing header" in str(e.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DitlabError, match="holds a list, not a state dict"):
        load_state_dict_file(tmp_path / "list.pt")


# --------------------------------------------------------------------------- diffusers


def to_diffusers_model(model: DiT, num_heads: int):
    state, config = ditlab_to_diffusers(model.state_dict(), num_heads=num_heads)
    dm = diffusers.DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    dm.load_state_dict(state, strict=True)
    return dm


@pytest.mark.parametrize("kw", [{}, dict(learn_sigma=False, class_dropout_prob=0.0, in_channels=3, patch_size=4, input_size=16)])
def test_diffusers_dit_gives_the_same_output_after_conversion(kw):
    model = random_dit(0, **kw)
    dm = to_diffusers_model(model, num_heads=2)
    x, t, y = inputs(c=model.in_channels, s=model.input_size)
    if model.y_embedder.dropout_prob == 0:
        y = y.clamp(max=9)  # no null label without label dropout
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = dm(x, timestep=t, class_labels=y).sample  # same [B, out_channels, H, W] layout
        # diffusers' DiT uses timestep frequencies i/(half-1); the official DiT uses i/half.
        assert (ours - theirs).abs().max() > 1e-3
        use_official_timestep_frequencies(dm)
        theirs = dm(x, timestep=t, class_labels=y).sample
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_round_trip_is_exact():
    model = random_dit(3)
    state, config = ditlab_to_diffusers(model.state_dict(), num_heads=2)
    back = diffusers_to_ditlab(state, sample_size=config["sample_size"])
    ref = model.state_dict()
    assert list(back) == list(ref)  # same keys, same (official) order
    for k in ref:
        assert torch.equal(back[k], ref[k]), k


def test_a_label_table_without_a_null_row_gets_one():
    """Trained without label dropout: 10 rows for 10 classes, and diffusers' table always has the null row."""
    model = random_dit(5, class_dropout_prob=0.0)
    state, config = ditlab_to_diffusers(model.state_dict(), num_heads=2, num_classes=10)
    assert config["num_embeds_ada_norm"] == 10
    for i in range(KW["depth"]):
        table = state[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"]
        assert torch.equal(table[:10], model.y_embedder.embedding_table.weight) and not table[10].any()
    dm = diffusers.DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    dm.load_state_dict(state, strict=True)
    use_official_timestep_frequencies(dm)
    x, t, _ = inputs()
    y = torch.tensor([0, 7, 9])  # 9: a class here, the null label had the table been read as 9 + 1 rows
    with torch.no_grad():
        torch.testing.assert_close(dm(x, timestep=t, class_labels=y).sample, model(x, t, y), rtol=1e-5, atol=1e-5)


def test_diffusers_weights_that_are_not_a_dit_are_refused_and_one_block_converts():
    one_block = random_dit(6, depth=1)
    state, config = ditlab_to_diffusers(one_block.state_dict(), num_heads=2)
    back = diffusers_to_ditlab(state, sample_size=config["sample_size"])
    assert all(torch.equal(back[k], v) for k, v in one_block.state_dict().items())
    no_patch_embed = {k: v for k, v in state.items() if not k.startswith("pos_embed.")}
    with pytest.raises(DitlabError, match="not a diffusers DiTTransformer2DModel state dict"):
        diffusers_to_ditlab(no_patch_embed, sample_size=8)
    with pytest.raises(DitlabError, match="diffusers weights not part of the DiT layout: extra.weight"):
        diffusers_to_ditlab({**state, "extra.weight": torch.zeros(1)}, sample_size=8)


def test_convert_cli_both_directions(tmp_path, capsys):
    model = random_dit(4)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": argparse.Namespace(a=1)}, tmp_path / "ckpt.pt")
    out_dir = tmp_path / "diffusers_dit"
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(out_dir), "--to", "diffusers", "--num-heads", "2"]) == 0
    # the class named by config.json's _class_name, as diffusers' loaders pick it; a local directory, no hub
    model_class = getattr(diffusers, json.loads((out_dir / "config.json").read_text())["_class_name"])
    dm = model_class.from_pretrained(str(out_dir)).eval()
    assert isinstance(dm, diffusers.DiTTransformer2DModel)
    use_official_timestep_frequencies(dm)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(dm(x, timestep=t, class_labels=y).sample, model(x, t, y), rtol=1e-5, atol=1e-5)
    assert main(["convert", str(out_dir), str(tmp_path / "back.safetensors"), "--to", "ditlab", "--input-size", "8"]) == 0
    restored = load_weights(DiT(**KW).eval(), tmp_path / "back.safetensors")
    assert torch.equal(restored(x, t, y), model(x, t, y))


def test_convert_cli_bad_input(tmp_path, capsys):
    torch.save(random_dit(0).state_dict(), tmp_path / "ok.pt")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    rope = DiT(**KW, pos_embed="rope")
    torch.save(rope.state_dict(), tmp_path / "rope.pt")
    cases = [
        (["convert", str(tmp_path / "ok.pt"), str(tmp_path / "o"), "--to", "diffusers"], "needs --model"),
        (["convert", str(tmp_path / "bad.pt"), str(tmp_path / "o"), "--to", "diffusers", "--model", "DiT-S/2"], "cannot read checkpoint"),
        (["convert", str(tmp_path / "ok.pt"), str(tmp_path / "o"), "--to", "diffusers", "--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
        (["convert", str(tmp_path / "rope.pt"), str(tmp_path / "o"), "--to", "diffusers", "--num-heads", "2"], "only the official DiT architecture"),
        (["convert", str(tmp_path / "ok.pt"), str(tmp_path / "o"), "--to", "diffusers", "--num-heads", "3"], "not divisible by num_heads 3"),
        (["convert", str(tmp_path / "ok.pt"), str(tmp_path / "o.pt"), "--to", "ditlab", "--input-size", "32"], "--input-size 32 does not match"),
        (["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o.pt"), "--to", "ditlab"], "input not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
