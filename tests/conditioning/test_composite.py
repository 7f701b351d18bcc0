"""Several text encoders as one (SDXL): against diffusers' StableDiffusionXLPipeline.encode_prompt and its UNet step,
CLIP + OpenCLIP composites, the null condition with its pooled vector, dropout, the size/crop ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.conditioning import (
    CompositeTextEncoder,
    build_text_encoder,
    build_text_encoders,
    conditioning_dropout,
    expand_cond,
    micro_conditions,
    null_condition,
    sdxl_text_encoders,
)
from ldm.models import UNet, unet_preset
from tests.conditioning.tiny import TINY_OPENCLIP, tiny_clip_config, tiny_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU

PROMPTS = ["red apple", "a dog face with a hat", ""]
LENGTH = 16
DIMS = (32, 48)  # CLIP-L and bigG stand-ins
POOLED = 24  # text_encoder_2's projection


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> tuple[Path, object]:
    """A random-weight StableDiffusionXLPipeline (text encoders, tokenizers, tiny SDXL UNet) saved to a folder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(LENGTH), tiny_clip_tokenizer(LENGTH, pad_token="!")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, DIMS[0]))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2, DIMS[1], projection_dim=POOLED))
    ours = UNet(**unet_preset("tiny-sdxl", context_dim=sum(DIMS), pooled_dim=POOLED))
    unet = diffusers.UNet2DConditionModel(**ours.to_diffusers_config())
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=diffusers.EulerDiscreteScheduler())
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    return folder, pipe


def test_sdxl_encoders_and_unet_match_diffusers_pipeline(sdxl_folder):
    folder, pipe = sdxl_folder
    encoder = build_text_encoders(sdxl_text_encoders(folder, max_length=LENGTH))
    assert (encoder.dim, encoder.pooled_dim, encoder.max_length) == (sum(DIMS), POOLED, LENGTH)
    cond = encoder(PROMPTS)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                                       do_classifier_free_guidance=True)
    assert cond["context"].shape == (3, LENGTH, sum(DIMS)) and cond["context_mask"].all()
    torch.testing.assert_close(cond["context"], embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond["pooled"], pooled, atol=1e-6, rtol=0)
    null = null_condition(encoder, "zeros")  # SDXL's empty negative prompt (force_zeros_for_empty_prompt)
    torch.testing.assert_close(expand_cond(null, 3)["context"], negative, atol=0, rtol=0)
    torch.testing.assert_close(expand_cond(null, 3)["pooled"], negative_pooled, atol=0, rtol=0)
    empty = null_condition(encoder)  # the SD-style null: the empty prompt's features and pooled vector
    torch.testing.assert_close(empty["context"], embeds[2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(empty["pooled"], pooled[2:], atol=1e-6, rtol=0)

    # One denoising step: our UNet on our conditions = diffusers' UNet on the pipeline's, time ids included.
    time_ids = micro_conditions((1024, 768), (16, 0), (512, 512), batch=3)
    expected_ids = pipe._get_add_time_ids((1024, 768), (16, 0), (512, 512), torch.float32, POOLED)
    torch.testing.assert_close(time_ids, expected_ids.expand(3, 6), atol=0, rtol=0)
    unet = UNet.from_diffusers_config(dict(pipe.unet.config)).eval()
    unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        out = unet(x, t, cond["context"], cond["context_mask"], pooled=cond["pooled"], time_ids=time_ids)
        ref = pipe.unet(x, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": expected_ids.expand(3, 6)})
    err = (out - ref.sample).abs().max()
    assert err < 1e-5, float(err)


@pytest.fixture(scope="module")
def clip_and_openclip(tmp_path_factory, sdxl_folder):
    """Specs of a transformers CLIP (the SDXL folder's first encoder) and a tiny OpenCLIP checkpoint."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_OPENCLIP)
    path = tmp_path_factory.mktemp("openclip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    clip = dict(kind="clip", path=str(sdxl_folder[0]), max_length=LENGTH, layer="penultimate", final_norm=False)
    openclip = dict(kind="openclip", path=str(path), max_length=LENGTH, model_name="ViT-B-32", pooled=True,
                    model_overrides={"embed_dim": 16, "text_cfg": TINY_OPENCLIP["text_cfg"]}, final_norm=False)
    return clip, openclip


def test_clip_plus_openclip_concatenates_and_pools_from_the_second(clip_and_openclip):
    clip_spec, openclip_spec = clip_and_openclip
    encoder = build_text_encoders([clip_spec, openclip_spec])
    parts = [build_text_encoder(**{**s, "mask_padding": True}) for s in (clip_spec, openclip_spec)]
    cond = encoder(PROMPTS)
    alone = [p(PROMPTS) for p in parts]
    assert cond["context"].shape == (3, LENGTH, 32 + 32) and cond["pooled"].shape == (3, 16)
    assert torch.equal(cond["context"], torch.cat([a["context"] for a in alone], dim=-1))
    assert torch.equal(cond["pooled"], alone[1]["pooled"])
    # without the final norm the penultimate layer is the raw block output (SDXL), not the SD 2.x normalised one
    normed = build_text_encoder(**{**openclip_spec, "final_norm": True})(PROMPTS)["context"]
    assert (normed - alone[1]["context"]).abs().max() > 0.1
    # these two tokenize differently (characters vs BPE): a position is attended when either encoder attends to it
    masked = CompositeTextEncoder(parts)(PROMPTS)["context_mask"]
    assert torch.equal(masked, alone[0]["context_mask"] | alone[1]["context_mask"])
    assert masked.sum(1).tolist() == [len("redapple") + 2, LENGTH, 2] != alone[1]["context_mask"].sum(1).tolist()

    null = null_condition(encoder)
    assert set(null) == {"context", "context_mask", "pooled"} and null["pooled"].shape == (1, 16)
    torch.testing.assert_close(null["pooled"], cond["pooled"][2:], atol=1e-6, rtol=0)  # the empty prompt's pooled
    time_ids = micro_conditions(torch.tensor([[64, 48], [32, 32], [40, 64]]), (0, 0), (32, 32))  # (3, 6)
    dropped = conditioning_dropout({**cond, "time_ids": time_ids}, null, p=0.999999,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped["pooled"], null["pooled"].expand(3, -1))
    assert torch.equal(dropped["context"], null["context"].expand(3, -1, -1))
    assert torch.equal(dropped["time_ids"], time_ids)  # size/crop ids stay (both guidance halves share them)


def test_composite_configuration_errors(clip_and_openclip):
    clip_spec, openclip_spec = clip_and_openclip
    with pytest.raises(ValueError, match="encoder 0 .*pooled=True"):
        build_text_encoders([clip_spec, openclip_spec], pooled_from=0)
    with pytest.raises(ValueError, match=r"max_length differ \(\[16, 12\]\)"):
        build_text_encoders([clip_spec, {**openclip_spec, "max_length": 12}])
    with pytest.raises(ValueError, match="text encoder 1: unknown text encoder kind 'bert'"):
        build_text_encoders([clip_spec, {"kind": "bert"}])
    with pytest.raises(ValueError, match="text encoder 0: no 'kind'"):
        build_text_encoders([{"path": "x"}])
    no_pool = build_text_encoders([clip_spec], pooled_from=None)
    assert "pooled" not in no_pool(["x"]) and no_pool.pooled_dim == 0


def test_micro_conditions():
    ids = micro_conditions((1024, 768), (16, 8), (512, 512))
    assert ids.dtype == torch.float32 and ids.tolist() == [[1024, 768, 16, 8, 512, 512]]
    per_image = micro_conditions(torch.tensor([[10, 20], [30, 40]]), (0, 0), (64, 64))
    assert per_image.tolist() == [[10, 20, 0, 0, 64, 64], [30, 40, 0, 0, 64, 64]]
    assert micro_conditions((1, 2), (3, 4), (5, 6), batch=4).shape == (4, 6)
    with pytest.raises(ValueError, match="pairs"):
        micro_conditions((1, 2, 3), (0, 0), (5, 6))
    with pytest.raises(ValueError, match="2 rows of sizes for a batch of 3"):
        micro_conditions(torch.zeros(2, 2), (0, 0), (5, 6), batch=3)
