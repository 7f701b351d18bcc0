"""ldm-eval's --guidance-rescale, --guidance-interval and --time-shift reach every pipeline call of the evaluation and
are recorded with its settings (their usage errors: tests/cli/test_guidance_flags.py)."""

from __future__ import annotations

import json
import math

from tests.cli.test_guidance_flags import FLAGS


def test_eval_flags_reach_the_pipeline(tmp_path, tiny_ldm_run, eval_shards, tiny_inception, monkeypatch):
    import ldm.pipeline as pipeline_mod
    from ldm.cli.evaluate import main as eval_main

    calls = []
    real = pipeline_mod.TextToImage.__call__

    def spy(self, prompts, **kwargs):
        calls.append(kwargs)
        return real(self, prompts, **kwargs)

    monkeypatch.setattr(pipeline_mod.TextToImage, "__call__", spy)
    out = tmp_path / "eval"
    assert eval_main(["--model", str(tiny_ldm_run / "export"), "--data", str(eval_shards), "--inception",
                      str(tiny_inception), "--num-images", "2", "--reference-images", "2", "--bootstrap", "0",
                      "--no-classifier", "--sampler", "ddim", "--steps", "2", "--no-tracking",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *FLAGS]) == 0
    assert calls and all(c["guidance_rescale"] == 0.7 and tuple(c["guidance_interval"]) == (0.5, float("inf"))
                         and c["time_shift"] == 2.0 for c in calls)
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["guidance_rescale"] == 0.7 and settings["time_shift"] == 2.0
    assert settings["guidance_interval"] == [0.5, float("inf")]
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["points"][0]["fid"])
