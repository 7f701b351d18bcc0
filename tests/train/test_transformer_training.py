"""``model.kind: dit | mmdit`` through the real trainer: a transformer trains under DeepSpeed on the tiny emoji shards
(rectified flow, logit-normal times), checkpoints, resumes from its checkpoint (the DiT: only the remaining steps),
exports, and the export samples through the same pipeline as the UNet's; its weights are diffusers' model's, loaded
by diffusers. Bad model sections fail at start with one line naming the key (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, resumed_line, tiny_ldm_overrides

FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity", "diffusion.time_sampling=logit_normal",
        "sampling.sampler=euler_ode", "sampling.steps=2"]
KINDS = {"dit": [], "mmdit": ["text_encoder.pooled=true"]}


def _args(kind: str, shards, autoencoder, out, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/ldm/emoji.yaml"), *tiny_ldm_overrides(shards, autoencoder, out, None),
            f"model.kind={kind}", "model.preset=tiny", *FLOW, *KINDS[kind], *extra]


@pytest.mark.parametrize("kind", KINDS)
def test_a_transformer_trains_resumes_exports_and_samples(kind, tmp_path, tiny_shards, tiny_autoencoder,
                                                          trained_steps, capsys):
    from ldm.assemble import load_exported
    from ldm.cli.train import main as train_main
    from ldm.models import DiT, MMDiT

    out = tmp_path / "run"
    if kind == "dit":  # the resume path is the UNet's; once for the transformers
        assert train_main(_args(kind, tiny_shards, tiny_autoencoder, out, "train.max_steps=2")) == 0
        trained_steps.clear()
        capsys.readouterr()
    assert train_main(_args(kind, tiny_shards, tiny_autoencoder, out)) == 0  # dit: resumes at step 2, trains 3-4
    if kind == "dit":
        assert resumed_line(out / "checkpoints", 2) in capsys.readouterr().out
        assert trained_steps == [3, 4]

    pipe, cfg = load_exported(out / "export")
    assert cfg.model.kind == kind and isinstance(pipe.unet, {"dit": DiT, "mmdit": MMDiT}[kind])
    assert pipe.unet.config["sample_size"] == 8 and pipe.unet.config["context_dim"] == 384  # 8x8 latents, MiniLM
    images = pipe(["red apple", "dog face"], seeds=[0, 1], sampler="euler_ode", steps=2, guidance=3.0)
    again = pipe(["red apple", "dog face"], seeds=[0, 1], sampler="euler_ode", steps=2, guidance=3.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and torch.equal(images, again)

    info = json.loads((out / "export" / "diffusers" / "ldm_pipeline.json").read_text())
    # no stock pipeline loads this export: PixArt's calls T5 and SD3's its three encoders (MiniLM here;
    # tests/test_export_pipeline.py exports a DiT under T5 and an MMDiT under SD3's encoders)
    why = {"dit": "PixArtAlphaPipeline loads one T5 encoder", "mmdit": "StableDiffusion3Pipeline loads SD3's"}[kind]
    assert info["pipeline"] is None and any(why in d for d in info["unsupported"]), info
    import diffusers

    cls = {"dit": diffusers.PixArtTransformer2DModel, "mmdit": diffusers.SD3Transformer2DModel}[kind]
    theirs = cls.from_pretrained(out / "export" / "diffusers" / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100.0, 700.0])
    context, pooled = torch.randn(2, 8, 384, generator=g), torch.randn(2, 384, generator=g)
    with torch.no_grad():
        if kind == "dit":
            ours = pipe.unet(x, t, context)
            ref = theirs(x, context, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        else:
            ours = pipe.unet(x, t, context, pooled=pooled)
            ref = theirs(x, context, pooled, timestep=t).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["model.kind=dit", "model.patch_size=3"], "model.patch_size: 3 does not divide the latent side 8"),
    (["model.kind=dit", "model.num_heads=5"], "model.num_heads: 5 heads do not divide model.hidden_size 32"),
    (["model.kind=dit", "model.block_out_channels=[8, 16]"], "model.block_out_channels: not a key of model.kind 'dit'"),
    (["model.kind=mmdit", "model.preset=sd15"], "model.preset: unknown preset 'sd15' for model.kind 'mmdit'"),
    (["model.kind=mmdit"], "model.kind: the MMDiT embeds a pooled text vector, and the text encoder gives none"),
    (["model.kind=vit"], "model.kind"),
])
def test_bad_model_sections_fail_at_start(extra, message, tmp_path, tiny_shards, tiny_autoencoder, capsys):
    from ldm.cli.train import main as train_main

    args = ["--config", str(ROOT / "configs/ldm/emoji.yaml"),
            *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None), "model.preset=tiny", *extra]
    try:
        rc = train_main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert message in err and err.count("\n") <= 2, err[-2000:]  # one line (and no traceback)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_bad_section_exits_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldm.cli.train", "model.kind=dit", "model.hidden_size=0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "model.hidden_size: must be >= 1, got 0" in proc.stderr, proc.stderr[-2000:]
