"""ldm-likelihood on the tiny trained LDM: bits/dim and the ELBO written to JSON and PNG, logged to an sqlite MLflow
store and read back with MlflowClient; bad usage exits 2 with a message naming the problem."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from ldm.cli.likelihood import main


def test_likelihood_cli_writes_and_logs(tmp_path, tiny_ldm_run, one_thread, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["--model", str(tiny_ldm_run / "export"), "--batches", "1", "--batch-size", "2", "--ode-steps", "2",
               "--elbo-terms", "3", "--hutchinson-probes", "2", "--seed", "7", "--tracking-uri", uri,
               "--experiment", "likelihood-test", "--out", str(tmp_path / "out")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ODE   bits/dim" in printed and "ELBO  bits/dim" in printed

    result = json.loads((tmp_path / "out" / "likelihood.json").read_text())
    summary, rows, settings = result["summary"], result["samples"], result["settings"]
    dim = settings["dim"]
    assert dim == 4 * 8 * 8 and settings["samples"] == len(rows) == 2 and settings["condition"] == "caption"
    for row in rows:
        assert math.isclose(row["ode_bpd"], -row["ode_logp"] / (dim * math.log(2)), rel_tol=1e-6)  # float32
        assert math.isclose(row["elbo"], -(row["elbo_prior_kl"] + row["elbo_diffusion_kl"] + row["elbo_decoder_nll"]),
                            rel_tol=1e-9)
        assert row["elbo_prior_kl"] > 0 and row["elbo_diffusion_kl"] > 0 and row["caption"]
    assert math.isclose(summary["ode_bpd"], sum(r["ode_bpd"] for r in rows) / 2, rel_tol=1e-12)
    assert math.isfinite(summary["elbo_bpd"]) and summary["ode_nfe"] == 8  # RK4: 4 evaluations x 2 steps
    with Image.open(tmp_path / "out" / "likelihood.png") as im:
        assert im.format == "PNG" and im.width > 300

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("likelihood-test").experiment_id])[0]
    for key in ("ode_bpd", "elbo_bpd", "elbo_prior_kl_nats", "ode_nfe"):
        assert math.isclose(run.data.metrics[f"likelihood/{key}"], summary[key], rel_tol=1e-9), key
    assert run.data.params["likelihood.trace"] == "hutchinson x 2"
    assert run.data.params["model_config.diffusion.process"] == "discrete"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "likelihood")) == \
        ["likelihood/likelihood.json", "likelihood/likelihood.png"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/model"], "--model: no such folder /no/such/model"),
    (["--model", ".", "--batches", "0"], "--batches must be positive"),
    (["--model", ".", "--rtol", "0"], "--rtol and --atol must be positive"),
    (["--model", ".", "--exact-trace", "--hutchinson-probes", "3"], "not allowed with argument"),
])
def test_bad_usage_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_folder_without_a_model_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--no-tracking"])
    assert exit_info.value.code == 2
    assert "no config.yaml" in capsys.readouterr().err
