"""The fast CUDA path, checked on the CPU (the same code, the device chosen at run time): compiled and eager UNets agree,
channels-last equals contiguous, TF32 and the frozen parts' autocast resolve per device, the frozen parts do run
under autocast, and a compiled channels-last training run follows the eager one step for step without reading its
loss on the host before the collective.

torch.compile runs with backend "aot_eager": Dynamo's graph capture and AOT autograd's joint forward/backward graph,
run with eager kernels. Inductor's C++ code generation takes over 4 minutes for the tiny UNet on this CPU; the GPU
tests (tests/gpu) run inductor on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import ldm.train.trainer as trainer_mod
from ldm.config import LDMConfig, TrainConfig, load_config
from ldm.models import UNet, unet_preset
from ldm.train.engine import tf32_for, use_channels_last
from tests.conftest import ROOT, tiny_ldm_overrides

TINY = unet_preset("tiny")
pytestmark = pytest.mark.usefixtures("one_thread")


def unet_pair() -> tuple[UNet, UNet]:
    torch.manual_seed(0)
    a, b = UNet(**TINY), UNet(**TINY)
    b.load_state_dict(a.state_dict())
    return a, b


def unet_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)  # (B, L)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.tensor([1.5, 500.0, 999.0]),
            torch.randn(3, 6, TINY["context_dim"], generator=g), mask)


def forward_backward(model: torch.nn.Module, x, t, context, mask):
    """Output, input gradient and parameter gradients of a fixed loss."""
    x = x.clone().requires_grad_(True)
    out = model(x, t, context, mask)
    (out.square().mean() + out[:, 0].mean()).backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_same(got, ref, atol: float) -> None:
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=atol, rtol=1e-4)
    for name, grad in ref[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("how", ["regional", "model"])
def test_compiled_unet_equals_eager(how):
    """fullgraph=True: the whole UNet (or each block) is one graph, so the masked text padding no longer breaks it."""
    eager, compiled = unet_pair()
    if how == "regional":
        blocks = compiled.compile_blocks(backend="aot_eager", fullgraph=True)
        assert blocks == 8 + 7  # ResNet blocks: 2 down, 2 middle, 4 up; a transformer block after 2 + 1 + 4 of them
        assert sorted(compiled.state_dict()) == sorted(eager.state_dict())  # names unchanged
    else:
        compiled.compile(backend="aot_eager", fullgraph=True)
    inputs = unet_inputs()
    assert_same(forward_backward(compiled, *inputs), forward_backward(eager, *inputs), atol=1e-5)


def test_channels_last_equals_contiguous():
    plain, fast = unet_pair()
    use_channels_last(fast)
    seen = []
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    for conv in convs:
        conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
            memory_format=torch.channels_last)))
    inputs = unet_inputs()
    got = forward_backward(fast, *inputs)
    assert len(seen) == len(convs) and all(seen)  # NHWC activations throughout
    assert got[0].is_contiguous()  # and the output in the default layout
    assert_same(got, forward_backward(plain, *inputs), atol=1e-5)


def test_tf32_only_for_fp32_runs_on_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        for cfg, device in ((TrainConfig(), "cpu"), (TrainConfig(precision="bf16"), "cuda"),
                            (TrainConfig(tf32=False), "cuda")):
            assert not tf32_for(cfg, device)
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert tf32_for(TrainConfig(), "cuda:0")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # readable through the newer switch too
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_frozen_dtype_resolves_per_device():
    from ldm.precision import frozen_dtype

    assert frozen_dtype("auto", "cuda") is torch.bfloat16 and frozen_dtype("auto", torch.device("cuda:1"))
    assert frozen_dtype("auto", "cpu") is None and frozen_dtype("fp32", "cuda") is None
    assert frozen_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="frozen dtype"):
        frozen_dtype("fp16", "cuda")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def test_frozen_parts_run_under_autocast(tmp_path, tiny_shards, tiny_autoencoder):
    """train.frozen_dtype=bf16 (auto's choice on CUDA): the autoencoder's convolutions and the text encoder's matmuls
    compute in bf16, their weights stay fp32 and what they return is float32, close to the fp32 result."""
    from ldm.assemble import assemble

    base = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None)
    parts = {dtype: assemble(load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                                         [*base, f"train.frozen_dtype={dtype}"])) for dtype in ("fp32", "bf16")}
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    prompts = ["red apple", "a smiling face with sunglasses"]
    out = {}
    for dtype, p in parts.items():
        seen = []
        linear = next(m for m in p.text_encoder.encoder.modules() if isinstance(m, torch.nn.Linear))
        hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
                 for m in (p.autoencoder.encoder.conv_in, p.autoencoder.decoder.conv_in, linear)]
        z = p.autoencoder.encode(images)
        out[dtype] = (z, p.autoencoder.decode(z), p.text_encoder(prompts)["context"], p.null_cond["context"])
        for h in hooks:
            h.remove()
        expected = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert seen and set(seen) == {expected}, (dtype, seen)
        assert all(o.dtype == torch.float32 for o in out[dtype]), [o.dtype for o in out[dtype]]
        assert all(v.dtype == torch.float32 for v in p.autoencoder.state_dict().values())
    for name, got, ref in zip(("latent", "image", "context", "null context"), out["bf16"], out["fp32"]):
        assert rel_err(got, ref) < 0.05, (name, rel_err(got, ref))
        assert not torch.equal(got, ref), name  # computed in bf16 indeed


def test_compiled_channels_last_run_follows_the_eager_one(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    """Three training steps, eager and compiled (whole UNet, in place) with channels-last: the same losses and weights.
    Every micro-step's loss stays a tensor and the non-finite flag reaches the collective as a tensor (no host read
    of the loss on the way)."""
    flags = []
    real_any = trainer_mod.any_across_ranks
    monkeypatch.setattr(trainer_mod, "any_across_ranks", lambda flag, *a, **k: flags.append(flag) or real_any(flag, *a, **k))

    def run(name: str, *extra: str):
        cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                          [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / name, None),
                           "train.max_steps=3", "train.ckpt_every=3", "sampling.prompts=[red apple]", *extra])
        trainer = trainer_mod.Trainer(cfg)
        losses, step = [], trainer.micro_step
        trainer.micro_step = lambda batch: losses.append(step(batch)) or losses[-1]
        result = trainer.train()
        return trainer, losses, result

    eager, eager_losses, _ = run("eager")
    fast, fast_losses, result = run("fast", "train.compile=model", "train.compile_options={backend: aot_eager}",
                                    "train.channels_last=true")
    assert fast.engine.is_compiled and not eager.engine.is_compiled
    hooks = [h.__name__ for h in fast.engine.module._forward_pre_hooks.values()]
    assert "_channels_last_inputs" in hooks  # (the layouts inside a compiled graph are the compiler's)
    assert len(eager_losses) == len(fast_losses) == 3
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in eager_losses + fast_losses)
    assert len(flags) == 6 and all(isinstance(f, torch.Tensor) for f in flags)
    torch.testing.assert_close(torch.stack(fast_losses), torch.stack(eager_losses), atol=1e-6, rtol=1e-5)
    assert result["last_loss"] == pytest.approx(float(fast_losses[-1]), rel=1e-6)  # logged at the last step
    # weights: the same but for elements whose gradient is rounding noise, which AdamW's normalised update can move by
    # up to lr per step either way (measured: at most 5e-5, in under 0.05 % of a tensor's elements)
    ref = eager.engine.module.state_dict()
    for name, value in fast.engine.module.state_dict().items():
        diff = (value - ref[name]).abs()
        assert float(diff.max()) <= 2e-4 and float((diff > 1e-6).float().mean()) < 2e-3, name


def test_zero3_trains_under_both_compile_modes(tmp_path, tiny_shards, tiny_autoencoder):
    """ZeRO-3 (parameters partitioned, gathered by hooks around each module) with train.compile=model and =regional:
    Dynamo captures graphs (split at the gathering), and three steps give eager ZeRO-3's losses."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(name: str, *extra: str) -> tuple[list[float], int]:
        torch._dynamo.reset()
        counters.clear()
        cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                          [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / name, None),
                           "train.zero_stage=3", "train.max_steps=3", "train.ckpt_every=3",
                           "sampling.prompts=[red apple]", *extra])
        trainer = trainer_mod.Trainer(cfg)
        assert trainer.engine.zero_optimization_stage() == 3
        losses, step = [], trainer.micro_step
        trainer.micro_step = lambda batch: losses.append(step(batch)) or losses[-1]
        assert trainer.train()["step"] == 3
        return [float(v) for v in losses], counters["stats"]["unique_graphs"]

    eager, eager_graphs = run("eager")
    assert eager_graphs == 0
    for how in ("model", "regional"):
        losses, graphs = run(how, f"train.compile={how}", "train.compile_options={backend: aot_eager}")
        assert graphs > 0, how  # compiled graphs ran
        assert losses == pytest.approx(eager, rel=1e-5, abs=1e-6), (how, losses, eager)


def test_unknown_compile_options_are_a_config_error(tmp_path, tiny_shards, tiny_autoencoder):
    from ldm.config import ConfigError

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None),
                       "train.compile=regional", "train.compile_options={backend: eager, modes: fast}"])
    with pytest.raises(ConfigError, match=r"train.compile_options: \['modes'\]"):
        trainer_mod.Trainer(cfg)


def test_one_process_skips_the_gradient_all_reduce_with_the_same_bits():
    """One ZeRO-0 process has nothing to all-reduce: the engine skips DeepSpeed's flatten/all-reduce/unflatten of every
    gradient, and the weights after accumulated steps are bit-identical to the engine that does it."""
    from ldm.train.distributed import init_distributed
    from ldm.train.engine import build_engine

    init_distributed("cpu")
    cfg = TrainConfig(lr=1e-3, grad_accum=2, warmup_steps=0, max_steps=10)
    skipping, reducing = (build_engine(unet, cfg, micro_batch=3) for unet in unet_pair())
    assert not skipping.enable_backward_allreduce and not reducing.enable_backward_allreduce
    reducing.enable_backward_allreduce = True  # the engine as DeepSpeed builds it
    calls = []
    original = reducing.allreduce_gradients
    reducing.allreduce_gradients = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    x, t, context, mask = unet_inputs()
    for step in range(4):  # two optimizer steps of two micro-batches
        for engine in (skipping, reducing):
            out = engine(x + step, t, context, mask)
            engine.backward(out.square().mean())
            engine.step()
    assert len(calls) == 4  # DeepSpeed enters it after every backward (it reduces at the boundaries)
    for (name, a), (_, b) in zip(skipping.module.named_parameters(), reducing.module.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(skipping.module.conv_in.weight, unet_pair()[0].conv_in.weight)  # it did train
