"""LoRA fine-tuning through `ldm-train` (model.init_from + model.lora): only the adapters reach DeepSpeed and the
checkpoints, a stopped run resumes to exactly the uninterrupted adapters, the export's merged weights equal base +
adapters, diffusers' load_lora_weights on the exported file reproduces our model, ldm-export rebuilds the same export
from the adapter checkpoint, and ZeRO-3 is refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ldm.cli.train import main as train_main
from ldm.config import ConfigError, LDMConfig, load_config
from tests.conftest import ROOT, resumed_line, tiny_ldm_overrides

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

CONFIG = str(ROOT / "configs/ldm/emoji.yaml")
RANK = 2


@pytest.fixture(scope="module")
def base_unet(tmp_path_factory, tiny_shards, tiny_autoencoder):
    """Random tiny-preset weights for the MiniLM's 384-d tokens, saved as a diffusers UNet folder (a 'base model')."""
    from ldm.assemble import build_unet
    from ldm.models import save_diffusers

    cfg = load_config(LDMConfig, CONFIG, tiny_ldm_overrides(tiny_shards, tiny_autoencoder, "unused", None))
    torch.manual_seed(7)
    return save_diffusers(build_unet(cfg.model, 4, 384), tmp_path_factory.mktemp("base") / "unet")


def _args(shards, autoencoder, out, base, *extra) -> list[str]:
    return ["--config", CONFIG, *tiny_ldm_overrides(shards, autoencoder, out, None), f"model.init_from={base}",
            f"model.lora.rank={RANK}", "model.lora.alpha=4", "model.lora.convolutions=true", "train.zero_stage=2",
            "train.lr_schedule=constant", "train.lr=1e-2", *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_shards, tiny_autoencoder, base_unet):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train_main(_args(tiny_shards, tiny_autoencoder, out, base_unet)) == 0
    return out


def _adapters_only(folder) -> tuple[dict, int]:
    """The module tensors a checkpoint holds, and the numel of its fp32 optimizer partitions."""
    module = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    optim = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    flat = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    return module, sum(t.numel() for t in flat)


def test_only_adapters_train_and_are_checkpointed(lora_run, base_unet):
    from ldm.assemble import build_unet as trained_unet

    cfg = load_config(LDMConfig, lora_run / "config.yaml")
    unet = trained_unet(cfg.model, 4, 384, None)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    expected = 0
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            w = module.get_base_layer().weight
            expected += RANK * w[0].numel() + w.shape[0] * RANK
    assert all(".lora_" in n for n in trainable) and sum(p.numel() for p in trainable.values()) == expected
    module, optimized = _adapters_only(lora_run / "checkpoints" / "step00000004")
    assert set(module) == set(trainable)  # the checkpoint holds the adapters alone
    assert expected <= optimized < expected + 64  # DeepSpeed's fp32 partition: the adapters (+ alignment padding)
    ema = load_file(str(lora_run / "checkpoints" / "step00000004" / "ema_rank0.safetensors"))
    assert set(ema) == set(trainable)


def test_stopped_lora_run_resumes_exactly(tmp_path, lora_run, tiny_shards, tiny_autoencoder, base_unet,
                                          trained_steps, capsys):
    """The adapter-only checkpoint of step 2 is resumed (over model.init_from): steps 3-4 alone are trained, and the
    export equals the uninterrupted run's."""
    out = tmp_path / "run"
    assert train_main(_args(tiny_shards, tiny_autoencoder, out, base_unet, "train.max_steps=2")) == 0
    trained_steps.clear()
    capsys.readouterr()
    assert train_main(_args(tiny_shards, tiny_autoencoder, out, base_unet)) == 0  # resumes at step 2, to 4
    assert resumed_line(out / "checkpoints", 2) in capsys.readouterr().out
    assert trained_steps == [3, 4]
    for name in ("unet.safetensors", "unet_ema.safetensors", "lora/pytorch_lora_weights.safetensors",
                 "lora/pytorch_lora_weights_raw.safetensors"):
        a, b = load_file(str(lora_run / "export" / name)), load_file(str(out / "export" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _inputs(batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10.0, 600.0]), torch.randn(batch, 5, 384,
                                                                                                 generator=g)


def test_export_is_merged_weights_and_a_diffusers_lora(tmp_path, lora_run, base_unet):
    from ldm.assemble import build_unet as trained_unet
    from ldm.assemble import load_exported
    from ldm.cli.export import main as export_main
    from ldm.train.checkpoint import read_weights

    pipe, cfg = load_exported(lora_run / "export")
    x, t, context = _inputs()
    with torch.no_grad():
        merged = pipe.unet(x, t, context)
        _, ema, _ = read_weights(lora_run / "checkpoints")
        adapted = trained_unet(cfg.model, 4, 384, None, ema).eval()(x, t, context)  # base + EMA adapters (peft)
        base = diffusers.UNet2DConditionModel.from_pretrained(base_unet).eval()
        before = base(x, t, context).sample
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - before).abs().max() > 1e-3  # the adapters trained away from the base
    sd = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=base,
                                           scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    sd.load_lora_weights(str(lora_run / "export" / "lora"))  # pytorch_lora_weights.safetensors: the EMA adapters
    with torch.no_grad():
        theirs = sd.unet(x, t, context).sample
    assert float((theirs - merged).abs().max()) < 1e-4
    assert export_main([str(lora_run), "--out", str(tmp_path / "again")]) == 0  # from the adapter checkpoint
    for name in ("unet_ema.safetensors", "lora/pytorch_lora_weights.safetensors"):
        a, b = load_file(str(lora_run / "export" / name)), load_file(str(tmp_path / "again" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name


def test_lora_settings_are_checked(tiny_shards, tiny_autoencoder, tmp_path):
    base = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path, None)
    for extra, message in ((["model.lora.rank=2"], "model.lora: LoRA fine-tunes loaded weights"),
                           (["model.lora.rank=2", "model.init_from=x", "train.zero_stage=3"], "train.zero_stage <= 2"),
                           (["model.lora.rank=0", "model.init_from=x"], "rank must be >= 1"),
                           (["model.lora.attention=false", "model.init_from=x"], "no target")):
        with pytest.raises(ConfigError, match=message):
            load_config(LDMConfig, CONFIG, [*base, *extra])
