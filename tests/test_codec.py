"""The latent codec interface with a tiny randomly initialised diffusers AutoencoderKL."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditlab.config import VAEConfig  # noqa: E402
from ditlab.errors import DitlabError  # noqa: E402
from ditlab.codecs import latent_shape, load_codec
from ditlab.codecs.sd_vae import SDVAECodec  # noqa: E402


def tiny_vae(in_channels: int = 3) -> "diffusers.AutoencoderKL":
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    vae.save_pretrained(d)
    return d, vae


def test_none_path_is_pixel_space():
    assert load_codec(VAEConfig(path=None)) is None
    assert latent_shape(None, 28, 1) == (1, 28, 28)


def test_directory_shapes_and_scale(vae_dir):
    d, vae = vae_dir
    codec = load_codec(VAEConfig(path=str(d), scale_factor=0.5, sample_posterior=False))
    assert isinstance(codec, SDVAECodec)
    assert (codec.image_channels, codec.latent_channels, codec.downsample) == (3, 4, 2)
    assert latent_shape(codec, 16, 3) == (4, 8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8)
    # The scale factor multiplies the posterior mean (checked against the VAE itself).
    with torch.no_grad():
        mean = vae.eval().encode(x).latent_dist.mean
        torch.testing.assert_close(z, 0.5 * mean)
        # decode divides it out again before the VAE decoder; deterministic.
        ref = vae.decode(mean).sample
    out = codec.decode(z)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(codec.decode(z), out, rtol=0, atol=0)


def test_posterior_sample_is_seeded_and_scaled(vae_dir):
    d, vae = vae_dir
    codec = load_codec(VAEConfig(path=str(d)))  # default: sample, 0.18215
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z1 = codec.encode(x, generator=torch.Generator().manual_seed(1))
    z2 = codec.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
        ref = (dist.mean + dist.std * eps) * 0.18215
    torch.testing.assert_close(z1, ref)
    assert not torch.equal(codec.encode(x, generator=torch.Generator().manual_seed(2)), z1)


def test_single_file_with_config_beside_it(vae_dir):
    d, vae = vae_dir
    codec = load_codec(VAEConfig(path=str(d / "diffusion_pytorch_model.safetensors"), sample_posterior=False))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.18215
    torch.testing.assert_close(codec.encode(x), ref)


def test_bad_paths_and_shapes(tmp_path, vae_dir):
    with pytest.raises(DitlabError, match="not found"):
        load_codec(VAEConfig(path=str(tmp_path / "missing")))
    with pytest.raises(DitlabError, match="config.json"):
        load_codec(VAEConfig(path=str(tmp_path)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DitlabError, match="cannot read"):
        load_codec(VAEConfig(path=str(junk)))
    codec = load_codec(VAEConfig(path=str(vae_dir[0])))
    with pytest.raises(DitlabError, match="channel"):
        latent_shape(codec, 16, 1)
    with pytest.raises(DitlabError, match="divisible"):
        latent_shape(codec, 15, 3)
    with pytest.raises(DitlabError, match="encodes"):
        codec.encode(torch.zeros(1, 1, 16, 16))
