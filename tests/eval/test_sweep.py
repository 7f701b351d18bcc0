"""Sweep grids: function evaluations per sampler counted on a real sampling run, the grid and its errors."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import VPSDE, Predictor
from ldm.eval.sweep import SweepPoint, format_table, nfe, parse_sweep
from ldm.sampling import SAMPLERS, sample


# pc: one corrector step per interval; heun_ode: the last interval returns the denoised estimate after one call
KNOWN = {"ddpm": lambda n: n, "ddim": lambda n: n, "euler_maruyama": lambda n: n, "dpmpp_2m": lambda n: n,
         "pc": lambda n: 2 * n, "heun_ode": lambda n: 2 * n - 1}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_nfe_counts_the_denoiser_calls(sampler):
    for steps in (1, 4, 7):
        calls = []

        def denoiser(x, t, cond):
            calls.append(1)
            return 0.1 * x

        model = Predictor(denoiser, VPSDE(), "eps")  # another process than nfe() counts on, and a batch of 2
        sample(model, (2, 3), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        assert len(calls) == nfe(sampler, steps) == SweepPoint(sampler, steps, 1.0).nfe
        if sampler in KNOWN:
            assert nfe(sampler, steps) == KNOWN[sampler](steps)


def test_parse_sweep_grid_and_errors():
    points = parse_sweep(["guidance=0,1,4", "sampler=ddim,heun_ode"], "ddpm", 25, 2.0)
    assert [(p.sampler, p.steps, p.guidance) for p in points] == [
        ("ddim", 25, 0.0), ("ddim", 25, 1.0), ("ddim", 25, 4.0),
        ("heun_ode", 25, 0.0), ("heun_ode", 25, 1.0), ("heun_ode", 25, 4.0)]
    assert points[3].params() == {"sampler": "heun_ode", "steps": 25, "guidance": 0.0, "nfe": 49}
    assert points[3].name == "heun_ode-25-g0"
    assert parse_sweep([], "pc", 10, 3.0) == [SweepPoint("pc", 10, 3.0)]  # no sweep: the one setting
    assert [p.steps for p in parse_sweep([" steps = 10,25 "], "ddim", 50, 4.0)] == [10, 25]
    for spec, needle in ((["guidance=a,1"], "'a' is not a number"), (["guidance=-1"], "must be a finite number >= 0"),
                         (["steps=0"], "'0' is not a positive integer"), (["steps=2.5"], "not a positive integer"),
                         (["sampler=ddim,nope"], "unknown sampler 'nope'"), (["speed=1"], "unknown key 'speed'"),
                         (["guidance"], "expected key=v1,v2"), (["steps=10,", ], "empty value"),
                         (["steps=10,10"], "repeated value"), (["steps=1", "steps=2"], "given twice")):
        with pytest.raises(ValueError, match=needle):
            parse_sweep(spec, "ddim", 25, 4.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        parse_sweep([], "euler", 25, 4.0)


def test_format_table_aligns_columns_and_skips_missing():
    table = format_table([{"sampler": "ddim", "steps": 10, "nfe": 10, "guidance": 4.0, "fid": 123.456789},
                          {"sampler": "heun_ode", "steps": 10, "nfe": 19, "guidance": 4.0, "fid": 7.0}])
    lines = table.splitlines()
    assert lines[0].split() == ["sampler", "steps", "nfe", "guidance", "fid"]  # no kid/probe columns: no row has them
    assert lines[1].split() == ["ddim", "10", "10", "4", "123.5"] and len({len(line) for line in lines}) == 1
