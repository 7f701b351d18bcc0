"""The UNet against diffusers' UNet2DConditionModel, masking, checkpointing and presets (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch

from ldm.models import UNET_PRESETS, UNet, unet_preset

diffusers = pytest.importorskip("diffusers")

TINY = unet_preset("tiny")


def _pair(**overrides) -> tuple[UNet, torch.nn.Module]:
    """Our UNet and a diffusers UNet with the same random weights, both in eval mode."""
    torch.manual_seed(0)
    ours = UNet(**{**TINY, **overrides}).eval()
    ref = diffusers.UNet2DConditionModel(**ours.to_diffusers_config()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, (8, 8)),
        ({"use_linear_projection": True, "head_dim": 16, "num_heads": None}, (8, 12)),
        ({"cross_attention": (False, True), "layers_per_block": 2, "transformer_depth": 2}, (7, 5)),
        ({"block_out_channels": (16, 32, 32), "cross_attention": (True, True, False), "num_heads": (2, 4, 4)}, (9, 6)),
    ],
)
def test_matches_diffusers(overrides, size):
    ours, ref = _pair(**overrides)
    x = torch.randn(2, 4, *size)  # (B, C, H, W)
    t = torch.tensor([0.37, 812.625])  # fractional, as continuous-time solvers pass them
    context = torch.randn(2, 5, TINY["context_dim"])  # (B, L, D)
    with torch.no_grad():
        out = ours(x, t, context)
        expected = ref(x, t, context).sample
        assert out.shape == x.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        # Scalar timesteps (float and int) broadcast over the batch.
        torch.testing.assert_close(ours(x, 17.5, context), ref(x, 17.5, context).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x, torch.tensor(3), context), ref(x, 3, context).sample, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("overrides", [{}, {"use_linear_projection": True, "head_dim": 16, "num_heads": None}])
def test_gradients_match_diffusers(overrides):
    """Backward too: our split GEGLU projection and token-wise 1x1 projections give diffusers' gradients for
    every parameter and for the input."""
    ours, ref = _pair(**overrides)
    ours.train(), ref.train()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([1.5, 500.0, 999.0])
    context = torch.randn(3, 6, TINY["context_dim"])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    target = torch.randn_like(x)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.nn.functional.mse_loss(ours(x_ours, t, context, mask), target).backward()
    torch.nn.functional.mse_loss(ref(x_ref, t, context, encoder_attention_mask=mask).sample, target).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-6, rtol=1e-4)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_context_mask_matches_diffusers_and_ignores_padding():
    ours, ref = _pair()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([1.5, 500.0, 999.0])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    context = torch.randn(3, 6, TINY["context_dim"])
    garbage = torch.where(mask[..., None], context, 10 * torch.randn_like(context))  # new padded values
    with torch.no_grad():
        out = ours(x, t, context, mask)
        torch.testing.assert_close(out, ref(x, t, context, encoder_attention_mask=mask).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x, t, garbage, mask), out, atol=1e-6, rtol=0)
        # The first sample sees only 3 tokens: same as a 3-token context without a mask.
        torch.testing.assert_close(ours(x[:1], t[:1], context[:1, :3]), out[:1], atol=1e-5, rtol=0)
        # Without the mask the padding does change the output.
        assert (ours(x, t, garbage) - out).abs().max() > 1e-3


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = UNet(**TINY)
    ckpt = UNet(**TINY, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.5]), torch.randn(2, 5, TINY["context_dim"])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for model in (plain, ckpt):
        model(x, t, context, mask).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


def test_rejects_ambiguous_heads_and_bad_shapes():
    with pytest.raises(ValueError, match="num_heads or head_dim"):
        UNet(**{**TINY, "head_dim": 8})
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNet(**{**TINY, "block_out_channels": (36, 64)})
    with pytest.raises(ValueError, match="cross_attention"):
        UNet(**{**TINY, "cross_attention": (True,)})
    with pytest.raises(ValueError, match="shape"):
        UNet(**TINY)(torch.randn(2, 4, 8, 8), torch.zeros(3), torch.randn(2, 5, TINY["context_dim"]))


def test_diffusers_config_round_trip():
    ours = UNet(**{**TINY, "head_dim": 16, "num_heads": None, "use_linear_projection": True})
    again = UNet.from_diffusers_config(ours.to_diffusers_config())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert again.heads_per_level == ours.heads_per_level == (2, 4)


@pytest.mark.parametrize("name", ["tiny", "emoji-cpu"])
def test_small_presets_run(name):
    model = UNet(**UNET_PRESETS[name])
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([1.0, 2.0]), torch.randn(2, 16, model.config["context_dim"]))
    assert out.shape == x.shape


@pytest.mark.parametrize("name, params", [("sd15", 859_520_964), ("sd2", 865_910_724)])
def test_large_presets_match_diffusers_shapes_on_meta(name, params):
    with torch.device("meta"):
        ours = UNet(**UNET_PRESETS[name])
        ref = diffusers.UNet2DConditionModel(**ours.to_diffusers_config())
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == params


def test_padding_no_sample_attends_to_is_dropped_exactly():
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0])
    context = torch.randn(2, 7, TINY["context_dim"])
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = model(x, t, context, mask)
        shorter = model(x, t, context[:, :4], mask[:, :4])  # columns 4-6 are padding in every row
        torch.testing.assert_close(out, shorter, atol=1e-6, rtol=0)
        full = torch.ones(2, 7, dtype=torch.bool)  # a mask that masks nothing is no mask
        torch.testing.assert_close(model(x, t, context, full), model(x, t, context), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(4, 6), (8, 8), (5, 7), (9, 6)])
def test_upsample_conv_equals_nearest_upsampling_then_conv(size):
    """The transposed-convolution form of nearest x2 + 3x3 conv: outputs and all gradients in float64 (odd
    skip sizes take the explicit path), and within bf16 rounding for bf16 weights and inputs."""
    from ldm.models.blocks import UpsampleConv

    torch.manual_seed(0)
    conv = UpsampleConv(6).double()
    h, w = size[0] // 2 + size[0] % 2, size[1] // 2 + size[1] % 2  # the decoder's input for this skip size
    x = torch.randn(2, 6, h, w, dtype=torch.float64, requires_grad=True)
    out = conv(x, size)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    up = torch.nn.functional.interpolate(x, size=size, mode="nearest")
    expected = torch.nn.functional.conv2d(up, conv.weight, conv.bias, padding=1)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias))
    assert out.shape == (2, 6, *size)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-12)
    bf16 = UpsampleConv(6).to(torch.bfloat16)
    bf16.load_state_dict(conv.state_dict())
    torch.testing.assert_close(bf16(x.detach().bfloat16(), size).double(), expected.detach(), atol=0.1, rtol=0.03)


def test_padding_kept_where_reading_the_mask_would_sync_gives_the_same_output(monkeypatch):
    """On a GPU and under torch.compile drop_padding passes the mask on without reading it: the padded keys then get
    zero weight, the output is the dropped one. SDPA gets the mask as a (B, 1, 1, L) boolean (no (B, h, N, L) copy)."""
    import torch.nn.functional as F

    from ldm.models.unet import drop_padding

    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0])
    context = torch.randn(2, 7, TINY["context_dim"])
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    full = torch.ones(2, 7, dtype=torch.bool)
    masks, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        dropped, unmasked = model(x, t, context, mask), model(x, t, context, full)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the path a GPU mask takes
        masks.clear()
        assert drop_padding(context, mask) == (context, mask)
        kept = model(x, t, context, mask)
        torch.testing.assert_close(kept, dropped, atol=1e-6, rtol=0)
        assert set(masks) == {None, ((2, 1, 1, 7), torch.bool)}  # self-attention unmasked, cross-attention masked
        torch.testing.assert_close(model(x, t, context, full), unmasked, atol=1e-6, rtol=0)
