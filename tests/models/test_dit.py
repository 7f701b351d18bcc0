"""The DiT (PixArt-alpha) against diffusers' PixArtTransformer2DModel: outputs and gradients in float64 (square,
non-square and odd latents, the text mask, size conditioning), diffusers folders both ways, LoRA, checkpointing,
validation, and the presets (the published shapes on the meta device)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models import DIT_PRESETS, DiT, load_diffusers_model, load_model_weights, model_preset, save_diffusers

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU

TINY = model_preset("dit", "tiny")
F64 = torch.float64


def _pair(dtype: torch.dtype = F64, **overrides) -> tuple[DiT, torch.nn.Module]:
    """Our DiT and diffusers' with the same random (diffusers-initialised) weights, in eval mode."""
    torch.manual_seed(0)
    ours = DiT(**{**TINY, **overrides}).to(dtype).eval()
    ref = diffusers.PixArtTransformer2DModel(**ours.to_diffusers_config()).eval()
    ref = ref if dtype == torch.float32 else ref.to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(batch: int, size: tuple[int, int], dim: int, tokens: int = 6, channels: int = 4, dtype=F64, seed=0):
    """Latents, fractional timesteps, a context with a padding mask (one row full), micro-conditions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([tokens] + torch.randint(1, tokens, (batch - 1,), generator=g).tolist())
    # (original h, w, crop top, left, target h, w): original and target aspect ratios differ (PixArt reads the target's)
    time_ids = torch.tensor([[512.0, 768.0, 0.0, 0.0, 384.0, 256.0], [1024.0, 1024.0, 16.0, 0.0, 512.0, 768.0],
                             [300.0, 200.0, 0.0, 8.0, 256.0, 256.0]])[:batch]
    return dict(x=torch.randn(batch, channels, *size, generator=g, dtype=dtype),
                t=torch.tensor([0.37, 812.625, 999.0][:batch], dtype=dtype),
                context=torch.randn(batch, tokens, dim, generator=g, dtype=dtype),
                mask=torch.arange(tokens)[None, :] < lengths[:, None], time_ids=time_ids.to(dtype))


def _reference(ref, x, t, context, mask=None, time_ids=None):
    """diffusers' forward; PixArt's size conditions from the micro-conditions as the DiT reads them."""
    added = None
    if time_ids is not None:
        added = {"resolution": time_ids[:, :2], "aspect_ratio": time_ids[:, 4:5] / time_ids[:, 5:6]}
    return ref(x, context, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=added).sample


CASES = [
    ({}, (8, 8), False),
    ({}, (8, 12), True),  # non-square, masked
    ({"patch_size": 1, "num_heads": 2}, (5, 7), True),  # odd sides, one patch per latent pixel
    ({"sample_size": 16, "interpolation_scale": 2.0}, (12, 8), True),  # positions stretched to another base grid
    ({"hidden_size": 48, "size_conditioning": True}, (8, 12), True),  # PixArt's 1024-px size conditioning
    ({"out_channels": 8, "num_layers": 3}, (6, 4), True),  # learned variance (PixArt's published output)
]


@pytest.mark.parametrize("overrides, size, masked", CASES)
def test_matches_diffusers_in_float64(overrides, size, masked):
    ours, ref = _pair(**overrides)
    inp = _inputs(3, size, TINY["context_dim"])
    mask = inp["mask"] if masked else None
    time_ids = inp["time_ids"] if ours.config["size_conditioning"] else None
    with torch.no_grad():
        out = ours(inp["x"], inp["t"], inp["context"], mask, time_ids=time_ids)
        expected = _reference(ref, inp["x"], inp["t"], inp["context"], mask, time_ids)
    assert out.shape == (3, ours.config["out_channels"], *size) and out.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"hidden_size": 48, "size_conditioning": True, "patch_size": 1}])
def test_gradients_match_diffusers_in_float64(overrides):
    """Every parameter's gradient and the input's, non-square latents under the text mask."""
    ours, ref = _pair(**overrides)
    ours.train(), ref.train()
    inp = _inputs(3, (6, 10), TINY["context_dim"])
    time_ids = inp["time_ids"] if ours.config["size_conditioning"] else None
    target = torch.randn(3, 4, 6, 10, dtype=F64)
    x_ours, x_ref = inp["x"].clone().requires_grad_(), inp["x"].clone().requires_grad_()
    F.mse_loss(ours(x_ours, inp["t"], inp["context"], inp["mask"], time_ids=time_ids), target).backward()
    F.mse_loss(_reference(ref, x_ref, inp["t"], inp["context"], inp["mask"], time_ids), target).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-12, rtol=1e-9)
    theirs = dict(ref.named_parameters())
    assert set(theirs) == {n for n, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-12, rtol=1e-9, msg=name)


def test_float32_matches_diffusers():
    ours, ref = _pair(torch.float32)
    inp = _inputs(3, (8, 12), TINY["context_dim"], dtype=torch.float32)
    with torch.no_grad():
        err = (ours(inp["x"], inp["t"], inp["context"], inp["mask"])
               - _reference(ref, inp["x"], inp["t"], inp["context"], inp["mask"])).abs().max()
    assert err < 1e-5, float(err)


def test_text_mask_ignores_padding_and_equals_the_shorter_prompt():
    ours, _ = _pair()
    inp = _inputs(3, (8, 8), TINY["context_dim"])
    mask, context = inp["mask"], inp["context"]
    garbage = torch.where(mask[..., None], context, 10 * torch.randn_like(context))
    with torch.no_grad():
        out = ours(inp["x"], inp["t"], context, mask)
        torch.testing.assert_close(ours(inp["x"], inp["t"], garbage, mask), out, atol=1e-12, rtol=0)
        n = int(mask[1].sum())  # sample 1 alone, its padding cut off instead of masked
        torch.testing.assert_close(ours(inp["x"][1:2], inp["t"][1:2], context[1:2, :n]), out[1:2], atol=1e-12, rtol=0)
        assert (ours(inp["x"], inp["t"], garbage) - out).abs().max() > 1e-3  # without the mask padding matters
        # pooled (given by some text encoders) is not read by the DiT
        torch.testing.assert_close(ours(inp["x"], inp["t"], context, mask, pooled=torch.randn(3, 5, dtype=F64)), out)


def test_diffusers_folders_both_ways(tmp_path):
    ours, ref = _pair(torch.float32, size_conditioning=True, hidden_size=48)
    inp = _inputs(2, (8, 12), TINY["context_dim"], dtype=torch.float32)
    args = (inp["x"], inp["t"], inp["context"], inp["mask"])
    with torch.no_grad():
        expected = ours(*args, time_ids=inp["time_ids"])
        theirs = diffusers.PixArtTransformer2DModel.from_pretrained(save_diffusers(ours, tmp_path / "ours")).eval()
        torch.testing.assert_close(_reference(theirs, *args, inp["time_ids"]), expected, atol=0, rtol=0)
        ref.save_pretrained(tmp_path / "theirs")
        again = load_diffusers_model(tmp_path / "theirs").eval()
        assert isinstance(again, DiT) and again.config == ours.config
        torch.testing.assert_close(again(*args, time_ids=inp["time_ids"]), expected, atol=0, rtol=0)
    wrong = DiT(**{**ours.config, "num_layers": 1})
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer_blocks\.1\."):
        load_model_weights(wrong, tmp_path / "theirs" / "diffusion_pytorch_model.safetensors")


def test_lora_on_the_dit_merges_into_plain_weights():
    from ldm.models.lora import add_lora, lora_layers, merged_state_dict

    ours, _ = _pair(torch.float32)
    plain = DiT(**TINY).eval()
    adapted = add_lora(_pair(torch.float32)[0], rank=2, alpha=4.0)
    for layer in lora_layers(adapted).values():  # non-zero updates (peft starts B at zero)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(adapted)} >= {"to_q", "to_k", "to_v", "0"}
    assert all(".lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    plain.load_state_dict(merged_state_dict(adapted), strict=True)
    inp = _inputs(2, (8, 8), TINY["context_dim"], dtype=torch.float32)
    with torch.no_grad():
        out = adapted(inp["x"], inp["t"], inp["context"], inp["mask"])
        assert (out - ours(inp["x"], inp["t"], inp["context"], inp["mask"])).abs().max() > 1e-3
        torch.testing.assert_close(plain(inp["x"], inp["t"], inp["context"], inp["mask"]), out, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = DiT(**TINY)
    for p in plain.parameters():  # away from the zero initialisation, so every gradient flows
        torch.nn.init.normal_(p, std=0.1)
    ckpt = DiT(**TINY, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    inp = _inputs(2, (8, 12), TINY["context_dim"], dtype=torch.float32)
    for model in (plain, ckpt):
        model(inp["x"], inp["t"], inp["context"], inp["mask"]).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


def test_pixart_initialisation_starts_at_zero_output():
    torch.manual_seed(0)
    model = DiT(**TINY)
    inp = _inputs(2, (8, 8), TINY["context_dim"], dtype=torch.float32)
    assert torch.equal(model(inp["x"], inp["t"], inp["context"]), torch.zeros_like(inp["x"]))
    assert all(not b.attn2.to_out[0].weight.any() for b in model.transformer_blocks)
    assert model.adaln_single.linear.weight.std() < 0.03 and model.transformer_blocks[0].attn1.to_q.weight.any()


def test_bad_arguments_fail_with_one_line_naming_them():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        DiT(**{**TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="multiple of 4"):
        DiT(**{**TINY, "hidden_size": 30, "num_heads": 3})
    with pytest.raises(ValueError, match="multiple of 3 with size_conditioning"):
        DiT(**{**TINY, "size_conditioning": True})
    with pytest.raises(ValueError, match="sample_size=9 is not a multiple of patch_size=2"):
        DiT(**{**TINY, "sample_size": 9})
    model = DiT(**TINY)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, TINY["context_dim"])
    with pytest.raises(ValueError, match=r"latent shape \(2, 4, 7, 8\): .* patch_size=2"):
        model(torch.randn(2, 4, 7, 8), 1.0, context)
    with pytest.raises(ValueError, match="context_dim=32"):
        model(x, 1.0, torch.randn(2, 5, 48))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.zeros(3), context)
    with pytest.raises(ValueError, match="needs time_ids"):
        DiT(**{**TINY, "hidden_size": 48, "size_conditioning": True})(x, 1.0, context)


@pytest.mark.parametrize("name", ["tiny", "emoji-cpu"])
def test_small_presets_run(name):
    model = DiT(**model_preset("dit", name, in_channels=8))
    x = torch.randn(2, 8, 8, 8)
    assert model(x, torch.tensor([1.0, 2.0]), torch.randn(2, 16, model.config["context_dim"])).shape == x.shape


PIXART_CONFIG = dict(  # PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json, the shape-defining entries
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, caption_channels=4096,
    cross_attention_dim=1152, in_channels=4, norm_elementwise_affine=False, norm_eps=1e-6,
    norm_type="ada_norm_single", num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8,
    patch_size=2, sample_size=128, use_additional_conditions=None, interpolation_scale=None)


@pytest.mark.parametrize("name, params, config", [
    ("pixart-xl-2-512", 610_856_096, {**PIXART_CONFIG, "sample_size": 64}),
    ("pixart-xl-2-1024", 611_349_152, PIXART_CONFIG),
])
def test_published_presets_match_diffusers_on_meta(name, params, config):
    with torch.device("meta"):
        ours = DiT(**DIT_PRESETS[name])
        ref = diffusers.PixArtTransformer2DModel(**ours.to_diffusers_config())
        published = DiT.from_diffusers_config(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == params
    assert published.config == ours.config  # diffusers' defaults resolved as diffusers resolves them
