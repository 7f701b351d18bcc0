"""The export as a diffusers pipeline: ``DiffusionPipeline.from_pretrained(export/diffusers)`` against our sampler with
the same seeds, sampler and guidance: the stock call on the discrete chain (DDIM, DDPM), ``sample_like_ldm`` (the
pipeline's components with the text mask and our flow grid) on the masked default and the shifted flow, the recorded
differences, the folded latent shift; the DiT under T5 as PixArtAlphaPipeline and the MMDiT under SD3's encoders as
StableDiffusion3Pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.config import LDMConfig, load_config
from tests.conditioning.test_t5 import CLIP_LENGTH, T5_LENGTH, sd3_folder, t5_folder  # noqa: F401 (fixtures)
from tests.conftest import CHAIN

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SEEDS = ["red apple", "a dog face with a hat"], [3, 11]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A random-weight CLIP text model with its tokenizer in one folder."""
    from transformers import CLIPTextModel

    from tests.conditioning.tiny import tiny_clip_config, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPTextModel(tiny_clip_config(tokenizer, 32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _export(out: Path, autoencoder: Path, overrides: list[str]) -> Path:
    """An export of a random-weight tiny UNet under the emoji config on the DDPM chain (``CHAIN``) with ``overrides``,
    written by save_export."""
    from ldm.assemble import assemble
    from ldm.export import save_export

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*CHAIN, f"autoencoder.path={autoencoder}", "data.image_size=16", "model.preset=tiny",
                       "sampling.steps=5", "sampling.guidance=3.0", *overrides])
    parts = assemble(cfg)
    torch.manual_seed(0)
    net = parts.unet()
    # every weight random: the networks zero-init their output layers (the transformers' whole residual branches),
    # which would make every prediction 0 and the text and guidance invisible in the image
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    return save_export(out, cfg, state, state, parts.null_cond, cfg.autoencoder.path, parts.unet_kwargs(), {"step": 0})


def _ours(export: Path) -> torch.Tensor:
    from ldm.assemble import load_exported

    pipe, cfg = load_exported(export)
    s = cfg.sampling
    return pipe(PROMPTS, seeds=SEEDS, sampler=s.sampler, steps=s.steps, guidance=s.guidance)


def _stock(export: Path, **change) -> tuple[torch.Tensor, dict, object]:
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(export / "diffusers")
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = pipe(PROMPTS, generator=generators, output_type="pt", **{**info["call"], **change}).images
    return images, info, pipe


def _guidance_shows(export: Path, ours: torch.Tensor, guidance: float) -> None:
    """The sample depends on the text: the stock call at another guidance gives another image."""
    other, _, _ = _stock(export, guidance_scale=guidance + 2.0)
    assert float((other - ours).abs().max()) > 1e-3




CLIP = ["text_encoder.kind=clip", "text_encoder.max_length=16"]
CASES = {
    "eps-ddim": (["sampling.sampler=ddim"], "DDIMScheduler"),
    "v-zsnr-ddpm": (["diffusion.prediction=v", "diffusion.zero_terminal_snr=true", "diffusion.schedule=scaled_linear",
                     "sampling.sampler=ddpm"], "DDPMScheduler"),  # ancestral: noise drawn image by image, step by step
}
FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity", "diffusion.time_shift=3.0",
        "sampling.sampler=euler_ode"]


def _like(pipe, info) -> torch.Tensor:
    from ldm.export.pipeline_folder import sample_like_ldm

    return sample_like_ldm(pipe, PROMPTS, SEEDS, **info["reproduce"])


@pytest.mark.parametrize("case", list(CASES))
def test_stock_pipeline_reproduces_our_sample(case, tmp_path, tiny_autoencoder, clip_folder):
    overrides, scheduler = CASES[case]
    export = _export(tmp_path / "export", tiny_autoencoder, [*CLIP, f"text_encoder.path={clip_folder}", *overrides])
    theirs, info, pipe = _stock(export)
    ours = _ours(export)
    assert info["exact"] and info["differences"] == [] and info["scheduler"] == scheduler
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == scheduler
    assert json.loads((export / "export.json").read_text())["diffusers"] == info
    assert ours.shape == theirs.shape == (2, 3, 16, 16) and float(ours.std()) > 0.01
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err  # measured 5e-7 to 2e-6: diffusers runs float32 schedules, ours float64
    err_like = float((ours - _like(pipe, info)).abs().max())
    assert err_like < 1e-4, err_like


def test_flow_export_reproduces_our_grid_with_its_sigmas(tmp_path, tiny_autoencoder, clip_folder):
    """The stock call cannot step the flow scheduler (recorded); the components on the recorded sigmas give our sample,
    and the scheduler's own grid, which ends at shift(shift(1/T)), another one."""
    export = _export(tmp_path / "export", tiny_autoencoder, [*CLIP, f"text_encoder.path={clip_folder}", *FLOW])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(export / "diffusers")
    assert not info["exact"] and info["call"] is None and info["unsupported"] == []
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    sigmas = info["reproduce"]["sigmas"]
    assert sigmas[0] == 1.0 and sigmas[-1] == pytest.approx(1e-3) and len(sigmas) == 5
    pipe.scheduler.set_timesteps(5)
    assert float(pipe.scheduler.sigmas[-2]) == pytest.approx(3 * 0.003 / (1 + 2 * 0.003), rel=1e-2)  # shifted twice
    pipe.scheduler.set_timesteps(sigmas=sigmas)
    assert float(pipe.scheduler.sigmas[-2]) == pytest.approx(3e-3 / (1 + 2e-3), rel=1e-4)  # shift(1/1000), ours
    ours, like = _ours(export), _like(pipe, info)
    err = float((ours - like).abs().max())
    assert err < 1e-4, err
    own_grid = _like(pipe, {"reproduce": {k: v for k, v in info["reproduce"].items() if k != "sigmas"}})
    assert float((own_grid - like).abs().max()) > 1e-3


def test_text_mask_is_recorded_and_sample_like_ldm_reproduces_it(tmp_path, tiny_autoencoder):
    """The MiniLM default masks padded tokens: the stock call attends to them (recorded, another image); the
    components with the mask passed to the UNet give our sample."""
    export = _export(tmp_path / "export", tiny_autoencoder, ["text_encoder.max_length=8", "sampling.sampler=ddim"])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(export / "diffusers")
    assert not info["exact"] and info["call"] is None and any("text mask" in d for d in info["differences"])
    assert info["reproduce"]["mask_text"] and type(pipe.text_encoder).__name__ == "BertModel"
    ours, like = _ours(export), _like(pipe, info)
    err = float((ours - like).abs().max())
    assert err < 1e-4, err
    stock = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                 num_inference_steps=5, guidance_scale=3.0, height=16, width=16).images
    assert float((stock - ours).abs().max()) > 1e-3  # the padding changes the stock pipeline's image


def test_penultimate_clip_layer_is_reproduced_by_sample_like_ldm(tmp_path, tiny_autoencoder, clip_folder):
    """clip_skip: the stock pipeline reads the negative prompt at the last layer (recorded); ours reads both prompts at
    the penultimate one through the final norm, and so does sample_like_ldm."""
    export = _export(tmp_path / "export", tiny_autoencoder, [*CLIP, f"text_encoder.path={clip_folder}",
                                                             "text_encoder.layer=penultimate", "sampling.sampler=ddim"])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    assert info["call"] is None and info["reproduce"]["clip_skip"] == 1 and any("clip_skip" in d
                                                                                  for d in info["differences"])
    pipe = diffusers.DiffusionPipeline.from_pretrained(export / "diffusers")
    err = float((_ours(export) - _like(pipe, info)).abs().max())
    assert err < 1e-4, err


def test_processes_without_a_scheduler_export_no_pipeline(tmp_path, tiny_autoencoder):
    export = _export(tmp_path / "export", tiny_autoencoder, ["diffusion.process=vp", "sampling.sampler=ddim"])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    assert info["pipeline"] is None and any("'vp'" in d for d in info["unsupported"])
    assert not (export / "diffusers" / "model_index.json").exists()
    assert (export / "diffusers" / "unet" / "config.json").is_file()  # the UNet and VAE folders are still written


def test_folded_latent_shift_decodes_and_encodes_as_before(tiny_autoencoder):
    import copy

    import autoencoder
    from ldm.export.pipeline_folder import fold_latent_shift

    model = autoencoder.load_pretrained(tiny_autoencoder).eval()
    assert model.shift_factor != 0.0  # the trained emoji autoencoder centres its latents
    folded = fold_latent_shift(copy.deepcopy(model))
    z = torch.randn(2, model.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert folded.shift_factor == 0.0
        torch.testing.assert_close(folded.decode(z), model.decode(z), atol=1e-5, rtol=0)
        torch.testing.assert_close(folded.encode_dist(x).mean, model.encode_dist(x).mean - model.shift_factor,
                                   atol=1e-5, rtol=0)


# PixArt-alpha's layout: a DiT under a T5 encoder that runs, and is attended, under the tokenizer's mask
DIT = ["model.kind=dit", "text_encoder.kind=t5", "text_encoder.max_length=12"]  # T5 masked: PixArt's (the default)
DIT_CASES = {
    "eps-ddim": (["sampling.sampler=ddim"], "DDIMScheduler"),
    "v-ddpm": (["diffusion.prediction=v", "sampling.sampler=ddpm"], "DDPMScheduler"),
}


@pytest.mark.parametrize("case", list(DIT_CASES))
def test_pixart_pipeline_reproduces_our_dit_sample(case, tmp_path, tiny_autoencoder, t5_folder):
    """The DiT's export is a PixArtAlphaPipeline folder: its stock call (T5 and the transformer under the mask, the
    recorded length, no size bins) gives our sample with the same seeds, sampler and guidance."""
    overrides, scheduler = DIT_CASES[case]
    export = _export(tmp_path / "export", tiny_autoencoder, [*DIT, f"text_encoder.path={t5_folder}", *overrides])
    theirs, info, pipe = _stock(export)
    ours = _ours(export)
    assert info["exact"] and info["differences"] == [] and info["scheduler"] == scheduler, info
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and type(pipe.scheduler).__name__ == scheduler
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel" and info["call"]["max_sequence_length"] == 12
    assert ours.shape == theirs.shape == (2, 3, 16, 16) and float(ours.std()) > 0.01
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err
    err_like = float((ours - _like(pipe, info)).abs().max())
    assert err_like < 1e-4, err_like
    _guidance_shows(export, ours, info["call"]["guidance_scale"])


def test_pixart_flow_export_is_reproduced_by_sample_like_ldm(tmp_path, tiny_autoencoder, t5_folder):
    """The flow DiT: PixArtAlphaPipeline cannot step the flow scheduler (recorded); its components on the recorded
    sigmas give our sample. An upper-case prompt is where the stock call would differ (it lower-cases): recorded."""
    export = _export(tmp_path / "export", tiny_autoencoder, [*DIT, f"text_encoder.path={t5_folder}", *FLOW])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(export / "diffusers")
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and info["call"] is None and info["unsupported"] == []
    assert any("init_noise_sigma" in d for d in info["differences"]) and "lower-cases" in info["prompts"]
    ours, like = _ours(export), _like(pipe, info)
    err = float((ours - like).abs().max())
    assert err < 1e-4, err
    stronger = _like(pipe, {"reproduce": {**info["reproduce"], "guidance_scale": 5.0}})
    assert float((stronger - like).abs().max()) > 1e-3  # the text shows in the image


def test_dit_export_without_the_t5_mask_records_why(tmp_path, tiny_autoencoder, t5_folder):
    """SD3's way of reading T5 (no mask) is not PixArt's: neither the stock call nor a reproduction is exact."""
    export = _export(tmp_path / "export", tiny_autoencoder, [*DIT, f"text_encoder.path={t5_folder}",
                                                             "text_encoder.mask_padding=false", "sampling.sampler=ddim"])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    assert not info["exact"] and info["reproduce"] is None
    assert any("mask_padding=false" in d for d in info["unsupported"])


def test_sd3_pipeline_call_reproduces_our_mmdit_sample_on_the_flow(tmp_path, tiny_autoencoder, sd3_folder):
    """The MMDiT under SD3's three encoders exports a StableDiffusion3Pipeline folder; its stock call (our sigmas,
    T5's length) gives our sample on the shifted flow."""
    folder, _ = sd3_folder
    export = _export(tmp_path / "export", tiny_autoencoder, [
        "model.kind=mmdit", "text_encoder.kind=sd3", f"text_encoder.path={folder}",
        f"text_encoder.max_length={CLIP_LENGTH}", f"text_encoder.t5_max_length={T5_LENGTH}", *FLOW])
    theirs, info, pipe = _stock(export)
    ours = _ours(export)
    assert info["exact"] and info["differences"] == [] and info["scheduler"] == "FlowMatchEulerDiscreteScheduler", info
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert [type(pipe.text_encoder_2).__name__, type(pipe.text_encoder_3).__name__] == [
        "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert info["call"]["max_sequence_length"] == T5_LENGTH and len(info["call"]["sigmas"]) == 5
    assert ours.shape == theirs.shape == (2, 3, 16, 16) and float(ours.std()) > 0.01
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err
    _guidance_shows(export, ours, info["call"]["guidance_scale"])


def test_sd3_export_on_the_discrete_chain_claims_no_call(tmp_path, tiny_autoencoder, sd3_folder):
    folder, _ = sd3_folder
    export = _export(tmp_path / "export", tiny_autoencoder, [
        "model.kind=mmdit", "text_encoder.kind=sd3", f"text_encoder.path={folder}",
        f"text_encoder.max_length={CLIP_LENGTH}", f"text_encoder.t5_max_length={T5_LENGTH}", "sampling.sampler=ddim"])
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    assert not info["exact"] and any("written for the rectified flow" in d for d in info["unsupported"])


def test_single_file_checkpoint_loads_in_diffusers_as_the_folder(tmp_path, tiny_autoencoder, clip_folder):
    """sd_checkpoint.safetensors (CompVis layout: UNet, VAE, CLIP) loads through diffusers' from_single_file with the
    export's folder as config: the UNet, VAE and text encoder equal the folder's bit for bit, and the image is ours."""
    from safetensors.torch import load_file

    export = _export(tmp_path / "export", tiny_autoencoder, [*CLIP, f"text_encoder.path={clip_folder}",
                                                             "sampling.sampler=ddim"])
    record = json.loads((export / "export.json").read_text())["single_file"]
    keys = load_file(export / "sd_checkpoint.safetensors").keys()
    assert record["file"] == "sd_checkpoint.safetensors" and "CLIP" in record["text_encoder"]
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and not any("down_blocks" in k for k in keys)
    folder = diffusers.DiffusionPipeline.from_pretrained(export / "diffusers")
    single = diffusers.StableDiffusionPipeline.from_single_file(
        str(export / "sd_checkpoint.safetensors"), config=str(export / "diffusers"), local_files_only=True,
        tokenizer=folder.tokenizer)  # the file holds no tokenizer
    for name in ("unet", "vae", "text_encoder"):
        theirs, ours = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours), name
    info = json.loads((export / "diffusers" / "ldm_pipeline.json").read_text())
    images = single(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                    **info["call"]).images
    err = float((images - _ours(export)).abs().max())
    assert err < 1e-4, err


def test_transformer_exports_write_no_single_file(tmp_path, tiny_autoencoder, t5_folder):
    export = _export(tmp_path / "export", tiny_autoencoder, [*DIT, f"text_encoder.path={t5_folder}",
                                                             "sampling.sampler=ddim"])
    assert not (export / "sd_checkpoint.safetensors").exists()
    assert "single_file" not in json.loads((export / "export.json").read_text())
