"""UNet weights in the CompVis/Stability layout and the diffusers folder layout: names, outputs, round trips, errors."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.models import (
    UNET_PRESETS,
    UNet,
    compvis_to_diffusers,
    diffusers_to_compvis,
    load_diffusers_unet,
    load_unet_weights,
    save_diffusers,
    unet_preset,
)

diffusers = pytest.importorskip("diffusers")

TINY = unet_preset("tiny")
CONFIGS = {
    "tiny": {},
    "linear_two_layers": {"use_linear_projection": True, "head_dim": 16, "num_heads": None, "layers_per_block": 2,
                          "cross_attention": (False, True)},
    "three_levels": {"block_out_channels": (16, 32, 32), "cross_attention": (True, True, False),
                     "num_heads": (2, 4, 4)},
}
PREFIX = "model.diffusion_model."
# Real key names of Stable Diffusion 1.x checkpoints (v1-5-pruned.ckpt), one per kind of module.
SD15_NAMES = {
    "time_embed.0.weight": (1280, 320), "time_embed.2.bias": (1280,), "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,), "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3), "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3), "middle_block.1.norm.weight": (1280,),
    "middle_block.2.out_layers.0.bias": (1280,), "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1), "out.0.weight": (320,), "out.2.weight": (4, 320, 3, 3),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU


def _reference(seed: int = 0, **overrides) -> tuple[dict, torch.nn.Module]:
    """Our UNet kwargs and a diffusers UNet2DConditionModel with random weights of that configuration."""
    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**UNet(**kwargs).to_diffusers_config()).eval()
    return kwargs, ref


def _inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)  # (B, C, H, W)
    context = torch.randn(batch, 5, TINY["context_dim"], generator=g)  # (B, L, D)
    return x, torch.tensor([3.0, 700.0]), context


def _max_diff(ours: UNet, ref: torch.nn.Module) -> float:
    x, t, context = _inputs()
    with torch.no_grad():
        return (ours.eval()(x, t, context) - ref(x, t, context).sample).abs().max().item()


@pytest.mark.parametrize("name, linear", [("sd15", False), ("sd2", True)])
def test_compvis_names_are_stable_diffusions(name, linear):
    with torch.device("meta"):
        state = UNet(**UNET_PRESETS[name]).state_dict()
    compvis = diffusers_to_compvis(state, prefix=PREFIX)
    assert len(compvis) == len(state) == 686
    context = 768 if name == "sd15" else 1024
    for key, shape in SD15_NAMES.items():
        if linear and key.endswith(("proj_in.weight", "proj_out.weight")):
            shape = shape[:2]  # SD 2.x: Linear projections in the spatial transformers
        if "attn2.to_k" in key:
            shape = (shape[0], context)
        assert tuple(compvis[PREFIX + key].shape) == shape, key
    # diffusers' own single-file converter reads our CompVis dict back to the original tensors.
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(dict(compvis), {"layers_per_block": 2})
    assert converted.keys() == state.keys() and all(converted[k] is state[k] for k in state)
    back = compvis_to_diffusers(compvis)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compvis_checkpoint_gives_diffusers_outputs(name, tmp_path):
    kwargs, ref = _reference(**CONFIGS[name])
    compvis = diffusers_to_compvis(ref.state_dict(), prefix=PREFIX)
    assert compvis_to_diffusers(compvis).keys() == ref.state_dict().keys()
    full = {**compvis, "first_stage_model.encoder.conv_in.weight": torch.zeros(1), "betas": torch.zeros(1000),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "sd.safetensors"))
    torch.save({"state_dict": full, "global_step": 1}, tmp_path / "sd.ckpt")
    bare = {k[len(PREFIX):]: v for k, v in compvis.items()}
    for source in (tmp_path / "sd.safetensors", tmp_path / "sd.ckpt", bare):
        ours = load_unet_weights(UNet(**kwargs), source)
        assert _max_diff(ours, ref) <= 1e-5


def test_ema_weights_of_a_full_checkpoint():
    kwargs, ref = _reference()
    _, other = _reference(seed=1)
    full = diffusers_to_compvis(ref.state_dict(), prefix=PREFIX)
    for key, value in diffusers_to_compvis(other.state_dict(), prefix="diffusion_model.").items():
        full["model_ema." + key.replace(".", "")] = value  # CompVis stores the EMA copy with dots removed
    assert _max_diff(load_unet_weights(UNet(**kwargs), full), ref) <= 1e-5
    assert _max_diff(load_unet_weights(UNet(**kwargs), full, ema=True), other) <= 1e-5
    with pytest.raises(ValueError, match="EMA"):
        load_unet_weights(UNet(**kwargs), {k: v for k, v in full.items() if not k.startswith("model_ema.")}, ema=True)


def test_diffusers_folder_export_round_trip(tmp_path: Path):
    kwargs, ref = _reference(**CONFIGS["linear_two_layers"])
    ours = load_unet_weights(UNet(**kwargs), ref.state_dict())
    folder = save_diffusers(ours, tmp_path / "unet")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    again = load_diffusers_unet(folder)
    for model in (theirs, again):
        state = model.state_dict()
        assert state.keys() == ours.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())  # bitwise
    assert _max_diff(ours, theirs) <= 1e-5  # same weights; our kernels differ from diffusers' in rounding
    assert again.to_diffusers_config() == ours.to_diffusers_config()


def test_mismatched_checkpoints_name_every_bad_key(tmp_path: Path):
    kwargs, ref = _reference()
    state = dict(ref.state_dict())
    del state["conv_in.bias"]
    state["down_blocks.0.extra.weight"] = torch.zeros(1)
    state["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(ValueError) as err:
        load_unet_weights(UNet(**kwargs), state)
    message = str(err.value)
    assert "missing keys ['conv_in.bias']" in message and "unexpected keys ['down_blocks.0.extra.weight']" in message
    assert "conv_out.weight: checkpoint (4, 32, 1, 1) vs model (4, 32, 3, 3)" in message

    # A CompVis checkpoint of another configuration: reported in the checkpoint's own names.
    _, two_layers = _reference(layers_per_block=2)
    save_file(diffusers_to_compvis(two_layers.state_dict(), prefix=PREFIX), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError) as err:
        load_unet_weights(UNet(**kwargs), tmp_path / "other.safetensors")
    message = str(err.value)
    assert str(tmp_path / "other.safetensors") in message
    assert "unexpected keys ['input_blocks.2.0.emb_layers.1.bias'" in message
    assert "output_blocks.3.0.skip_connection.weight: checkpoint (32, 96, 1, 1) vs model (32, 64, 1, 1)" in message

    with pytest.raises(ValueError, match="cannot tell"):
        load_unet_weights(UNet(**kwargs), {"foo.weight": torch.zeros(1)})


class Payload:
    """Stands for arbitrary code a pickle could run."""


def test_pickled_objects_are_refused(tmp_path: Path):
    kwargs, ref = _reference()
    torch.save({"state_dict": ref.state_dict(), "callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_unet_weights(UNet(**kwargs), tmp_path / "evil.ckpt")
    torch.save({**ref.state_dict(), "counts": collections.Counter("ab")}, tmp_path / "odd.pt")  # allowed type
    with pytest.raises(ValueError, match=r"not tensors: \['counts'\]"):
        load_unet_weights(UNet(**kwargs), tmp_path / "odd.pt")
