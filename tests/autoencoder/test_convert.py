"""The autoencoder in the CompVis/Stability layout and as a diffusers folder: names, outputs, round trips, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from autoencoder import SD_VAE_CONFIG, AutoencoderKL, load_compvis, load_diffusers, load_weights, save_diffusers
from autoencoder.convert import compvis_to_diffusers, diffusers_to_compvis

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "attention": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4),
    "three_levels_no_quant": dict(block_out_channels=(8, 16, 16), norm_num_groups=4, layers_per_block=2,
                                  latent_channels=3, use_quant_conv=False, use_post_quant_conv=False),
}
PREFIX = "first_stage_model."
# Real key names of Stable Diffusion's KL-f8 VAE in its CompVis checkpoints, one per kind of module.
SD_NAMES = {
    "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3), "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,), "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1), "encoder.mid.block_2.norm2.bias": (512,),
    "encoder.norm_out.weight": (512,), "encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1), "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1), "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3), "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3), "decoder.norm_out.weight": (128,),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU


def _reference(config: dict, seed: int = 0) -> torch.nn.Module:
    levels = len(config["block_out_channels"])
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                   up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()


def _max_diff(ours: AutoencoderKL, ref: torch.nn.Module) -> float:
    """Largest difference of posterior means and decoded images against diffusers."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W)
    with torch.no_grad():
        mean = ours.encode_dist(x).mean
        image = ours.decode_raw(mean)
        return max((mean - ref.encode(x).latent_dist.mean).abs().max().item(),
                   (image - ref.decode(mean).sample).abs().max().item())


def test_compvis_names_are_stable_diffusions():
    with torch.device("meta"):
        state = AutoencoderKL(**SD_VAE_CONFIG).state_dict()
    compvis = diffusers_to_compvis(state, prefix=PREFIX)
    assert len(compvis) == len(state) == 248
    for key, shape in SD_NAMES.items():
        assert tuple(compvis[PREFIX + key].shape) == shape, key
    # diffusers' own single-file converter reads our CompVis dict back to the original names and shapes.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(compvis, {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in state.items()}
    back = compvis_to_diffusers(compvis)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compvis_checkpoint_gives_diffusers_outputs(name, tmp_path: Path):
    config = CONFIGS[name]
    ref = _reference(config)
    bare = diffusers_to_compvis(ref.state_dict())
    back = compvis_to_diffusers(bare)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    # A stage-1 training checkpoint also holds its loss (LPIPS, discriminator); an SD checkpoint the UNet.
    stage1 = {**bare, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    full = {**{PREFIX + k: v for k, v in bare.items()}, "model.diffusion_model.out.2.bias": torch.zeros(4)}
    torch.save({"state_dict": stage1}, tmp_path / "vae.ckpt")
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "sd.safetensors"))
    for source in (tmp_path / "vae.ckpt", tmp_path / "sd.safetensors", full):
        ours = load_compvis(source, config)
        assert not ours.training and not any(p.requires_grad for p in ours.parameters())
        assert _max_diff(ours, ref) <= 1e-5
    assert _max_diff(load_weights(AutoencoderKL(**config), full), ref) <= 1e-5  # layout detected


def test_diffusers_folder_export_round_trip(tmp_path: Path):
    config = CONFIGS["attention"]
    ours = load_weights(AutoencoderKL(**config, scale_factor=0.3, shift_factor=0.05), _reference(config).state_dict())
    folder = save_diffusers(ours, tmp_path / "vae")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    theirs = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    assert (theirs.config.scaling_factor, theirs.config.shift_factor) == (0.3, 0.05)
    again = load_diffusers(folder)
    assert again.config == ours.config
    for model in (theirs, again):
        state = model.state_dict()
        assert state.keys() == ours.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())  # bitwise
    assert _max_diff(ours, theirs) <= 1e-5  # same weights; attention kernels differ in rounding
    # diffusers' convention for the exported factors: image = decode(latent / scaling_factor + shift_factor)
    z = torch.randn(2, config["latent_channels"], 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ours.decode(z)
        got = theirs.decode(z / theirs.config.scaling_factor + theirs.config.shift_factor).sample
    assert (expected - got).abs().max() <= 1e-5


def test_mismatched_compvis_checkpoint_names_every_bad_key(tmp_path: Path):
    config = CONFIGS["attention"]
    state = diffusers_to_compvis(_reference(config).state_dict(), prefix=PREFIX)
    del state[PREFIX + "encoder.mid.attn_1.k.bias"]
    state[PREFIX + "encoder.mid.attn_1.q.weight"] = torch.zeros(16, 16, 3, 3)
    state[PREFIX + "decoder.up.0.block.9.conv1.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        load_compvis(tmp_path / "bad.safetensors", config)
    message = str(err.value)
    assert str(tmp_path / "bad.safetensors") in message
    assert "missing keys ['encoder.mid.attn_1.k.bias']" in message
    assert "unexpected keys ['decoder.up.0.block.9.conv1.weight']" in message
    assert "encoder.mid.attn_1.q.weight: checkpoint (16, 16, 3, 3) vs model (16, 16, 1, 1)" in message
    with pytest.raises(ValueError, match="missing keys .*encoder.down.0.block.1.conv1.weight"):
        load_compvis(tmp_path / "bad.safetensors", {**config, "layers_per_block": 2})
    (tmp_path / "bad.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_compvis(tmp_path / "bad.npz", config)
