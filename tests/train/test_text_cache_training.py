"""Training from cached text embeddings (`ldm-shards text`): the same loss sequence as encoding on the fly with the
same seed, no text encoder built before the last step (only the final sample grid needs one), latents + text from
one cache, and a cache of another encoder refused at start with both fingerprints (exit 2, nothing loaded)."""

from __future__ import annotations

import math
import shutil

import pytest

import ldm.assemble.text_encoders as assemble_mod
import ldm.train.trainer as trainer_mod
from ldm.cli.shards import main as shards_main
from ldm.cli.train import main as train_main
from ldm.config import LDMConfig, load_config
from tests.conftest import ROOT, tiny_ldm_overrides

CONFIG = str(ROOT / "configs/ldm/emoji.yaml")
STEPS = ("train.max_steps=3", "train.ckpt_every=3", "train.grad_accum=2")


def _overrides(shards, autoencoder, out, *extra) -> list[str]:
    return [*tiny_ldm_overrides(shards, autoencoder, out, None), *STEPS, *extra]


def _train(monkeypatch, overrides) -> tuple[list[float], list[int]]:
    """Train through `ldm-train`; returns each micro-step's loss and, per text-encoder build, how many had run."""
    losses, builds = [], []
    real_step, real_build = trainer_mod.Trainer.micro_step, assemble_mod.build_text_encoder

    def step(self, batch):
        loss = real_step(self, batch)
        losses.append(float("nan") if loss is None else float(loss))
        return loss

    def build(*args, **kwargs):
        builds.append(len(losses))
        return real_build(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_mod.Trainer, "micro_step", step)
        patch.setattr(assemble_mod, "build_text_encoder", build)
        assert train_main(["--config", CONFIG, *overrides]) == 0
    return losses, builds


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory, tiny_shards, tiny_autoencoder):
    out = tmp_path_factory.mktemp("text_cache") / "cache"
    overrides = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out.parent / "unused", None)
    assert shards_main(["text", "--config", CONFIG, "--data", str(tiny_shards), "--out", str(out), *overrides]) == 0
    return out


def test_cached_text_trains_the_same_losses_without_a_text_encoder(tmp_path, tiny_shards, tiny_autoencoder,
                                                                   text_cache, monkeypatch):
    fresh, fresh_builds = _train(monkeypatch, _overrides(tiny_shards, tiny_autoencoder, tmp_path / "fresh"))
    cached, cached_builds = _train(monkeypatch, _overrides(tiny_shards, tiny_autoencoder, tmp_path / "cached",
                                                           f"data.text_cache={text_cache}"))
    assert len(fresh) == len(cached) == 6 and all(math.isfinite(v) for v in fresh)
    assert cached == pytest.approx(fresh, rel=1e-5, abs=1e-7)  # cond dropout included: same keys, same draws
    assert fresh_builds == [0]  # on the fly: built at the start
    assert cached_builds == [6]  # from the cache: only after the last step, for the final sample grid
    from safetensors.torch import load_file

    null = [load_file(str(tmp_path / run / "null_condition.safetensors")) for run in ("fresh", "cached")]
    assert null[0].keys() == null[1].keys() and all((null[0][k] == null[1][k]).all() for k in null[0])


def test_latents_and_text_from_one_cache(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    latents = tmp_path / "latents"
    assert shards_main(["latents", "--data", str(tiny_shards), "--autoencoder", str(tiny_autoencoder), "--out",
                        str(latents), "--image-size", "16"]) == 0
    cache = tmp_path / "cache"
    overrides = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "unused", None)
    assert shards_main(["text", "--config", CONFIG, "--data", str(latents), "--out", str(cache), *overrides]) == 0
    from autoencoder import AutoencoderKL

    encoded, real_encode = [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: encoded.append(x.shape) or real_encode(self, x))
    losses, builds = _train(monkeypatch, _overrides(tiny_shards, tiny_autoencoder, tmp_path / "run",
                                                    f"data.text_cache={cache}"))
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert encoded == [] and builds == [6]  # neither the autoencoder's encoder nor a text encoder ran for training


def test_a_cache_of_another_encoder_is_refused_with_both_fingerprints(tmp_path, tiny_shards, tiny_autoencoder,
                                                                     text_cache, capsys, monkeypatch):
    from ldm.conditioning import default_text_encoder_path

    copy = tmp_path / "minilm"
    shutil.copytree(default_text_encoder_path(), copy)
    base = _overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", f"data.text_cache={text_cache}")
    same = load_config(LDMConfig, CONFIG, [*base, f"text_encoder.path={copy}"])
    original = load_config(LDMConfig, CONFIG, base)
    assert assemble_mod.text_fingerprint(same.text_encoder) == assemble_mod.text_fingerprint(original.text_encoder)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1  # one bit of one weight: same architecture, other weights (the file is never loaded)
    weights.write_bytes(bytes(data))
    other = load_config(LDMConfig, CONFIG, [*base, f"text_encoder.path={copy}"])
    theirs, ours = (assemble_mod.text_fingerprint(c.text_encoder) for c in (original, other))
    assert theirs != ours
    built = []
    monkeypatch.setattr(assemble_mod, "build_text_encoder", lambda *a, **k: built.append(1))
    for overrides in ([f"text_encoder.path={copy}"], ["text_encoder.max_length=10"]):
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--config", CONFIG, *base, *overrides])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and line.startswith("error: config: data.text_cache:"), line
        expected = assemble_mod.text_fingerprint(load_config(LDMConfig, CONFIG, [*base, *overrides]).text_encoder)
        assert theirs[:16] in line and expected[:16] in line, line
    assert built == [] and not (tmp_path / "run").exists()  # refused before anything loaded or was written


def test_text_cache_cli_usage_errors(tmp_path, tiny_shards, capsys):
    for argv, needle in ((["text", "--out", str(tmp_path / "o")], "--config"),
                         (["text", "--config", CONFIG, "--out", str(tmp_path / "o"), "--data", str(tmp_path / "none")],
                          "no shards"),
                         (["text", "--config", CONFIG, "--out", str(tmp_path / "o"), "--data", str(tiny_shards),
                           "text_encoder.kind=bert"], "text_encoder.kind"),
                         (["text", "--config", CONFIG, "--out", str(tmp_path / "o"), "--dtype", "int8"], "--dtype")):
        try:
            code = shards_main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()
