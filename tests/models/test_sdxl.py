"""SDXL shapes: micro-conditioning (pooled text + size/crop ids), per-level transformer depth, no attention at the
first level, against diffusers' UNet2DConditionModel (addition_embed_type="text_time"), state dicts both ways."""

from __future__ import annotations

import pytest
import torch

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
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU

TINY_XL = unet_preset("tiny-sdxl")
# The published diffusers config of stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (values as released).
SDXL_BASE_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


def _inputs(batch: int = 3, size: tuple[int, int] = (8, 12)) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(batch, 4, *size, generator=g),  # (B, C, H, W)
        t=torch.tensor([0.5, 401.25, 999.0])[:batch],
        context=torch.randn(batch, 6, TINY_XL["context_dim"], generator=g),  # (B, L, D)
        mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)[:batch],
        pooled=torch.randn(batch, TINY_XL["pooled_dim"], generator=g),  # (B, P)
        # (original h, w, crop top, left, target h, w) as SDXL orders them
        time_ids=torch.tensor([[1024.0, 768, 0, 0, 1024, 1024], [512, 640, 37, 12, 768, 1344],
                               [333, 2048, 128, 0, 1024, 1024]])[:batch],
    )


def _theirs(ref, inp: dict) -> torch.Tensor:
    return ref(inp["x"], inp["t"], inp["context"], encoder_attention_mask=inp["mask"],
               added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}).sample


def _ours(unet, inp: dict, **overrides) -> torch.Tensor:
    kw = {**dict(context_mask=inp["mask"], pooled=inp["pooled"], time_ids=inp["time_ids"]), **overrides}
    return unet(inp["x"], inp["t"], inp["context"], **kw)


def test_micro_conditioning_matches_diffusers_both_ways():
    torch.manual_seed(0)
    ours = UNet(**TINY_XL).eval()
    ref = diffusers.UNet2DConditionModel(**ours.to_diffusers_config()).eval()
    inp = _inputs()
    with torch.no_grad():
        ours.load_state_dict(ref.state_dict(), strict=True)  # diffusers -> ours
        expected = _theirs(ref, inp)
        out = _ours(ours, inp)
        err = (out - expected).abs().max()
        assert err < 1e-5, float(err)
        torch.manual_seed(1)
        mine = UNet(**TINY_XL).eval()  # other random weights, loaded into a fresh diffusers model: ours -> diffusers
        theirs = diffusers.UNet2DConditionModel(**mine.to_diffusers_config()).eval()
        theirs.load_state_dict(mine.state_dict(), strict=True)
        torch.testing.assert_close(_ours(mine, inp), _theirs(theirs, inp), atol=1e-5, rtol=0)
        # each micro-condition matters: another crop of the same image changes only that sample's prediction
        ids = inp["time_ids"].clone()
        ids[1, 2:4] = torch.tensor([0.0, 0.0])
        moved = _ours(ours, inp, time_ids=ids)
        assert (moved[1] - out[1]).abs().max() > 1e-3 and torch.equal(moved[0], out[0])
        # one (6,) vector of ids broadcasts over the batch
        same = torch.tensor([1024.0, 1024, 0, 0, 1024, 1024])
        torch.testing.assert_close(_ours(ours, inp, time_ids=same), _ours(ours, inp, time_ids=same.expand(3, 6)))


def test_added_embedding_gradients_match_diffusers():
    torch.manual_seed(0)
    ours = UNet(**TINY_XL)
    ref = diffusers.UNet2DConditionModel(**ours.to_diffusers_config())
    ours.load_state_dict(ref.state_dict(), strict=True)
    inp = _inputs(batch=2, size=(8, 8))
    pooled_ours, pooled_ref = inp["pooled"].clone().requires_grad_(), inp["pooled"].clone().requires_grad_()
    _ours(ours, inp, pooled=pooled_ours).square().mean().backward()
    _theirs(ref, {**inp, "pooled": pooled_ref}).square().mean().backward()
    torch.testing.assert_close(pooled_ours.grad, pooled_ref.grad, atol=1e-7, rtol=1e-4)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith(("add_embedding.", "time_embedding.", "down_blocks.0.", "mid_block.attentions.0.")):
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-7, rtol=1e-4, msg=name)


def test_diffusers_folder_and_compvis_round_trips(tmp_path):
    torch.manual_seed(0)
    ours = UNet(**TINY_XL).eval()
    inp = _inputs()
    save_diffusers(ours, tmp_path / "unet")
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert ref.config.addition_embed_type == "text_time" and list(ref.config.transformer_layers_per_block) == [1, 1, 2]
    again = load_diffusers_unet(tmp_path / "unet").eval()
    heads = ("num_heads", "head_dim")  # diffusers stores heads per level; the other settings come back as given
    assert {k: v for k, v in again.config.items() if k not in heads} == {k: v for k, v in ours.config.items()
                                                                         if k not in heads}
    assert again.heads_per_level == ours.heads_per_level == (2, 4, 8)
    with torch.no_grad():
        expected = _ours(ours, inp)
        torch.testing.assert_close(_theirs(ref, inp), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(_ours(again, inp), expected, atol=0, rtol=0)
    # CompVis/Stability (sgm) names: the additional embedding is label_emb.0.{0,2}
    compvis = diffusers_to_compvis(ours.state_dict(), prefix="model.diffusion_model.")
    assert compvis["model.diffusion_model.label_emb.0.0.weight"].shape == (4 * 16, 16 + 6 * 8)
    assert "model.diffusion_model.label_emb.0.2.bias" in compvis
    assert not any("add_embedding" in k for k in compvis)
    assert compvis_to_diffusers(compvis).keys() == ours.state_dict().keys()
    fresh = load_unet_weights(UNet(**TINY_XL), compvis).eval()  # layout detected from the keys
    with torch.no_grad():
        torch.testing.assert_close(_ours(fresh, inp), expected, atol=0, rtol=0)


def test_sdxl_preset_is_the_published_sdxl_unet():
    with torch.device("meta"):
        ours = UNet(**UNET_PRESETS["sdxl"])
        from_config = UNet.from_diffusers_config(SDXL_BASE_CONFIG)
        ref = diffusers.UNet2DConditionModel(**SDXL_BASE_CONFIG)
        refiner = UNet.from_diffusers_config({**SDXL_BASE_CONFIG, "projection_class_embeddings_input_dim": 2560},
                                             num_time_ids=5)  # the refiner's 5 ids (aesthetic score for target)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert shapes == {k: v.shape for k, v in from_config.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
    assert from_config.config["pooled_dim"] == 1280 and from_config.heads_per_level == (5, 10, 20)
    assert refiner.config["pooled_dim"] == 1280


def test_sdxl_conditioning_errors():
    unet = UNet(**TINY_XL)
    inp = _inputs(batch=2, size=(8, 8))
    with pytest.raises(ValueError, match="needs pooled and time_ids"):
        _ours(unet, inp, pooled=None)
    with pytest.raises(ValueError, match=r"time_ids \(2, 6\)"):
        _ours(unet, inp, time_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="pooled_dim and addition_time_embed_dim"):
        UNet(**{**TINY_XL, "pooled_dim": None})
    with pytest.raises(ValueError, match="transformer_depth has 2 entries"):
        UNet(**{**TINY_XL, "transformer_depth": (1, 2)})
    with pytest.raises(ValueError, match="addition_embed_type='text'"):
        UNet.from_diffusers_config({**SDXL_BASE_CONFIG, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="one int per level"):
        UNet.from_diffusers_config({**SDXL_BASE_CONFIG, "transformer_layers_per_block": [[1, 1], [2, 2], [3, 3]]})
    plain = UNet(**unet_preset("tiny"))  # without SDXL conditioning the extra inputs are ignored
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(plain(x, 3.0, context, pooled=torch.randn(1, 7), time_ids=torch.zeros(6)),
                           plain(x, 3.0, context))
