"""ldm-eval end to end on the tiny trained model: a guidance sweep logged as nested runs on a real `mlflow server`
and drawn by ldm-review; evaluation during training; CLIP score against open_clip's own preprocessing; clear
usage errors. A tiny TorchScript network stands in for Inception (``--inception PATH``): the metric values are
tested in test_metrics.py and test_inception_probe.py, here only how they flow."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import ROOT, tiny_ldm_overrides
from tests.eval.conftest import TINY_CLIP

METRICS = {*(f"{m}{part}" for m in ("fid", "kid", "fid_floor", "kid_floor") for part in ("", "_lo", "_hi")),
           "class_acc", "class_acc_lo", "class_acc_hi", "class_acc_real", "class_chance", "classifier_images",
           "num_images", "reference_images", "clip_score"}


def test_guidance_sweep_logs_nested_runs_and_the_review_plots_them(tmp_path, tiny_ldm_run, eval_shards,
                                                                    tiny_inception, tiny_clip, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    from ldm.cli.evaluate import main
    from ldm.cli.review import main as review_main

    out = tmp_path / "eval"
    assert main(["--model", str(tiny_ldm_run / "export"), "--data", str(eval_shards),
                 "--inception", str(tiny_inception), "--clip", str(tiny_clip), "--clip-model", TINY_CLIP,
                 "--num-images", "4", "--reference-images", "4", "--bootstrap", "5", "--sampler", "ddim",
                 "--steps", "2", "--sweep", "guidance=0,4", "--cache-dir", str(tmp_path / "cache"),
                 "--tracking-uri", mlflow_server, "--experiment", "eval-sweep", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fid_floor" in printed and "ceiling %" in printed and "logged as run" in printed

    saved = json.loads((out / "metrics.json").read_text())
    rows = {row["guidance"]: row for row in saved["points"]}
    assert set(rows) == {0.0, 4.0} and saved["settings"]["num_images"] == 4
    assert {p.name for p in out.glob("*.png")} == {"grid_ddim-2-g0.png", "grid_ddim-2-g4.png", "guidance_tradeoff.png",
                                                   "eval.png"}
    table = (out / "eval.md").read_text()
    assert table.count("\n| ddim |") == 2 and "fid_floor" in table  # one Markdown row per point
    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.get_experiment_by_name("eval-sweep").experiment_id
    parents = client.search_runs([exp_id], "tags.`ldm.eval` = 'true'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["num_images"] == "4" and parents[0].data.params["inception"] == str(tiny_inception)
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 2
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        assert child.info.status == "FINISHED"
        assert params["sampler"] == "ddim" and params["steps"] == "2" and params["nfe"] == "2"
        row = rows[float(params["guidance"])]
        assert set(metrics) == METRICS
        assert all(metrics[k] == pytest.approx(row[k]) for k in METRICS)
        assert metrics["fid"] > 0 and 0 <= metrics["class_acc"] <= 1 and 0 <= metrics["clip_score"] <= 100
        assert metrics["fid_lo"] < metrics["fid"] < metrics["fid_hi"] and metrics["fid_floor"] > 0
        assert 0.25 <= metrics["class_chance"] <= 1  # 4 prompts over at most 4 subcategories
    assert rows[0.0]["fid"] != rows[4.0]["fid"]  # guidance changes the images
    assert rows[0.0]["class_acc_real"] == rows[4.0]["class_acc_real"]  # the same real images for every point
    assert rows[0.0]["fid_floor"] == rows[4.0]["fid_floor"]

    report = tmp_path / "review"
    assert review_main(["--experiment", "eval-sweep", "--tracking-uri", mlflow_server, "--out", str(report),
                        "--no-log-to-mlflow"]) == 0
    text = (report / "report.html").read_text()
    section = text[text.index('id="eval-sweeps"'):]
    assert section.count("<tr>") == 3  # header and one row per point
    plot = report / f"eval_sweep_{parents[0].info.run_id[:8]}_guidance.png"
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert not list(report.glob("eval_sweep_*_nfe.png"))  # one NFE only: no NFE plot
    assert "1 run(s)" in capsys.readouterr().out  # the nested points are not runs of their own in the review


def test_training_evaluates_at_the_interval(tmp_path, tiny_shards, tiny_autoencoder, eval_shards, tiny_inception):
    from mlflow.tracking import MlflowClient

    from ldm.cli.train import main as train_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"),
                       *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", uri),
                       "train.max_steps=2", "eval.every=1", "eval.num_images=2", "eval.reference_images=3",
                       "eval.steps=2", "eval.bootstrap=0", f"eval.data={eval_shards}", "eval.classifier=false",
                       f"eval.inception={tiny_inception}", f"eval.cache_dir={tmp_path / 'cache'}",
                       "tracking.experiment=train-eval"]) == 0
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("train-eval").experiment_id])[0]
    for key in ("eval/fid", "eval/kid"):
        history = client.get_metric_history(run.info.run_id, key)
        # finite: MLflow stores NaN as NaN but an infinity as the largest float (1.8e308), so a bound, not isfinite alone
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) and abs(m.value) < 1e6
                                                           for m in history), [m.value for m in history]
    assert "eval/class_acc" not in run.data.metrics


def test_clip_score_matches_open_clip_preprocessing(tiny_clip, eval_shards):
    import open_clip
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from ldm.eval.clip_score import ClipScorer
    from ldm.eval.realset import read_split

    real = read_split(str(eval_shards), "val", 32, progress=False)
    images, prompts = real.images[:6].float() / 255, real.captions[:6]
    scores = ClipScorer(tiny_clip, TINY_CLIP)(images, prompts)  # 32 px -> the model's 24 px
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    model.load_state_dict(load_file(str(tiny_clip)))
    with torch.no_grad():
        pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in real.images[:6]]
        pixels = torch.stack([preprocess(p) for p in pil])  # (6, 3, 24, 24)
        image = torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts)), dim=-1)
    reference = 100 * (image * text).sum(dim=-1).clamp_min(0)
    assert scores.shape == (6,) and (scores > 0).any()
    torch.testing.assert_close(scores, reference, atol=0.1, rtol=0)

    broken = tiny_clip.parent / "broken.safetensors"
    state = load_file(str(tiny_clip))
    state.pop("logit_scale")
    save_file(state, str(broken))
    with pytest.raises(ValueError, match="missing keys \\['logit_scale'\\]"):
        ClipScorer(broken, TINY_CLIP)
    with pytest.raises(ValueError, match="unknown OpenCLIP architecture 'no-such-clip'"):
        ClipScorer(tiny_clip, "no-such-clip")


def test_usage_errors_exit_2(tmp_path, tiny_ldm_run, capsys):
    from ldm.cli.evaluate import main

    model = str(tiny_ldm_run / "export")
    (tmp_path / "bad.pt").write_bytes(b"not a network")
    cases = ((["--model", str(tmp_path / "missing")], "--model: no such folder"),
             (["--model", model, "--sweep", "guidance=0,a"], "--sweep: sweep guidance: 'a' is not a number"),
             (["--model", model, "--sweep", "cfg=1,2"], "unknown key 'cfg'"),
             (["--model", model, "--sweep", "sampler=ddim,fast"], "unknown sampler 'fast'"),
             (["--model", model, "--num-images", "1"], "--num-images must be at least 2"),
             (["--model", model, "--guidance", "nan"], "--guidance: must be a finite number"),
             (["--model", model, "--steps", "5000", "--no-tracking"], "--steps: steps must be in [1, 1000]"),
             (["--model", model, "--device", "bogus"], "--device: unknown device 'bogus'"),
             (["--model", model, "--inception", str(tmp_path / "nope.pt")], "--inception: no such file"),
             (["--model", model, "--data", str(tmp_path / "nodata"), "--no-tracking"], "no shards match"),
             (["--model", model, "--inception", str(tmp_path / "bad.pt"), "--no-tracking"],
              "bad.pt is not a TorchScript feature network"),
             (["--model", str(tmp_path)], "neither an exported model folder nor a training run"))
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        last = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]  # after any loading bars
        assert e.value.code == 2 and last.startswith("error:") and needle in last, (argv, last)
