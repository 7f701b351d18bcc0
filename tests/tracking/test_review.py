"""ldm-review over real MLflow stores: two tiny training runs on a real `mlflow server` reviewed into one HTML
report (its DOM checked from the file: the report has no script), the report logged back as a review run; where
Chromium is installed, the same DOM checks on what headless Chromium renders and a screenshot (kept in
test-artifacts/review.png); a one-run sqlite experiment; clear errors; the pure selection logic."""

from __future__ import annotations

import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from ldm.report.plots import ema
from ldm.report.review import differing_params, evenly_spaced, matching_steps, sample_rows, sweep_params, sweep_rows
from ldm.tracking.query import RunSummary
from tests.conftest import ROOT, tiny_ldm_overrides

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("runs-table", "loss-curves", "sample-grids", "sweeps")


# --- pure logic ---------------------------------------------------------------------------------------
def test_differing_params():
    runs = {"a": {"train.lr": "0.001", "sampling.guidance": "4.0", "run.seed": "0"},
            "b": {"train.lr": "0.0005", "sampling.guidance": "4.0", "run.seed": "0", "extra": "x"},
            "c": {"train.lr": "0.001", "sampling.guidance": "4.0", "run.seed": "0"}}
    assert differing_params(runs) == ["extra", "train.lr"]  # a key missing from some run differs too
    assert differing_params({"a": runs["a"]}) == []
    assert differing_params({"a": runs["a"], "c": runs["c"]}) == []
    assert differing_params({}) == []
    both = {"a": {"train.lr": "0.001", "run.name": "x"}, "b": {"train.lr": "1e-3", "run.name": "y"}}
    assert differing_params(both) == ["run.name", "train.lr"]  # values are compared as logged
    assert sweep_params(both, ["run.name", "train.lr"]) == []  # 0.001 == 1e-3: no sweep; names are not numbers
    assert sweep_params(runs, ["train.lr", "extra"]) == ["train.lr"]


def test_matching_steps_and_sample_rows():
    assert matching_steps({"a": [1, 2, 3], "b": [2, 3, 4], "c": [3, 2]}) == [2, 3]
    assert matching_steps({"a": [1, 2], "b": []}) == [1, 2]  # a run with no samples does not block matching
    assert matching_steps({"a": [1], "b": [2]}) == []
    assert matching_steps({}) == []
    assert evenly_spaced(list(range(100, 1100, 100)), 4) == [100, 400, 700, 1000]
    assert evenly_spaced([5, 6], 4) == [5, 6] and evenly_spaced([5, 6, 7], 1) == [7]

    rows = sample_rows({"a": [1, 2, 3], "b": [3, 1], "c": []})
    assert rows == [("step 1", {"a": 1, "b": 1, "c": None}), ("step 3", {"a": 3, "b": 3, "c": None})]
    # no step in common: each run's latest grid, side by side
    assert sample_rows({"a": [1, 5], "b": [2, 4], "c": []}) == [("latest of each run", {"a": 5, "b": 4, "c": None})]
    assert sample_rows({"a": [], "b": []}) == []
    assert len(sample_rows({"a": range(50), "b": range(0, 50, 2)}, max_rows=3)) == 3


def test_ema_smoothing():
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    smooth = ema([4.0, 0.0, 0.0], 0.5)
    assert smooth[0] == 4.0 and smooth[1] == pytest.approx(4 / 3) and 0 < smooth[2] < smooth[1]
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


def test_eval_sweep_rows_and_plots(tmp_path):
    from ldm.report.plots import guidance_tradeoff, nfe_curves

    def point(sampler, steps, nfe, guidance, fid, acc):
        return RunSummary(run_id=f"{sampler}{steps}{guidance}", name="p", status="FINISHED", start_time=None,
                          params={"sampler": sampler, "steps": str(steps), "nfe": str(nfe), "guidance": str(guidance)},
                          metrics={"fid": fid, "probe_acc": acc, "probe_acc_real": 0.6, "probe_chance": 0.1})

    points = [point("heun_ode", 10, 19, 4.0, 30.0, 0.4), point("ddim", 25, 25, 4.0, 25.0, 0.45),
              point("ddim", 10, 10, 4.0, 40.0, 0.3), point("ddim", 25, 25, 0.0, 35.0, 0.1),
              point("heun_ode", 25, 49, 4.0, 24.0, 0.5)]
    rows = sweep_rows(points)
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        ("ddim", 10, 4.0), ("ddim", 25, 0.0), ("ddim", 25, 4.0), ("heun_ode", 10, 4.0), ("heun_ode", 25, 4.0)]
    assert rows[3] == {"sampler": "heun_ode", "steps": 10, "nfe": 19, "guidance": 4.0, "fid": 30.0, "probe_acc": 0.4,
                       "probe_acc_real": 0.6, "probe_chance": 0.1}
    for path in (guidance_tradeoff(rows, tmp_path / "g.png"), nfe_curves(rows, tmp_path / "n.png", ("ref", 22.0))):
        image = Image.open(path)
        assert image.format == "PNG" and image.width > 600 and len(image.convert("L").getcolors(1 << 16)) > 50


# --- a one-run experiment in the embedded sqlite store, and the errors ------------------------------
def test_single_run_sqlite_and_errors(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ldm.cli.review import main
    from ldm.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "solo", "only-run")
    rid = tracker.start({"train": {"lr": 0.001}, "sampling": {"guidance": 4.0}})
    for step, loss in enumerate([1.0, 0.8, 0.7], start=1):
        tracker.log_metrics({"train/loss": loss}, step)
    tracker.log_image(Image.new("RGB", (32, 16), (200, 40, 40)), "samples", 3)
    tracker.end()

    assert main(["--experiment", "solo", "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--smooth", "0.5"]) == 0
    text = (tmp_path / "r" / "report.html").read_text()
    assert all(f'id="{s}"' in text for s in SECTIONS) and "http" not in text.split("<body>")[0]  # no external refs
    assert "Only one run" in text and "no numeric parameter varies" in text.lower()
    assert (tmp_path / "r" / "metric_curves.png").is_file()
    assert (tmp_path / "r" / "grids" / f"only-run_{rid[:8]}_step0000003.png").is_file()
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("solo").experiment_id
    assert len(client.search_runs([exp_id], "tags.`ldm.review` = 'true'")) == 1

    # a second review leaves the review run out, reports the asked-for sweeps it cannot draw, and logs nothing
    assert main(["--experiment", "solo", "--tracking-uri", uri, "--out", str(tmp_path / "r2"), "--no-log-to-mlflow",
                 "--sweep-param", "sampling.guidance", "--sweep-param", "no.such"]) == 0
    assert "(1 run(s)" in capsys.readouterr().out.splitlines()[-1]
    text = (tmp_path / "r2" / "report.html").read_text()
    assert "fewer than two different values" in text and "No run has the parameter <code>no.such</code>" in text
    assert not list((tmp_path / "r2").glob("sweep_*"))
    assert len(client.search_runs([exp_id], "tags.`ldm.review` = 'true'")) == 1

    for argv, needle in ((["--experiment", "nope"], "no experiment named 'nope'"),
                         (["--experiment", "solo", "--runs", "0123456789abcdef"], "unknown run id 0123456789abcdef"),
                         (["--experiment", "solo", "--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}"],
                          "no MLflow database")):
        argv = [*argv, "--out", str(tmp_path / "bad")] + ([] if "--tracking-uri" in argv else ["--tracking-uri", uri])
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


# --- two real runs on a real server, rendered in Chromium -------------------------------------------
class _Dom(HTMLParser):
    """The elements of a page with the id of the <section> each lies in, and the text of header cells."""

    def __init__(self, text: str):
        super().__init__()
        self.section: str | None = None
        self.elements: list[tuple[str, dict, str | None]] = []
        self.headers: dict[str | None, list[str]] = {}
        self._in_th = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
        if tag == "th":
            self._in_th = True
            self.headers.setdefault(self.section, []).append("")
        self.elements.append((tag, attrs, self.section))

    def handle_endtag(self, tag):
        self._in_th = False if tag == "th" else self._in_th
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        if self._in_th:
            self.headers[self.section][-1] += data

    def find(self, tag: str, section: str) -> list[dict]:
        return [a for t, a, s in self.elements if t == tag and s == section]


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _check_dom(dom: _Dom, ids: list[str]) -> None:
    """The review of the two runs: its sections, one table row per run with the varying param and the loss, the loss
    curves, both runs' grids at the shared steps 1 and 2, the sweep figure; every image inline."""
    assert {a.get("id") for t, a, _ in dom.elements if t == "section"} >= set(SECTIONS)
    rows = [a for a in dom.find("tr", "runs-table") if a.get("class") == "run"]
    assert sorted(a["data-run"] for a in rows) == sorted(ids)  # one row per run
    assert "train.lr" in dom.headers["runs-table"] and "train/loss" in dom.headers["runs-table"]
    assert "sampling.guidance" not in dom.headers["runs-table"]  # the same in both runs: not a column
    curves = dom.find("img", "loss-curves")
    assert len(curves) == 1 and curves[0]["src"].startswith("data:image/png;base64,") and curves[0]["alt"]
    grids = dom.find("img", "sample-grids")
    assert sorted(a["data-run"] for a in grids) == sorted(ids * 2)  # both runs at the shared steps 1 and 2
    assert all(a["alt"] and a["src"].startswith("data:image/png;base64,") for a in grids)
    assert len(dom.find("img", "sweeps")) == 1


@pytest.fixture(scope="module")
def served_review(tmp_path_factory, tiny_shards, tiny_autoencoder, mlflow_server):
    """Two tiny runs (lr 5e-4 and 5e-3) on the real server, reviewed: (report folder, run ids, experiment id)."""
    from mlflow.tracking import MlflowClient

    from ldm.cli.review import main as review_main
    from ldm.cli.train import main as train_main

    tmp_path = tmp_path_factory.mktemp("review")
    ids = []
    client = MlflowClient(tracking_uri=mlflow_server)
    for name, lr in (("lr-low", "5.0e-4"), ("lr-high", "5.0e-3")):
        assert train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"),
                           *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / name, mlflow_server),
                           f"run.name={name}", "train.max_steps=2", "train.sample_every=1",
                           f"train.lr={lr}", "tracking.experiment=review-lr"]) == 0
        exp_id = client.get_experiment_by_name("review-lr").experiment_id
        ids.append(client.search_runs([exp_id], order_by=["attributes.start_time DESC"])[0].info.run_id)

    out = tmp_path / "report"
    assert review_main(["--experiment", "review-lr", "--tracking-uri", mlflow_server, "--out", str(out),
                        "--smooth", "0.3"]) == 0  # sweeps: every numeric param that varies, here train.lr
    return out, ids, exp_id


def test_review_of_served_runs(served_review, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, ids, exp_id = served_review
    client = MlflowClient(tracking_uri=mlflow_server)
    report = out / "report.html"
    text = report.read_text()
    assert f"<code>{mlflow_server}</code>" in text and "review-lr" in text
    assert "src=\"http" not in text and "<link" not in text and "<script" not in text  # self-contained
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(["metric_curves.png", "sweep_train.lr.png",
                           *(f"grids/{n}_{i[:8]}_step{s:07d}.png" for n, i in zip(("lr-low", "lr-high"), ids)
                             for s in (1, 2))])

    # the report and figures were logged back as a review run
    reviews = client.search_runs([exp_id], "tags.`ldm.review` = 'true'")
    assert len(reviews) == 1 and reviews[0].info.run_name == "review" and reviews[0].info.status == "FINISHED"
    logged = {f.path for f in client.list_artifacts(reviews[0].info.run_id)}
    logged |= {f.path for f in client.list_artifacts(reviews[0].info.run_id, "grids")}
    assert {"report.html", *pngs} <= logged
    _check_dom(_Dom(text), ids)  # the report has no script: the parsed file is the DOM a browser builds


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (the Debian package `chromium`): the "
                    "DOM is checked from the HTML by test_review_of_served_runs; here: the rendered DOM and a screenshot")
def test_review_renders_in_chromium(served_review, tmp_path):
    out, ids, _ = served_review
    report = out / "report.html"
    dump = _chromium("--dump-dom", report.as_uri(), profile=tmp_path / "chrome-dom")
    assert dump.returncode == 0 and "<html" in dump.stdout, dump.stderr[-2000:]
    _check_dom(_Dom(dump.stdout), ids)

    shot = tmp_path / "review.png"
    res = _chromium("--screenshot=" + str(shot), "--window-size=1280,2000", "--hide-scrollbars", report.as_uri(),
                    profile=tmp_path / "chrome-shot")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    keep = ROOT / "test-artifacts" / "review.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, keep)
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1280, 2000)
    image = Image.open(shot).convert("L")
    colours = image.getcolors(maxcolors=1 << 16)
    assert shot.stat().st_size > 20_000 and (colours is None or len(colours) > 50)  # a rendered page, not blank
