"""The fast CUDA path where only a GPU exercises it: SDPA's flash and memory-efficient kernels take our attention
(the text mask included), a training micro-step synchronises the host once (the non-finite check), the frozen parts
run in bf16 by default, TF32 takes effect, the compiled UNet trains like the eager one, pinned batches."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT
from tests.gpu.conftest import CONFIG, DEVICE, IMAGE_SIZE, needs_gpu

pytestmark = needs_gpu
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA kernels and CUDA synchronisation")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


@cuda_only
def test_sdpa_fast_kernels_take_our_attention():
    """SD 1.5's first level in bf16: cross-attention with padded text on the memory-efficient kernel alone, self-
    attention on flash alone (each raises "no available kernel" if its inputs do not qualify); both equal the math
    kernel within bf16 rounding, and a masked UNet trains with the math kernel switched off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.models import UNet, unet_preset
    from ldm.models.attention import Attention

    torch.manual_seed(0)
    cross = Attention(320, 8, 40, context_dim=768).to(DEVICE, torch.bfloat16)
    self_attn = Attention(320, 8, 40).to(DEVICE, torch.bfloat16)
    x = torch.randn(4, 1024, 320, device=DEVICE, dtype=torch.bfloat16)  # (B, N, C): 32x32 latents
    context = torch.randn(4, 77, 768, device=DEVICE, dtype=torch.bfloat16)  # (B, L, D)
    mask = torch.arange(77, device=DEVICE)[None, :] < torch.tensor([5, 17, 77, 30], device=DEVICE)[:, None]  # (B, L)
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):
            ref_cross, ref_self = cross(x, context, mask), self_attn(x)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            fast_cross = cross(x, context, mask)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fast_self = self_attn(x)
    assert rel_err(fast_cross, ref_cross) < 1e-2 and rel_err(fast_self, ref_self) < 1e-2
    unet = UNet(**unet_preset("tiny")).to(DEVICE, torch.bfloat16)
    ctx = torch.randn(4, 8, unet.config["context_dim"], device=DEVICE, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = unet(torch.randn(4, 4, 16, 16, device=DEVICE, dtype=torch.bfloat16), torch.rand(4, device=DEVICE) * 999,
                   ctx, mask[:, :8])
        out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())


def make_trainer(assets, out: Path, *extra: str):
    from bench.offline_assets import training_overrides
    from ldm.config import LDMConfig, load_config
    from ldm.train.trainer import Trainer

    return Trainer(load_config(LDMConfig, CONFIG, training_overrides(
        assets["shards"], assets["autoencoder"], assets["text_encoder"], out, IMAGE_SIZE, f"run.device={DEVICE}",
        *extra)))


@cuda_only
def test_a_micro_step_waits_for_the_gpu_once(assets, tmp_path):
    """CUDA's sync debug mode reports every operation that makes the host wait for the GPU. In a ZeRO-2 bf16
    micro-step (captions already encoded, as after the first epoch) our code has exactly one: reading the agreed
    non-finite flag. The loss stays on the GPU."""
    from ldm.data import make_loader, resolve_shards

    trainer = make_trainer(assets, tmp_path / "run", "train.precision=bf16", "train.zero_stage=2")
    for batch in make_loader(resolve_shards(str(assets["shards"])), batch_size=16, image_size=IMAGE_SIZE):
        trainer.parts.text_encoder(batch["caption"])  # the memo holds every caption
    stream = trainer._batches()
    for _ in range(3):
        trainer.micro_step(next(stream))  # warm-up: allocator pools, pinned buffers, cuBLAS handles
    batch = next(stream)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = trainer.micro_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [(Path(w.filename).resolve(), w.lineno) for w in caught if "synchroniz" in str(w.message)]
    ours = [(str(f.relative_to(ROOT.resolve())), n) for f, n in syncs if f.is_relative_to(ROOT.resolve() / "ldm")]
    assert [f for f, _ in ours] == ["ldm/train/distributed.py"], (ours, syncs)  # any_across_ranks: bool(flag)
    assert isinstance(loss, torch.Tensor) and loss.device.type == "cuda"


@cuda_only
def test_frozen_parts_run_in_bf16_on_cuda_by_default(assets, tmp_path):
    from bench.offline_assets import training_overrides
    from ldm.assemble import assemble
    from ldm.config import LDMConfig, load_config

    def parts(*extra):
        return assemble(load_config(LDMConfig, CONFIG, training_overrides(
            assets["shards"], assets["autoencoder"], assets["text_encoder"], tmp_path, IMAGE_SIZE, *extra)), DEVICE)

    fast, full = parts(), parts("train.frozen_dtype=fp32")
    assert fast.autoencoder.autocast_dtype is torch.bfloat16 and fast.text_encoder.encoder.autocast_dtype is torch.bfloat16
    seen = []
    fast.autoencoder.encoder.conv_in.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE) * 2 - 1
    z, z32 = fast.autoencoder.encode(images), full.autoencoder.encode(images)
    assert seen == [torch.bfloat16] and z.dtype == torch.float32 and rel_err(z, z32) < 0.05
    prompts = ["red circle", "blue square on green"]
    c, c32 = fast.text_encoder(prompts)["context"], full.text_encoder(prompts)["context"]
    assert c.dtype == torch.float32 and rel_err(c, c32) < 0.05


@cuda_only
def test_tf32_is_on_for_fp32_runs():
    """With TF32 an fp32 matmul keeps ~10 mantissa bits (error ~1e-3 of the float64 product), without it ~1e-6."""
    from ldm.config import TrainConfig
    from ldm.train.engine import tf32_for

    a, b = torch.randn(512, 512, device=DEVICE), torch.randn(512, 512, device=DEVICE)
    exact = a.double() @ b.double()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        full = rel_err(a @ b, exact)
        assert tf32_for(TrainConfig(precision="fp32"), DEVICE)
        tf32 = rel_err(a @ b, exact)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert full < 1e-5 < 1e-4 < tf32 < 1e-2, (full, tf32)


def printed_losses(assets, out, *extra) -> dict[int, float]:
    from tests.gpu.test_gpu_training import train

    return train(assets, out, "train.precision=bf16", "train.zero_stage=2", "train.max_steps=4",
                 "train.log_every=4", "train.ckpt_every=4", *extra)


@cuda_only
def test_compiled_training_follows_eager(assets, tmp_path):
    """ZeRO-2 bf16, the whole UNet compiled with inductor: step 1 within bf16 rounding of eager (same weights and
    data), the mean loss of steps 2-4 within 5 %."""
    eager = printed_losses(assets, tmp_path / "eager")
    compiled = printed_losses(assets, tmp_path / "compiled", "train.compile=model")
    assert set(eager) == set(compiled) == {1, 4}, (eager, compiled)
    assert compiled[1] == pytest.approx(eager[1], rel=0.02) and compiled[4] == pytest.approx(eager[4], rel=0.05)


@cuda_only
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches(assets, workers):
    from ldm.data import make_loader, resolve_shards

    urls = resolve_shards(str(assets["shards"]))
    args = dict(batch_size=4, image_size=IMAGE_SIZE, seed=1, num_workers=workers, batches_per_epoch=3)
    pinned, plain = list(make_loader(urls, pin_memory=True, **args)), list(make_loader(urls, **args))
    assert all(b["image"].is_pinned() for b in pinned) and not any(b["image"].is_pinned() for b in plain)
    assert all(torch.equal(a["image"], b["image"]) and a["key"] == b["key"] for a, b in zip(pinned, plain))
    on_gpu = pinned[0]["image"].to(DEVICE, non_blocking=True)
    assert torch.equal(on_gpu.cpu(), plain[0]["image"])


def test_channels_last_unet_equals_contiguous_in_bf16():
    from ldm.models import UNet, unet_preset
    from ldm.train.engine import use_channels_last

    torch.manual_seed(0)
    plain = UNet(**unet_preset("tiny")).to(DEVICE, torch.bfloat16)
    fast = UNet(**unet_preset("tiny")).to(DEVICE, torch.bfloat16)
    fast.load_state_dict(plain.state_dict())
    use_channels_last(fast)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g).to(DEVICE, torch.bfloat16)
    t, ctx = torch.rand(4, generator=g).to(DEVICE) * 999, torch.randn(4, 8, 32, generator=g).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        out, ref = fast(x, t, ctx).float(), plain(x, t, ctx).float()
    assert rel_err(out, ref) < 2e-2, rel_err(out, ref)  # convolution algorithms differ per layout: bf16 rounding
    assert F.mse_loss(out, ref) < 1e-3
