"""Config keys of flow matching, EDM, time sampling and guidance: validation names the key; builders assemble them."""

import pytest
import torch

from ldm.assemble import build_objective, build_process, build_time_sampling, precondition
from ldm.sampling import guide
from ldm.config import ConfigError, LDMConfig, load_config
from ldm.diffusion import EDMPrecond, FlowMatching, TimeSampling, diffusion_loss
from ldm.sampling import ClassifierFreeGuidance, GuidanceInterval, Guided
from tests.conftest import ROOT

FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity", "diffusion.time_sampling=logit_normal",
        "diffusion.time_shift=3.0"]
EDM = ["diffusion.process=ve", "diffusion.prediction=x0", "diffusion.precondition=edm", "diffusion.weighting=edm",
       "diffusion.time_sampling=edm"]


def load(overrides):
    return load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", overrides)


@pytest.mark.parametrize("override, key", [
    ("diffusion.prediction=eps", "diffusion.prediction"),  # with process flow: x0 undefined at t = 1
    ("diffusion.time_std=-1", "diffusion.time_std"),
    ("diffusion.time_shift=0", "diffusion.time_shift"),
    ("diffusion.mode_scale=3", "diffusion.mode_scale"),
    ("diffusion.time_sampling=gamma", "diffusion.time_sampling"),
    ("sampling.guidance_rescale=1.5", "sampling.guidance_rescale"),
    ("sampling.guidance_interval=[2.0, 1.0]", "sampling.guidance_interval"),
    ("sampling.time_shift=-1", "sampling.time_shift"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load(FLOW + [override])


def test_combinations_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="diffusion.prediction"):
        load(EDM[:1] + EDM[2:])  # EDM preconditioning outputs x0
    with pytest.raises(ConfigError, match="diffusion.precondition"):  # c_noise is infinite at the flow's t = 1
        load(["diffusion.process=flow", "diffusion.prediction=x0", "diffusion.precondition=edm"])
    with pytest.raises(ConfigError, match="diffusion.time_mean"):
        load(["diffusion.time_sampling=mode", "diffusion.time_mean=0.5"])
    with pytest.raises(ConfigError, match="diffusion.time_sampling"):
        load(["diffusion.process=ve", "diffusion.objective=dsm", "diffusion.prediction=score",
              "diffusion.time_sampling=edm"])


def test_flow_config_builds_the_flow_objective():
    cfg = load(FLOW).diffusion
    process = build_process(cfg)
    assert isinstance(process, FlowMatching) and process.time_scale == 1000
    assert build_time_sampling(cfg) == TimeSampling("logit_normal", shift=3.0)
    seen = {}

    def net(x, m, cond):
        seen["m"] = m
        return torch.zeros_like(x)

    x0 = torch.randn(64, 4, 2, 2, dtype=torch.float64)
    loss = build_objective(cfg, process)(net, x0, None, torch.Generator().manual_seed(0))
    expected = diffusion_loss(net, x0, None, process, prediction="velocity", time_sampling=build_time_sampling(cfg),
                              generator=torch.Generator().manual_seed(0))
    assert float(loss) == float(expected) and float(seen["m"].max()) <= 1000


def test_edm_config_builds_the_preconditioned_objective():
    cfg = load(EDM).diffusion
    process = build_process(cfg)
    net = lambda y, c_noise, cond: 0.5 * y  # noqa: E731
    assert isinstance(precondition(cfg, process, net), EDMPrecond)
    x0 = torch.randn(32, 4, 2, 2, dtype=torch.float64)
    loss = build_objective(cfg, process)(precondition(cfg, process, net), x0, None, torch.Generator().manual_seed(1))
    expected = diffusion_loss(EDMPrecond(net, process, 0.5), x0, None, process, prediction="x0", weighting="edm",
                              time_sampling=TimeSampling("edm"), generator=torch.Generator().manual_seed(1))
    assert float(loss) == float(expected)


def test_guidance_config_builds_the_wrappers():
    cfg = load(FLOW + ["sampling.guidance_rescale=0.7", "sampling.guidance_interval=[0.3, 5.0]"])
    process = build_process(cfg.diffusion)
    s = cfg.sampling
    guided = guide(lambda x, t, c: x * c, 4.0, rescale=s.guidance_rescale, interval=s.guidance_interval, process=process)
    assert isinstance(guided, GuidanceInterval) and (guided.sigma_lo, guided.sigma_hi) == (0.3, 5.0)
    assert guided.guidance.rescale == 0.7 and guided.guidance.scale == 4.0
    s = load(FLOW).sampling
    plain = guide(lambda x, t, c: x * c, 4.0, rescale=s.guidance_rescale, interval=s.guidance_interval, process=process)
    assert isinstance(plain, ClassifierFreeGuidance) and plain.rescale == 0.0
    x, m = torch.ones(2, 3), process.model_time(torch.tensor([0.5, 0.5], dtype=torch.float64)).float()
    torch.testing.assert_close(plain(x, m, Guided(torch.full((2, 1), 2.0), torch.ones(2, 1))), x * 5.0)
