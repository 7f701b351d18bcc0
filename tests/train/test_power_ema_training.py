"""EDM2's power EMA in real training (Karras et al. 2024, Sec. 3): the tiny UNet on the tiny real shards tracks
sigma_rel 0.05, 0.075 and 0.10; snapshots and checkpoints hold them; ldm-export reconstructs any width from them; a
resume from an earlier checkpoint (over stale later snapshots) ends bit for bit where the uninterrupted run did."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ldm.config import ConfigError, LDMConfig, load_config
from ldm.train.checkpoint import read_power_snapshots
from ldm.train.power_ema import SIGMA_REL_MAX, Snapshot, reconstruct, sigma_rel_to_gamma
from tests.conftest import ROOT, resumed_line, tiny_ldm_overrides

WIDTHS = (0.05, 0.075, 0.10)
# a snapshot every step: the least-squares fit of a profile between the tracked ones misses its mass (sum of the
# coefficients - 1) by 3e-3 with 6 snapshot times, 2.5e-4 with 12 and 1.7e-5 with 24 (scale-free: the same at 1200
# steps), and that error multiplies the whole weight norm
STEPS, EVERY, CKPT = 24, 1, 12
# constant LR, so the first half of a run is the same whether the run is 12 or 24 steps long
RUN = (f"train.power_ema=[{', '.join(map(str, WIDTHS))}]", f"train.power_ema_snapshot_every={EVERY}",
       f"train.ckpt_every={CKPT}", "train.keep_last=5", "train.lr_schedule=constant", "train.lr=1e-3",
       "train.log_every=100", "sampling.steps=2")


def config(out, shards, autoencoder, *extra) -> LDMConfig:
    return load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                       [*tiny_ldm_overrides(shards, autoencoder, out, None), *RUN, *extra])


def train(out, shards, autoencoder, *extra) -> dict:
    from ldm.train.trainer import Trainer

    return Trainer(config(out, shards, autoencoder, *extra)).train()


def norm(tensors: dict) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())))


def diff(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    return {k: a[k] - b[k] for k in a}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_shards, tiny_autoencoder):
    out = tmp_path_factory.mktemp("phema") / "run"
    result = train(out, tiny_shards, tiny_autoencoder, f"train.max_steps={STEPS}")
    assert result["step"] == STEPS and result["export"]
    return out


def test_snapshots_and_checkpoints_hold_the_power_emas(run):
    root = run / "checkpoints"
    steps = sorted(int(p.name.removeprefix("step")) for p in (root / "power_ema").iterdir())
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    info = json.loads((root / "power_ema" / "step00000008" / "power_ema.json").read_text())  # a snapshot's index
    assert info["step"] == 8 and info["sigma_rels"] == list(WIDTHS) and info["ranks"] == 1
    assert info["gammas"] == pytest.approx([sigma_rel_to_gamma(w) for w in WIDTHS], rel=1e-12)
    assert [round(g, 2) for g in info["gammas"][::2]] == [16.97, 6.94]  # EDM2's pair
    snaps, tag = read_power_snapshots(root)
    assert tag == "step00000024" and len(snaps) == len(WIDTHS) * STEPS // EVERY
    # the checkpoint's own power EMAs (what a resume restores) are the last snapshot's
    for s in snaps[-3:]:
        assert s.step == STEPS
    final = {w: dict(s.tensors()) for w, s in zip(WIDTHS, [s for s in snaps if s.step == STEPS])}
    stored = load_file(str(root / "power_ema" / "step00000024" / "power_ema_rank0.safetensors"))
    for w in WIDTHS:
        for name, t in final[w].items():
            assert torch.equal(t, stored[f"{w!r}/{name}"])
    # the widths differ from each other and from the raw weights (narrower = closer to the last step)
    raw = load_file(str(run / "export" / "unet.safetensors"))
    gaps = [norm(diff(final[w], raw)) for w in WIDTHS]
    assert 0 < gaps[0] < gaps[1] < gaps[2], gaps


def test_export_of_a_tracked_width_is_that_ema(tmp_path, run):
    """ldm-export --ema-sigma-rel 0.1 solves for the 0.1 EMA from all 72 snapshots: it gets the tracked one back
    (the least-squares weights are the unit vector of that snapshot to 1e-6)."""
    from ldm.cli.export import main as export_main

    assert export_main([str(run), "--ema-sigma-rel", "0.1", "--out", str(tmp_path / "phema")]) == 0
    got = load_file(str(tmp_path / "phema" / "unet_ema.safetensors"))
    want = dict([s for s in read_power_snapshots(run / "checkpoints")[0] if s.step == STEPS][2].tensors())
    scale = max(float(t.abs().max()) for t in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6 * scale)
    record = json.loads((tmp_path / "phema" / "export.json").read_text())["ema"]
    assert record["kind"] == "power" and record["sigma_rel"] == 0.1 and record["step"] == STEPS
    assert record["snapshots"] == len(WIDTHS) * STEPS // EVERY and record["profile_error"] < 1e-6
    assert abs(record["coefficient_sum"] - 1) < 1e-6
    assert record["tracked_sigma_rels"] == list(WIDTHS)
    # the diffusers copy is the reconstruction too, and the raw weights are the checkpoint's
    assert json.loads((tmp_path / "phema" / "diffusers" / "unet" / "config.json").read_text())
    raw = load_file(str(tmp_path / "phema" / "unet.safetensors"))
    assert all(torch.equal(raw[k], v) for k, v in load_file(str(run / "export" / "unet.safetensors")).items())


def test_a_width_in_between_matches_the_ema_tracked_alongside(run):
    """0.075 from the 0.05 and 0.10 snapshots alone (48: every step of 24) vs the 0.075 EMA tracked in the same run:
    within 2 % of the distance between the two tracked EMAs, and 20x closer than either of them."""
    snaps = read_power_snapshots(run / "checkpoints")[0]
    g_mid = sigma_rel_to_gamma(0.075)
    basis = [s for s in snaps if not math.isclose(s.gamma, g_mid)]
    assert len(basis) == 2 * STEPS // EVERY
    final = {round(s.gamma, 3): dict(s.tensors()) for s in snaps if s.step == STEPS}
    lo, mid, hi = (final[round(sigma_rel_to_gamma(w), 3)] for w in WIDTHS)
    got = reconstruct(basis, 0.075, step=STEPS)
    error, spread = norm(diff(got, mid)), norm(diff(lo, hi))
    print(f"0.075 reconstructed: error {error:.3e}, spread of the tracked widths {spread:.3e}, "
          f"to 0.05: {norm(diff(lo, mid)):.3e}, to 0.10: {norm(diff(hi, mid)):.3e}")
    assert error < 0.02 * spread, (error, spread)
    assert 20 * error < min(norm(diff(lo, mid)), norm(diff(hi, mid)))


def test_resume_over_stale_snapshots_is_exact(tmp_path, run, tiny_shards, tiny_autoencoder, trained_steps, capsys):
    """Resume the run at its step-12 checkpoint with its later snapshots left behind (and spoiled): steps 13-24 (and
    only those) write them again, and every power EMA, snapshot and EMA equals the uninterrupted run's bit for bit."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=lambda d, names: [n for n in names if n in ("step00000024", "export")])
    (resumed / "checkpoints" / "latest").write_text("step00000012\n")
    stale = resumed / "checkpoints" / "power_ema" / "step00000016" / "power_ema_rank0.safetensors"
    stale.write_bytes(b"spoiled")
    capsys.readouterr()
    result = train(resumed, tiny_shards, tiny_autoencoder, f"train.max_steps={STEPS}")
    assert result["step"] == STEPS
    assert resumed_line(resumed / "checkpoints", CKPT) in capsys.readouterr().out
    assert trained_steps == list(range(CKPT + 1, STEPS + 1))
    for step in range(EVERY, STEPS + 1, EVERY):
        folder = f"checkpoints/power_ema/step{step:08d}/power_ema_rank0.safetensors"
        a, b = load_file(str(run / folder)), load_file(str(resumed / folder))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    for name in ("ema_rank0.safetensors", "power_ema_rank0.safetensors"):
        a = load_file(str(run / "checkpoints" / "step00000024" / name))
        b = load_file(str(resumed / "checkpoints" / "step00000024" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_settings_are_checked(tmp_path, run, tiny_shards, tiny_autoencoder):
    from ldm.assemble import check_inputs

    g = (5**0.5 - 3) / 2
    assert math.isclose(SIGMA_REL_MAX, math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))  # the config's own bound
    base = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "new", None)
    for extra, needle in ((["train.power_ema=[0.05, 0.4]"], "train.power_ema: relative widths must be in (0, 0.3003]"),
                          (["train.power_ema=[0]"], "train.power_ema: relative widths"),
                          (["train.power_ema=[0.05, 0.05]"], "train.power_ema: widths must differ"),
                          (["train.power_ema_snapshot_every=5"], "train.power_ema_snapshot_every: only with"),
                          (["train.power_ema=[0.1]", "train.power_ema_snapshot_every=0"],
                           "train.power_ema_snapshot_every: must be a positive")):
        with pytest.raises(ConfigError) as e:
            load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", [*base, *extra])
        assert needle in str(e.value), (extra, str(e.value))
    assert load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", [*base, "train.power_ema=[]"]).train.power_ema is None
    # resuming the run with other widths (or none) is refused before anything loads
    for widths, needle in (("[0.05, 0.1]", "train.power_ema: [0.05, 0.075, 0.1] -> [0.05, 0.1]"),
                           ("[]", "train.power_ema: [0.05, 0.075, 0.1] -> None")):
        cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                          [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, run, None), *RUN,
                           f"train.power_ema={widths}", "train.power_ema_snapshot_every=null",
                           f"train.max_steps={STEPS + 4}"])
        with pytest.raises(ConfigError) as e:
            check_inputs(cfg)
        assert needle in str(e.value) and "run.output_dir" in str(e.value), str(e.value)


def test_export_without_power_emas_is_a_usage_error(tmp_path, tiny_ldm_run, capsys):
    from ldm.cli.export import main as export_main

    for argv, needle in (([str(tiny_ldm_run), "--ema-sigma-rel", "0.08"], "has no power EMAs"),
                         ([str(tiny_ldm_run), "--ema-sigma-rel", "0.5"], "--ema-sigma-rel: a relative width"),
                         ([str(tiny_ldm_run), "--ema-sigma-rel", "nan"], "--ema-sigma-rel: a relative width")):
        with pytest.raises(SystemExit) as e:
            export_main([*argv, "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and needle in capsys.readouterr().err.strip().splitlines()[-1], argv
    assert not (tmp_path / "x").exists()


def test_reconstruct_reads_snapshots_one_at_a_time():
    """Snapshots on disk are loaded lazily, each once, and a later snapshot than the target step is left out."""
    loads = []

    def lazy(value, step):
        return Snapshot(sigma_rel_to_gamma(0.1), step, load=lambda: loads.append(step) or {"w": torch.full((2,), value)})

    got = reconstruct([lazy(1.0, 10), lazy(2.0, 20), lazy(3.0, 30)], 0.1, step=20)
    assert loads == [10, 20]
    torch.testing.assert_close(got["w"], torch.full((2,), 2.0), rtol=0, atol=1e-6)
