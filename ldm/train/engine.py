"""The DeepSpeed engine of a run: its JSON config and LR schedule from the typed training section, the fast-path
settings of the network it trains (TF32, channels-last, torch.compile), the full weights under any ZeRO stage, and a
fused finiteness check of the parameters."""

from __future__ import annotations

import math
from typing import Any

import torch

from ldm.config import ConfigError, TrainConfig
from ldm.precision import use_tf32
from ldm.train.distributed import align_collective_timeouts, any_across_ranks

def deepspeed_config(cfg: TrainConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config from the typed training section (extra keys in train.deepspeed win)."""
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        # torch's fused AdamW (CPU and CUDA): one kernel over all tensors, 4x faster than the per-tensor loop
        # on CPU (5.0 vs 20.6 ms per step for the emoji-cpu UNet); under ZeRO and bf16 it updates the fp32
        # master partitions.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True,
                                                  "fused": True}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then constant or cosine decay to zero at max_steps (multiplier of the base LR)."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def build_engine(unet: torch.nn.Module, cfg: TrainConfig, micro_batch: int, device: torch.device | str = "cpu"):
    """The DeepSpeed engine over ``unet``'s trainable parameters, AdamW and the warm-up/decay schedule, with the
    fast-path settings of ``cfg``: TF32 (fp32 runs on CUDA), channels-last, torch.compile."""
    import deepspeed

    tf32_for(cfg, device)
    if cfg.channels_last:
        use_channels_last(unet)
    engine, *_ = deepspeed.initialize(
        model=unet, model_parameters=[p for p in unet.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, micro_batch),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    align_collective_timeouts()  # ZeRO's groups too: a rank waiting on a dead peer fails after the one timeout
    if cfg.zero_stage == 0 and engine.world_size == 1:
        # one process has nothing to all-reduce, yet DeepSpeed flattens, "all-reduces" and unflattens every gradient
        # at each boundary (6-8 % of an emoji-cpu step on CPU); the gradients are the same bits without it
        engine.enable_backward_allreduce = False
    compile_network(engine, cfg)
    return engine


def tf32_for(cfg: TrainConfig, device: torch.device | str) -> bool:
    """Turn TF32 on (once per process, before the first matmul) when the run is fp32 on CUDA and ``train.tf32``; bf16
    and fp16 runs have no fp32 matmuls worth it. Returns whether it was turned on."""
    on = torch.device(device).type == "cuda" and cfg.precision == "fp32" and cfg.tf32
    if on:
        use_tf32()
    return on


def use_channels_last(module: torch.nn.Module) -> None:
    """Channels-last (NHWC) 4-D inputs for ``module``, its output back in the default layout.

    Only the activations: DeepSpeed keeps weights in the default layout (it broadcasts each parameter as bytes at
    start, and ZeRO and bf16 move them into flat buffers). A convolution follows its input's layout when either
    input or weight is channels-last (cuDNN, oneDNN), so the activations stay NHWC through the network.
    """
    module.register_forward_pre_hook(_channels_last_inputs)
    module.register_forward_hook(lambda m, args, out: out.contiguous() if isinstance(out, torch.Tensor) else out)


def _channels_last_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def compile_network(engine, cfg: TrainConfig) -> None:
    """``train.compile``: "model" compiles the whole network in place (DeepSpeed's ``engine.compile``; under ZeRO-3
    its parameter-gathering hooks split the graph at every module with parameters), "regional" each ResNet and
    transformer block (the network's ``compile_blocks``); ``train.compile_options`` (checked with the run's inputs,
    ``TrainConfig.check_compile_options``) go to torch.compile."""
    if cfg.compile == "off":
        return
    options = dict(cfg.compile_options)
    if cfg.compile == "model":
        backend = options.pop("backend", None)
        engine.compile(**({"backend": backend} if backend else {}), compile_kwargs=options)
    elif hasattr(engine.module, "compile_blocks"):
        engine.module.compile_blocks(**options)
    else:
        raise ConfigError(f"train.compile: 'regional' needs a network with compile_blocks, not "
                          f"{type(engine.module).__name__}")


def full_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The trained weights in full on every rank (gathered from the partitions under ZeRO-3; collective then)."""
    import deepspeed

    module = engine.module
    if zero_stage != 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's parameter tensors (its partitions under ZeRO-3)."""
    return [getattr(p, "ds_tensor", p.data) for p in module.parameters()]


def weights_finite(module: torch.nn.Module) -> bool:
    """True on every rank when no rank holds a non-finite parameter: one fused reduction, one sync, one all-reduce."""
    tensors = [t for t in local_tensors(module) if t.numel()]
    if not tensors:
        local = True
    else:
        norms = torch._foreach_norm(tensors, 1)  # one kernel launch per dtype group; a NaN or inf gives a non-finite norm
        local = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
    return not any_across_ranks(not local)
