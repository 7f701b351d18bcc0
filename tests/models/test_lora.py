"""LoRA on the UNet (peft): only adapters train, adapter files resume exactly, merged weights = base + adapters,
diffusers' load_lora_weights / load_lora_adapter on our exported file reproduce our outputs."""

from __future__ import annotations

import pytest
import torch

from ldm.models import UNet, unet_preset

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from ldm.models.lora import (  # noqa: E402  (needs peft)
    add_lora,
    export_diffusers_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    merged_state_dict,
    read_lora_settings,
    save_lora,
    save_merged_diffusers,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU

# every kind of layer we adapt: attention and feed-forward Linears, the split GEGLU projection, SD 1.x's token-wise
# 1x1 projections, ResNet and resampling convolutions (the fused upsampling one included), the time projection
EVERYTHING = dict(attention=True, convolutions=True, extra=("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                                            "time_emb_proj"))


def _base(preset: str = "tiny", seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(**unet_preset(preset)).eval()


def _lora(base: UNet, rank: int = 3, alpha: float = 6.0, seed: int = 1, **targets) -> UNet:
    """A copy of base with adapters whose A and B are random (B starts at zero: the adapter would do nothing)."""
    unet = UNet(**base.config).eval()
    unet.load_state_dict(base.state_dict())
    add_lora(unet, rank=rank, alpha=alpha, **(targets or EVERYTHING))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


def _inputs(unet: UNet, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(2)
    cfg = unet.config
    inp = dict(x=torch.randn(batch, 4, 8, 8, generator=g), t=torch.tensor([3.0, 700.5])[:batch],
               context=torch.randn(batch, 5, cfg["context_dim"], generator=g))
    if cfg["pooled_dim"] is not None:
        inp.update(pooled=torch.randn(batch, cfg["pooled_dim"], generator=g),
                   time_ids=torch.tensor([[512.0, 512, 0, 0, 256, 256], [300, 200, 10, 20, 256, 256]])[:batch])
    return inp


def _run(unet, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(inp["x"], inp["t"], inp["context"], pooled=inp.get("pooled"), time_ids=inp.get("time_ids"))


def _run_diffusers(ref, inp: dict) -> torch.Tensor:
    extra = {"added_cond_kwargs": {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}} if "pooled" in inp else {}
    with torch.no_grad():
        return ref(inp["x"], inp["t"], inp["context"], **extra).sample


def test_only_adapter_parameters_train():
    base = _base()
    unet = _lora(base)
    layers = lora_layers(unet)
    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                "upsamplers.0.conv", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj")
    expected_modules = {n for n, _ in base.named_modules() if any(n.endswith("." + s) for s in suffixes)}
    assert set(layers) == expected_modules and len(layers) == 115
    r, expected = 3, 0
    for layer in layers.values():  # A: r x in (x kernel), B: out x r
        w = layer.get_base_layer().weight
        expected += r * w[0].numel() + w.shape[0] * r
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected == 73_632
    assert all(".lora_" in n for n in trainable)

    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    inp = _inputs(unet)
    unet.train()
    unet(inp["x"], inp["t"], inp["context"]).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in unet.named_parameters() if n in frozen)
    assert all(not torch.equal(p, adapters[n]) for n, p in trainable.items())


def test_adapter_file_resumes_exactly(tmp_path):
    base = _base()
    unet = _lora(base)
    path = save_lora(unet, tmp_path / "adapter.safetensors")
    assert read_lora_settings(path) == dict(rank=3, alpha=6.0, targets=list(unet.lora_settings["targets"]),
                                            dropout=0.0)
    fresh = UNet(**base.config).eval()
    fresh.load_state_dict(base.state_dict())
    load_lora(fresh, path)  # adds the adapters with the file's settings, then loads them
    mine, theirs = lora_state_dict(unet), lora_state_dict(fresh)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    inp = _inputs(unet)
    assert torch.equal(_run(fresh, inp), _run(unet, inp))
    assert not fresh.training and not any(p.requires_grad for n, p in fresh.named_parameters() if ".lora_" not in n)

    other = UNet(**base.config)
    add_lora(other, rank=2, **EVERYTHING)  # another rank: refused, naming the mismatched tensors
    with pytest.raises(ValueError, match=r"to_q\.lora_A\.weight: checkpoint \(3, 32\) vs model \(2, 32\)"):
        load_lora(other, path)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(unet)


def test_merged_weights_equal_base_plus_adapters(tmp_path):
    base = _base()
    unet = _lora(base)
    inp = _inputs(unet)
    out = _run(unet, inp)
    assert (out - _run(base, inp)).abs().max() > 1e-2  # the adapters do change the output
    merged = UNet(**base.config).eval()
    merged.load_state_dict(merged_state_dict(unet), strict=True)
    err = (_run(merged, inp) - out).abs().max()
    assert err < 1e-5, float(err)
    save_merged_diffusers(unet, tmp_path / "merged")
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_run_diffusers(ref, inp), out, atol=1e-5, rtol=0)


def test_diffusers_load_lora_weights_reproduces_our_model(tmp_path):
    base = _base()
    unet = _lora(base)
    path = export_diffusers_lora(unet, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    ref = diffusers.UNet2DConditionModel(**base.to_diffusers_config()).eval()
    ref.load_state_dict(base.state_dict(), strict=True)
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=ref,
                                             scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
                                             safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    inp = _inputs(unet)
    before = _run_diffusers(pipe.unet, inp)
    pipe.load_lora_weights(str(path.parent))  # finds pytorch_lora_weights.safetensors
    after = _run_diffusers(pipe.unet, inp)
    ours = _run(unet, inp)
    err = (after - ours).abs().max()
    assert err < 1e-4, float(err)
    assert (before - ours).abs().max() > 1e-2


def test_sdxl_unet_lora_loads_into_diffusers(tmp_path):
    base = _base("tiny-sdxl")
    unet = _lora(base, rank=2, alpha=1.0, attention=True, convolutions=True)
    path = export_diffusers_lora(unet, tmp_path / "xl_lora.safetensors")
    ref = diffusers.UNet2DConditionModel(**base.to_diffusers_config()).eval()
    ref.load_state_dict(base.state_dict(), strict=True)
    ref.load_lora_adapter(str(path), prefix="unet")
    inp = _inputs(unet)
    ours = _run(unet, inp)
    err = (_run_diffusers(ref, inp) - ours).abs().max()
    assert err < 1e-4, float(err)
    assert (_run(base, inp) - ours).abs().max() > 1e-3
