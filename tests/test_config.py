"""Config validation: unknown keys and wrong types stop a run at start with exit code 2 naming the key."""

import subprocess
import sys

import pytest

from ldm.config import AutoencoderConfig, ConfigError, LDMConfig, load_config
from tests.conftest import ROOT


@pytest.mark.parametrize("path", ["configs/ldm/emoji.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(LDMConfig, ROOT / path)
    assert cfg.model.preset == "emoji-cpu"
    assert load_config(AutoencoderConfig, ROOT / "configs/autoencoder/emoji.yaml").model.latent_channels == 8


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("train.max_steps=many", "train.max_steps"),
    ("diffusion.prediction=noise", "diffusion.prediction"),
    ("model.block_out_channels=[64, x]", "model.block_out_channels[1]"),
    ("diffusion.cond_dropout=1.5", "diffusion.cond_dropout"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", [override])


def test_cli_exits_2_on_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "configs/ldm/emoji.yaml").read_text()
    assert "\ntrain:\n" in text
    bad.write_text(text.replace("\ntrain:\n", "\ntrain:\n  lr_warmup: 3\n"))
    proc = subprocess.run([sys.executable, "-m", "ldm.cli.train", "--config", str(bad)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config: train.lr_warmup: unknown key")


def test_cli_exits_2_on_missing_file_and_bad_sampler():
    proc = subprocess.run([sys.executable, "-m", "ldm.cli.train", "--config", "nope.yaml"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ldm.cli.sample", "--model", ".", "--prompt", "x", "--sampler",
                           "magic"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "magic" in proc.stderr
