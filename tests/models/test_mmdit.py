"""The MMDiT (SD3) against diffusers' SD3Transformer2DModel: outputs and gradients in float64 (square, non-square and
odd latents, one to three blocks, both position conventions), the text mask against diffusers on the unpadded
prompts, the stored position table, diffusers folders both ways, LoRA, checkpointing, validation, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models import MMDIT_PRESETS, MMDiT, load_diffusers_model, load_model_weights, model_preset, save_diffusers

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU

TINY = model_preset("mmdit", "tiny")
F64 = torch.float64
UNUSED = "transformer_blocks.{last}.attn.add_q_proj."  # the pre-only block's text queries: no output reads them


def _pair(dtype: torch.dtype = F64, **overrides) -> tuple[MMDiT, torch.nn.Module]:
    """Our MMDiT and diffusers' with the same random (diffusers-initialised) weights, in eval mode."""
    torch.manual_seed(0)
    ours = MMDiT(**{**TINY, **overrides}).to(dtype).eval()
    ref = diffusers.SD3Transformer2DModel(**ours.to_diffusers_config()).eval()
    ref = ref if dtype == torch.float32 else ref.to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(batch: int, size: tuple[int, int], tokens: int = 6, dtype=F64, seed=0):
    """Latents, fractional timesteps, a context with a padding mask (one row full), the pooled vector."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([tokens] + torch.randint(1, tokens, (batch - 1,), generator=g).tolist())
    return dict(x=torch.randn(batch, 4, *size, generator=g, dtype=dtype),
                t=torch.tensor([0.37, 812.625, 999.0][:batch], dtype=dtype),
                context=torch.randn(batch, tokens, TINY["context_dim"], generator=g, dtype=dtype),
                pooled=torch.randn(batch, TINY["pooled_dim"], generator=g, dtype=dtype),
                mask=torch.arange(tokens)[None, :] < lengths[:, None])


def _reference(ref, x, t, context, pooled):
    return ref(x, context, pooled, timestep=t).sample


CASES = [
    ({}, (8, 8)),
    ({}, (8, 12)),  # non-square
    ({"num_layers": 3, "num_heads": 4}, (6, 10)),
    ({"num_layers": 1}, (8, 8)),  # only the pre-only block
    ({"patch_size": 1, "pos_embed_max_size": 8}, (5, 7)),  # odd sides, positions cropped off-centre
    ({"pos_embed_max_size": None}, (12, 8)),  # no stored table: PixArt's stretched positions
    ({"pos_embed_max_size": 12}, (24, 16)),  # the largest latent the table covers on one side
]


@pytest.mark.parametrize("overrides, size", CASES)
def test_matches_diffusers_in_float64(overrides, size):
    ours, ref = _pair(**overrides)
    inp = _inputs(3, size)
    with torch.no_grad():
        out = ours(inp["x"], inp["t"], inp["context"], pooled=inp["pooled"])
        expected = _reference(ref, inp["x"], inp["t"], inp["context"], inp["pooled"])
    assert out.shape == inp["x"].shape and out.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 3, "patch_size": 1, "pos_embed_max_size": 10}])
def test_gradients_match_diffusers_in_float64(overrides):
    """Every parameter's gradient and the input's; the last block's text-query projection gets none here, and a zero
    gradient in diffusers (its outputs are computed and discarded there)."""
    ours, ref = _pair(**overrides)
    ours.train(), ref.train()
    inp = _inputs(3, (6, 10))
    target = torch.randn_like(inp["x"])
    x_ours, x_ref = inp["x"].clone().requires_grad_(), inp["x"].clone().requires_grad_()
    F.mse_loss(ours(x_ours, inp["t"], inp["context"], pooled=inp["pooled"]), target).backward()
    F.mse_loss(_reference(ref, x_ref, inp["t"], inp["context"], inp["pooled"]), target).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-12, rtol=1e-9)
    theirs = dict(ref.named_parameters())
    unused = UNUSED.format(last=ours.config["num_layers"] - 1)
    for name, p in ours.named_parameters():
        if name.startswith(unused):
            assert p.grad is None and not theirs[name].grad.any(), name
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-12, rtol=1e-9, msg=name)


def test_text_mask_equals_diffusers_on_the_unpadded_prompts():
    """SD3 attends to every text position; with a mask each sample's output is diffusers' on its own tokens only."""
    ours, ref = _pair(num_layers=3)
    inp = _inputs(3, (8, 12))
    mask, context = inp["mask"], inp["context"]
    with torch.no_grad():
        out = ours(inp["x"], inp["t"], context, mask, pooled=inp["pooled"])
        for i in range(3):
            n = int(mask[i].sum())
            one = slice(i, i + 1)
            expected = _reference(ref, inp["x"][one], inp["t"][one], context[one, :n], inp["pooled"][one])
            torch.testing.assert_close(out[one], expected, atol=1e-12, rtol=0)
        garbage = torch.where(mask[..., None], context, 10 * torch.randn_like(context))
        again = ours(inp["x"], inp["t"], garbage, mask, pooled=inp["pooled"])
        torch.testing.assert_close(again, out, atol=1e-12, rtol=0)
        assert (ours(inp["x"], inp["t"], garbage, pooled=inp["pooled"]) - out).abs().max() > 1e-3


def test_float32_matches_diffusers():
    ours, ref = _pair(torch.float32)
    inp = _inputs(3, (8, 12), dtype=torch.float32)
    with torch.no_grad():
        err = (ours(inp["x"], inp["t"], inp["context"], pooled=inp["pooled"])
               - _reference(ref, inp["x"], inp["t"], inp["context"], inp["pooled"])).abs().max()
    assert err < 1e-5, float(err)


def test_position_table_is_computed_checked_and_written_for_diffusers():
    ours, ref = _pair(torch.float32)
    stored = ref.state_dict()["pos_embed.pos_embed"]
    assert "pos_embed.pos_embed" not in ours.state_dict()  # not a trained tensor: no EMA, ZeRO or checkpoint copy
    torch.testing.assert_close(ours.diffusers_state_dict()["pos_embed.pos_embed"], stored, atol=0, rtol=0)
    ref.load_state_dict(ours.diffusers_state_dict(), strict=True)
    bad = {**ref.state_dict(), "pos_embed.pos_embed": stored.flip(1)}
    with pytest.raises(RuntimeError, match="not the 2-D sin-cos table of a 12 x 12 grid"):
        ours.load_state_dict(bad)
    load_model_weights(ours, ref.state_dict())  # with the table
    load_model_weights(ours, ours.state_dict())  # without it (our own files)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # PixArt positions store no table
        MMDiT(**{**TINY, "pos_embed_max_size": None}).load_state_dict(ref.state_dict())


def test_diffusers_folders_both_ways(tmp_path):
    ours, ref = _pair(torch.float32, num_layers=3)
    inp = _inputs(2, (8, 12), dtype=torch.float32)
    with torch.no_grad():
        expected = ours(inp["x"], inp["t"], inp["context"], pooled=inp["pooled"])
        theirs = diffusers.SD3Transformer2DModel.from_pretrained(save_diffusers(ours, tmp_path / "ours")).eval()
        torch.testing.assert_close(_reference(theirs, inp["x"], inp["t"], inp["context"], inp["pooled"]), expected,
                                   atol=0, rtol=0)
        ref.save_pretrained(tmp_path / "theirs")
        again = load_diffusers_model(tmp_path / "theirs").eval()
        assert isinstance(again, MMDiT) and again.config == ours.config
        torch.testing.assert_close(again(inp["x"], inp["t"], inp["context"], pooled=inp["pooled"]), expected,
                                   atol=0, rtol=0)


def test_lora_covers_both_streams_and_merges_into_plain_weights():
    from ldm.models.lora import add_lora, lora_layers, merged_state_dict

    ours, _ = _pair(torch.float32)
    adapted = add_lora(_pair(torch.float32)[0], rank=2, alpha=4.0)
    names = set(lora_layers(adapted))
    assert {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.1.attn.to_q"} <= names
    for layer in lora_layers(adapted).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    plain = MMDiT(**TINY).eval()
    plain.load_state_dict(merged_state_dict(adapted), strict=True)
    inp = _inputs(2, (8, 8), dtype=torch.float32)
    args = (inp["x"], inp["t"], inp["context"], inp["mask"])
    with torch.no_grad():
        out = adapted(*args, pooled=inp["pooled"])
        assert (out - ours(*args, pooled=inp["pooled"])).abs().max() > 1e-3
        torch.testing.assert_close(plain(*args, pooled=inp["pooled"]), out, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = MMDiT(**TINY)
    for p in plain.parameters():  # away from the zero initialisation, so every gradient flows
        torch.nn.init.normal_(p, std=0.1)
    ckpt = MMDiT(**TINY, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    inp = _inputs(2, (8, 12), dtype=torch.float32)
    for model in (plain, ckpt):
        model(inp["x"], inp["t"], inp["context"], inp["mask"], pooled=inp["pooled"]).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is None:
            assert q.grad is None and name.startswith(UNUSED.format(last=1)), name
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


def test_adaln_zero_initialisation_starts_at_zero_output():
    torch.manual_seed(0)
    model = MMDiT(**TINY)
    inp = _inputs(2, (8, 8), dtype=torch.float32)
    assert torch.equal(model(inp["x"], inp["t"], inp["context"], pooled=inp["pooled"]), torch.zeros_like(inp["x"]))
    assert not model.transformer_blocks[0].norm1.linear.weight.any() and model.context_embedder.weight.any()


def test_bad_arguments_fail_with_one_line_naming_them():
    with pytest.raises(ValueError, match="hidden_size=32 is not divisible by num_heads=3"):
        MMDiT(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="pos_embed_max_size=3 patches do not cover sample_size=8"):
        MMDiT(**{**TINY, "pos_embed_max_size": 3})
    with pytest.raises(ValueError, match="SD3.5"):
        MMDiT.from_diffusers_config({"qk_norm": "rms_norm"})
    model = MMDiT(**TINY)
    x, context, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, TINY["context_dim"]), torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"latent shape \(2, 4, 8, 9\): .* patch_size=2"):
        model(torch.randn(2, 4, 8, 9), 1.0, context, pooled=pooled)
    with pytest.raises(ValueError, match="context_dim=32"):
        model(x, 1.0, torch.randn(2, 5, 16), pooled=pooled)
    with pytest.raises(ValueError, match=r"pooled text vector \(2, pooled_dim=32\), got None"):
        model(x, 1.0, context)
    with pytest.raises(ValueError, match=r"pooled_dim=32\), got \(2, 16\)"):
        model(x, 1.0, context, pooled=torch.randn(2, 16))
    with pytest.raises(ValueError, match="13 x 4 patches exceeds pos_embed_max_size=12"):
        model(torch.randn(2, 4, 26, 8), 1.0, context, pooled=pooled)


@pytest.mark.parametrize("name", ["tiny", "emoji-cpu"])
def test_small_presets_run(name):
    model = MMDiT(**model_preset("mmdit", name, in_channels=8))
    x, cfg = torch.randn(2, 8, 8, 8), model.config
    context, pooled = torch.randn(2, 16, cfg["context_dim"]), torch.randn(2, cfg["pooled_dim"])
    out = model(x, torch.tensor([1.0, 2.0]), context, pooled=pooled)
    assert out.shape == x.shape


SD3_MEDIUM_CONFIG = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
    num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
    pos_embed_max_size=192, sample_size=128)


def test_sd3_medium_preset_matches_diffusers_on_meta():
    with torch.device("meta"):
        ours = MMDiT(**MMDIT_PRESETS["sd3-medium"])
        ref = diffusers.SD3Transformer2DModel(**ours.to_diffusers_config())
        published = MMDiT.from_diffusers_config(SD3_MEDIUM_CONFIG)
    expected = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.diffusers_state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 2_028_328_000
    assert published.config == ours.config
