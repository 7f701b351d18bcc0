"""Every backbone (UNet, DiT, MMDiT) under the one denoiser contract: the training objective on the discrete chain and
the flow, guided sampling, the text-to-image pipeline's micro-conditions, on a non-square latent with a text mask."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import DiscreteVP, FlowMatching, Predictor, make_betas, make_objective
from ldm.models import DiT, MMDiT, UNet, model_preset
from ldm.pipeline import unet_denoiser
from ldm.sampling import Guided, guide, sample

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = {
    "unet": lambda: UNet(**model_preset("unet", "tiny")),
    "dit": lambda: DiT(**model_preset("dit", "tiny")),
    "dit-size": lambda: DiT(**model_preset("dit", "tiny", hidden_size=48, size_conditioning=True)),
    "mmdit": lambda: MMDiT(**model_preset("mmdit", "tiny")),
}


def _cond(batch: int, model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A text condition with padding masked, a pooled vector and size/crop ids (each backbone reads what it needs)."""
    g = torch.Generator().manual_seed(seed)
    width = model.config["context_dim"]
    return {"context": torch.randn(batch, 6, width, generator=g),
            "context_mask": torch.arange(6)[None, :] < torch.tensor([[3], [6]])[:batch],
            "pooled": torch.randn(batch, model.config.get("pooled_dim") or 32, generator=g),
            "time_ids": torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]).expand(batch, 6)}


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("process, prediction", [(DiscreteVP(make_betas("linear", 1000)), "eps"),
                                                 (FlowMatching(time_scale=1000), "velocity")])
def test_objective_and_guided_sampling_run_every_backbone(name, process, prediction):
    torch.manual_seed(0)
    model = BACKBONES[name]()
    for p in model.parameters():  # away from the transformers' zero initialisation: every gradient flows
        torch.nn.init.normal_(p, std=0.05)
    denoiser = unet_denoiser(model)
    x0, cond = torch.randn(2, 4, 8, 12), _cond(2, model)
    loss = make_objective("denoising", process, prediction=prediction)(denoiser, x0, cond,
                                                                      torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in model.named_parameters()
                                        if "add_q_proj" not in n)  # the MMDiT's last text queries are unused
    with torch.no_grad():
        null = {k: v[:1].expand_as(v) if k != "time_ids" else v for k, v in _cond(2, model, seed=5).items()}
        guided = Predictor(guide(denoiser, 3.0), process, prediction)
        out = sample(guided, (2, 4, 8, 12), sampler="ddim", steps=3, cond=Guided(cond, null),
                     generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()


def test_micro_conditioned_is_each_backbones_own_answer():
    assert [BACKBONES[k]().micro_conditioned for k in BACKBONES] == [False, False, True, False]
    assert UNet(**model_preset("unet", "tiny-sdxl")).micro_conditioned
