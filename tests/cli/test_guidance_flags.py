"""--guidance-rescale, --guidance-interval LO HI and --time-shift of ldm-sample and ldm-eval: checked before any model
loads (exit 2, one line naming the flag), defaulting to the model's config, and reaching the pipeline: the images of
ldm-sample with the flags are the pipeline's with those options, and a model configured with them samples the same
without the flags. (ldm-eval's flags reaching its pipeline: tests/eval/test_eval_guidance_flags.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.cli.test_bad_inputs import run_cli, tree_digest

FLAGS = ["--guidance-rescale", "0.7", "--guidance-interval", "0.5", "inf", "--time-shift", "2"]
OPTIONS = {"guidance_rescale": 0.7, "guidance_interval": (0.5, float("inf")), "time_shift": 2.0}


def test_bad_values_are_usage_errors_before_models_load(tmp_path, tiny_ldm_run, capsys, monkeypatch):
    import ldm.assemble as assemble_mod
    from ldm.cli.evaluate import main as eval_main
    from ldm.cli.sample import main as sample_main

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(assemble_mod, "assemble", refuse)
    model = str(tiny_ldm_run / "export")
    cases = [
        (["--guidance-rescale", "1.5"], "--guidance-rescale: phi must be in [0, 1], got 1.5"),
        (["--guidance-rescale", "nan"], "--guidance-rescale: phi must be in [0, 1], got nan"),
        (["--guidance-rescale", "-0.1"], "--guidance-rescale: phi must be in [0, 1]"),
        (["--guidance-interval", "2", "1"], "--guidance-interval: expected LO HI with 0 <= LO < HI"),
        (["--guidance-interval", "-1", "1"], "--guidance-interval: expected LO HI with 0 <= LO < HI"),
        (["--guidance-interval", "1", "1"], "--guidance-interval: expected LO HI"),
        (["--guidance-interval", "nan", "1"], "--guidance-interval: expected LO HI"),
        (["--guidance-interval", "0", "nan"], "--guidance-interval: expected LO HI"),
        (["--time-shift", "0"], "--time-shift: must be a positive number, got 0.0"),
        (["--time-shift", "-2"], "--time-shift: must be a positive number"),
        (["--time-shift", "inf"], "--time-shift: must be a positive number"),
    ]
    before = tree_digest(tiny_ldm_run)
    for main, base in ((sample_main, ["--model", model, "--prompt", "red apple", "--out", str(tmp_path / "s")]),
                       (eval_main, ["--model", model, "--no-tracking"])):
        for flags, needle in cases:
            line = run_cli(main, [*base, *flags], capsys)
            assert line.startswith("error:") and needle in line, (flags, line)
    assert tree_digest(tiny_ldm_run) == before and not (tmp_path / "s").exists()
    # argparse itself refuses an interval of one number (exit 2 naming the flag)
    line = run_cli(sample_main, ["--model", model, "--prompt", "x", "--guidance-interval", "1"], capsys)
    assert "--guidance-interval" in line


def test_spacing_help_names_karras(capsys):
    from ldm.cli.sample import main as sample_main

    with pytest.raises(SystemExit) as e:
        sample_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "uniform | logsnr | karras" in text
    for flag in ("--guidance-rescale PHI", "--guidance-interval LO HI", "--time-shift S"):
        assert flag in text


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_flags_reach_the_pipeline_and_default_to_the_model(tmp_path, tiny_ldm_run):
    from ldm.assemble import load_exported
    from ldm.cli.sample import main as sample_main
    from ldm.pipeline import to_pil

    model = tiny_ldm_run / "export"
    base = ["--prompt", "red apple", "--images-per-prompt", "2", "--sampler", "ddim", "--steps", "4",
            "--guidance", "6", "--device", "cpu"]
    assert sample_main(["--model", str(model), *base, *FLAGS, "--out", str(tmp_path / "flags")]) == 0
    assert sample_main(["--model", str(model), *base, "--out", str(tmp_path / "plain")]) == 0
    meta = json.loads(Image.open(tmp_path / "flags" / "00000.png").text["parameters"])
    assert meta["guidance_rescale"] == 0.7 and meta["guidance_interval"] == [0.5, float("inf")]
    assert meta["time_shift"] == 2.0
    plain = json.loads(Image.open(tmp_path / "plain" / "00000.png").text["parameters"])
    assert (plain["guidance_rescale"], plain["guidance_interval"], plain["time_shift"]) == (0.0, None, 1.0)

    pipe, _ = load_exported(model, "cpu")
    want = to_pil(pipe.generate(["red apple"] * 2, [0, 1], progress=False, sampler="ddim", steps=4, guidance=6.0,
                                **OPTIONS))
    for i in range(2):
        got = read_png(tmp_path / "flags" / f"{i:05d}.png")
        assert np.array_equal(got, np.asarray(want[i])), i
        assert not np.array_equal(got, read_png(tmp_path / "plain" / f"{i:05d}.png")), i  # the flags change images

    # a model whose config sets these options samples with them when no flag is given
    configured = tmp_path / "configured"
    shutil.copytree(model, configured)
    cfg = yaml.safe_load((configured / "config.yaml").read_text())
    cfg["sampling"].update(guidance_rescale=0.7, guidance_interval=[0.5, float("inf")], time_shift=2.0)
    (configured / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert sample_main(["--model", str(configured), *base, "--out", str(tmp_path / "defaults")]) == 0
    for i in range(2):
        assert np.array_equal(read_png(tmp_path / "defaults" / f"{i:05d}.png"), np.asarray(want[i])), i
    # and a flag overrides the model's default
    assert sample_main(["--model", str(configured), *base, "--guidance-rescale", "0", "--guidance-interval", "0", "inf",
                        "--time-shift", "1", "--out", str(tmp_path / "overridden")]) == 0
    for i in range(2):
        assert np.array_equal(read_png(tmp_path / "overridden" / f"{i:05d}.png"),
                              read_png(tmp_path / "plain" / f"{i:05d}.png")), i
