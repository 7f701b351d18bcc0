"""The SDXL layout from the config: `text_encoder.kind: sdxl` (a diffusers SDXL folder) and encoder lists give the
UNet its context and pooled widths; the null condition kind; the pipeline passes pooled + size/crop ids and samples
any height and width; `ldm-sample --width/--height` and the micro-conditioning flags."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm.assemble import assemble, text_fingerprint
from ldm.config import ConfigError, LDMConfig, load_config
from tests.conditioning import test_composite as composite
from tests.conditioning.test_composite import DIMS, LENGTH, POOLED
from tests.conftest import ROOT, tiny_ldm_overrides

sdxl_folder = composite.sdxl_folder  # the tiny random SDXL pipeline folder (fixture)

CONFIG = ROOT / "configs/ldm/emoji.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(shards, autoencoder, tmp_path, *extra) -> LDMConfig:
    return load_config(LDMConfig, CONFIG, [*tiny_ldm_overrides(shards, autoencoder, tmp_path / "run", None),
                                           "model.preset=tiny-sdxl", *extra])


def _time_ids(unet) -> list:
    """Record the time_ids of every UNet forward."""
    seen = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["time_ids"].clone()), with_kwargs=True)
    return seen


def test_sdxl_kind_builds_the_sdxl_layout_and_samples_any_size(sdxl_folder, tiny_shards, tiny_autoencoder,
                                                               tmp_path):
    folder, _ = sdxl_folder
    cfg = _cfg(tiny_shards, tiny_autoencoder, tmp_path, "text_encoder.kind=sdxl", f"text_encoder.path={folder}",
               f"text_encoder.max_length={LENGTH}", "text_encoder.null_condition=zeros")
    parts = assemble(cfg)
    assert (parts.context_dim, parts.pooled_dim) == (sum(DIMS), POOLED) and parts.micro_conditioned
    assert parts.null_cond["pooled"].shape == (1, POOLED) and not parts.null_cond["context"].any()
    assert parts.null_cond["context_mask"].all()  # SDXL's zeros: every position attended
    torch.manual_seed(0)
    unet = parts.unet()
    assert unet.add_embedding.linear_1.in_features == POOLED + 6 * 8  # pooled + 6 ids x 8 sinusoidal features
    pipe = parts.pipeline(unet)
    seen = _time_ids(pipe.unet)
    settings = dict(seeds=[0, 1], sampler="ddim", steps=2, guidance=3.0, height=16, width=24)
    images = pipe(["red apple", "dog"], **settings)
    assert images.shape == (2, 3, 16, 24)
    assert seen and all(torch.equal(ids, torch.tensor([[16.0, 24, 0, 0, 16, 24]] * 4)) for ids in seen)  # 2 x CFG
    seen.clear()
    other = pipe(["red apple", "dog"], **settings, original_size=(64, 96), crop_top_left=(8, 0))
    assert torch.equal(seen[0][0], torch.tensor([64.0, 96, 8, 0, 16, 24]))
    assert (other - images).abs().max() > 1e-4  # the micro-conditions reach the network
    with pytest.raises(ValueError, match="multiples of the autoencoder's downsampling factor 2"):
        pipe(["x"], seeds=[0], steps=1, sampler="ddim", height=15)


def test_encoder_lists_give_context_and_pooled_widths(tiny_shards, tiny_autoencoder, tmp_path):
    cfg = _cfg(tiny_shards, tiny_autoencoder, tmp_path, "text_encoder.encoders=[{kind: hf}, {kind: hf, pooled: true}]")
    parts = assemble(cfg)
    assert (parts.context_dim, parts.pooled_dim) == (768, 384)  # two MiniLMs concatenated; mean-pooled from one
    assert parts.unet_kwargs()["pooled_dim"] == 384 and parts.unet_kwargs()["context_dim"] == 768
    single = load_config(LDMConfig, CONFIG, [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path, None)])
    assert text_fingerprint(cfg.text_encoder) != text_fingerprint(single.text_encoder)
    unpooled = _cfg(tiny_shards, tiny_autoencoder, tmp_path, "text_encoder.encoders=[{kind: hf}, {kind: hf}]")
    with pytest.raises(ConfigError, match="model.addition_time_embed_dim: SDXL's added conditioning needs a pooled"):
        assemble(unpooled).unet()
    wrong = _cfg(tiny_shards, tiny_autoencoder, tmp_path, "text_encoder.pooled=true", "model.pooled_dim=99")
    with pytest.raises(ConfigError, match="model.pooled_dim: 99, but the text encoder's pooled vector has 384"):
        assemble(wrong).unet()


@pytest.mark.parametrize("overrides, key", [
    (["text_encoder.encoders=[]"], "text_encoder.encoders"),
    (["text_encoder.encoders=[{kind: hf}]", "text_encoder.layer=last"], "text_encoder.layer"),
    (["text_encoder.encoders=[{kind: hf, pooled: true}, {kind: hf, pooled: true}]"], "text_encoder.pooled_from"),
    (["text_encoder.encoders=[{kind: hf}]", "text_encoder.pooled_from=0"], "text_encoder.pooled_from"),
    (["text_encoder.encoders=[{kind: openclip}]"], r"text_encoder.encoders\[0\].path"),
    (["text_encoder.encoders=[{kind: hf, subfolder: x}]"], r"text_encoder.encoders\[0\].subfolder"),
    (["text_encoder.kind=sdxl"], "text_encoder.path"),
    (["text_encoder.kind=sdxl", "text_encoder.path=x", "text_encoder.pooled=true"], "text_encoder.pooled"),
    (["text_encoder.null_condition=nothing"], "text_encoder.null_condition"),
    (["model.num_time_ids=5"], "model.addition_time_embed_dim"),
])
def test_text_encoder_sections_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(LDMConfig, CONFIG, overrides)


def test_sample_cli_width_height_and_micro_flags(tiny_ldm_run, tmp_path, capsys):
    from ldm.cli.sample import main

    common = ["--model", str(tiny_ldm_run / "export"), "--prompt", "red apple", "--images-per-prompt", "1",
              "--steps", "2", "--sampler", "ddim"]
    assert main([*common, "--width", "24", "--height", "16", "--out", str(tmp_path / "wide")]) == 0
    with Image.open(tmp_path / "wide" / "00000.png") as image:
        assert image.size == (24, 16) and image.text["width"] == "24" and image.text["height"] == "16"
    for extra, flag in ((["--original-size", "64", "64"], "--original-size"), (["--width", "15"], "--width/--height"),
                        (["--crop-top-left", "-1", "0"], "--crop-top-left")):
        with pytest.raises(SystemExit) as e:
            main([*common, *extra, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_shipped_sdxl_lora_config_loads():
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/sdxl-lora.yaml")
    assert cfg.model.preset == "sdxl" and cfg.model.lora.rank == 16 and cfg.text_encoder.kind == "sdxl"
    from ldm.data.buckets import bucket_sizes

    sizes = bucket_sizes(cfg.data.buckets.sizes, cfg.data.image_size, cfg.data.buckets.multiple,
                         cfg.data.buckets.max_ratio)
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)} <= set(sizes)
