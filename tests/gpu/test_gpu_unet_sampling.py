"""The UNet compiled and eager in bf16 on the GPU agree within bf16 rounding; sampling on the GPU gives the
images sampling on the CPU gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.conftest import CONFIG, DEVICE, IMAGE_SIZE, needs_gpu

pytestmark = needs_gpu


def unet_inputs(batch: int, context_dim: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(8)[None, :] < torch.randint(2, 9, (batch,), generator=g)[:, None]  # (B, L) padded captions
    return {"x": torch.randn(batch, 4, 16, 16, generator=g).to(device),  # (B, 4, 16, 16)
            "t": torch.randint(0, 1000, (batch,), generator=g).float().to(device),  # (B,)
            "context": torch.randn(batch, 8, context_dim, generator=g).to(device),  # (B, L, D)
            "mask": mask.to(device)}


def forward_backward(model, inp) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (fp32) and the gradient of a fixed loss with respect to the input latents."""
    x = inp["x"].clone().requires_grad_(True)
    out = model(x, inp["t"], inp["context"], inp["mask"]).float()
    F.mse_loss(out, torch.zeros_like(out)).backward()
    return out.detach(), x.grad.detach().float()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@pytest.mark.skipif(DEVICE == "cpu", reason="inductor's C++ code generation for the UNet takes 457 s on 2 CPU cores "
                    "(measured); on the CPU tests/train/test_fast_path.py checks compiled training with aot_eager")
def test_compiled_unet_equals_eager_within_bf16_rounding():
    """Compiled and eager bf16 are each compared with fp32 (the same weights): compiling may change the
    order of the bf16 arithmetic but must not make it less accurate than eager bf16 (at most 1.5x its error,
    plus 2^-8 for outputs that fuse away a rounding), and eager bf16 itself is within 5 % of fp32 on the output
    and 10 % on the input gradient (which carries the bf16 rounding of every layer on the way back)."""
    from ldm.models import UNet, unet_preset

    torch.manual_seed(0)
    ref = UNet(**unet_preset("tiny")).to(DEVICE)
    inp = unet_inputs(4, ref.config["context_dim"], DEVICE)
    out32, grad32 = forward_backward(ref, inp)
    eager = UNet(**unet_preset("tiny")).to(DEVICE, torch.bfloat16)
    eager.load_state_dict(ref.state_dict())
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inp.items()}
    out_eager, grad_eager = forward_backward(eager, bf16)
    compiled = torch.compile(eager)
    out_comp, grad_comp = forward_backward(compiled, bf16)
    for name, eag, comp, full, bound in (("output", out_eager, out_comp, out32, 0.05),
                                         ("grad", grad_eager, grad_comp, grad32, 0.10)):
        e, c = rel_err(eag, full), rel_err(comp, full)
        assert e < bound, (name, e)
        assert c <= 1.5 * e + 2**-8, (name, c, e)
        assert rel_err(comp, eag) <= 3 * e + 2**-8, (name, rel_err(comp, eag), e)


@pytest.fixture(scope="module")
def exported(assets, tmp_path_factory):
    from bench.offline_assets import training_overrides
    from ldm.cli.train import main

    out = tmp_path_factory.mktemp("sample_run") / "run"
    rc = main(["--config", CONFIG, *training_overrides(assets["shards"], assets["autoencoder"], assets["text_encoder"],
                                                       out, IMAGE_SIZE, f"run.device={DEVICE}", "train.max_steps=8",
                                                       "train.ckpt_every=8", "train.frozen_dtype=fp32")])
    assert rc == 0
    return out / "export"


@pytest.fixture
def no_tf32():
    """Full fp32 on the GPU (cuDNN convolutions default to TF32): the comparison is of code paths, not of
    TF32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_on_the_gpu_equals_the_cpu(exported, sampler, no_tf32):
    """Same exported weights, prompts and seeds (noise drawn on the CPU): images within 2e-3 on average and
    3e-2 per pixel (reduction order on the GPU; values in [0, 1])."""
    from ldm.assemble import load_exported

    prompts, seeds = ["red circle", "blue square", "green triangle"], [0, 1, 2]
    images = {}
    for device in ("cpu", DEVICE):
        pipe, _ = load_exported(exported, device=device)
        images[device] = pipe(prompts, seeds=seeds, sampler=sampler, steps=10, guidance=3.0).cpu()
    diff = (images["cpu"] - images[DEVICE]).abs()
    assert images["cpu"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float(diff.mean()) < 2e-3 and float(diff.max()) < 3e-2, (float(diff.mean()), float(diff.max()))
    assert float(images["cpu"].std()) > 0.01  # not a blank image compared with a blank image


def test_sampling_with_bf16_frozen_parts_stays_close(exported, no_tf32):
    """The export above samples with fp32 frozen parts (train.frozen_dtype=fp32, so the GPU-CPU comparison is of code
    paths); the default on CUDA runs the text encoder and the decoder under bf16 autocast: images within 2e-2 on
    average of the fp32 ones."""
    from ldm.assemble import load_exported
    from ldm.precision import autocast_frozen

    prompts, seeds = ["red circle", "blue square", "green triangle"], [0, 1, 2]
    pipe, _ = load_exported(exported, device=DEVICE)
    full = pipe(prompts, seeds=seeds, sampler="ddim", steps=10, guidance=3.0).cpu()
    autocast_frozen(pipe.autoencoder, torch.bfloat16, ("decode",))
    autocast_frozen(pipe.text_encoder.encoder, torch.bfloat16)
    pipe.text_encoder._memo.clear()
    fast = pipe(prompts, seeds=seeds, sampler="ddim", steps=10, guidance=3.0).cpu()
    diff = (fast - full).abs()
    assert 0 < float(diff.mean()) < 2e-2, float(diff.mean())
