"""Saving/loading, latent scaling, the stage-1 loss and a short training run of the KL autoencoder."""

import json
from pathlib import Path

import pytest
import torch

import autoencoder.io as ae_io
from autoencoder import (
    AutoencoderKL,
    autoencoder_loss,
    load_diffusers,
    load_pretrained,
    measure_scale_factor,
    save_pretrained,
    set_scale_factor,
    train_autoencoder,
)
from autoencoder.model import DiagonalGaussian

TINY = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU


def tiny_model(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY, **overrides})


def squares(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n images (n, 3, size, size) in [-1, 1]: a coloured square on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        background, foreground = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1  # (3, 1, 1) each
        side = int(torch.randint(4, 9, (1,), generator=g))
        y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        images[i] = background.expand(3, size, size)
        images[i, :, y : y + side, x : x + side] = foreground
    return images


def test_round_trip_keeps_outputs_and_scaling(tmp_path: Path) -> None:
    model = set_scale_factor(tiny_model(), 0.37, shift_factor=0.05)
    folder = save_pretrained(model, tmp_path / "vae")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "ldm-autoencoder-kl" and config["scale_factor"] == 0.37

    loaded = load_pretrained(folder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert (loaded.scale_factor, loaded.shift_factor) == (0.37, 0.05)
    x = squares(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        z = torch.randn(2, 4, 8, 8)
        assert torch.equal(loaded.decode(z), model.decode(z))

    save_pretrained(set_scale_factor(model, 0.5), folder)  # overwriting an existing folder
    assert load_pretrained(folder).scale_factor == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way to unpickle in this process is blocked while the folder loads: torch's loaders (under every name they
    are reachable by), pickle's and _pickle's functions and Unpickler, and numpy.load."""
    import _pickle
    import pickle

    import numpy

    model = tiny_model()
    folder = save_pretrained(model, tmp_path / "vae")
    used = []

    def refusing(name):
        def refuse(*args, **kwargs):
            used.append(name)
            raise AssertionError(f"{name} must not be used to load weights")
        return refuse

    for module, names in ((torch, ["load"]), (torch.serialization, ["load", "_load"]),
                          (pickle, ["load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"]),
                          (_pickle, ["load", "loads", "Unpickler"]), (numpy, ["load"])):
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refusing(f"{module.__name__}.{name}"))
    loaded = load_pretrained(folder)
    assert used == []
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_mismatched_checkpoint_names_the_keys(tmp_path: Path) -> None:
    folder = save_pretrained(tiny_model(), tmp_path / "vae")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ValueError, match="missing keys") as err:
        load_pretrained(folder)
    assert str(folder) in str(err.value) and "encoder.down_blocks.0.resnets.1.conv1.weight" in str(err.value)

    config_path.write_text(json.dumps({**config, "block_out_channels": [12, 16]}))
    with pytest.raises(ValueError, match="shape mismatches") as err:
        load_pretrained(folder)
    assert "encoder.conv_in.weight" in str(err.value)

    config_path.write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        load_pretrained(folder)


def test_failed_save_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ae_io, "write_json", crash)  # dies after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(tiny_model(), tmp_path / "vae")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    folder = save_pretrained(set_scale_factor(tiny_model(), 0.25), tmp_path / "vae")
    monkeypatch.setattr(ae_io, "write_json", crash)
    with pytest.raises(RuntimeError):
        save_pretrained(set_scale_factor(tiny_model(seed=1), 0.75), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # old version intact, no temp dirs
    assert load_pretrained(folder).scale_factor == 0.25

    monkeypatch.undo()
    real_replace = ae_io.os.replace

    def fail_final_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(ae_io.os, "replace", fail_final_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(set_scale_factor(tiny_model(seed=1), 0.75), folder)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    assert load_pretrained(folder).scale_factor == 0.25


def test_loads_a_diffusers_folder(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=4, scaling_factor=0.3, shift_factor=0.1,
    ).eval()
    reference.save_pretrained(tmp_path / "diffusers_vae")
    model = load_diffusers(tmp_path / "diffusers_vae")
    assert (model.scale_factor, model.shift_factor) == (0.3, 0.1)
    x = squares(1)
    with torch.no_grad():
        assert (model.encode_dist(x).mean - reference.encode(x).latent_dist.mean).abs().max() < 1e-5


def test_loss_parts() -> None:
    target = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(target, 0.5)
    posterior = DiagonalGaussian(torch.zeros(2, 8, 2, 2))  # N(0, I): KL = 0
    loss, parts = autoencoder_loss(recon, target, posterior, kl_weight=1.0, kind="l1")
    assert parts["rec"] == pytest.approx(0.5 * 48) and parts["rec_per_pixel"] == pytest.approx(0.5)
    assert parts["kl"] == 0.0 and loss.item() == pytest.approx(parts["loss"])
    _, parts = autoencoder_loss(recon, target, posterior, kind="l2")
    assert parts["rec_per_pixel"] == pytest.approx(0.25)
    shifted = DiagonalGaussian(torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], dim=1))
    loss, parts = autoencoder_loss(recon, target, shifted, kl_weight=0.1, kind="l1")
    assert parts["kl"] == pytest.approx(0.5 * 16) and parts["loss"] == pytest.approx(24 + 0.8)
    extra = {"perceptual": (2.0, lambda r, t: torch.ones(r.shape[0]))}
    _, parts = autoencoder_loss(recon, target, posterior, extra_terms=extra)
    assert parts["perceptual"] == 1.0 and parts["loss"] == pytest.approx(24 + 2.0)
    with pytest.raises(ValueError, match="l3"):
        autoencoder_loss(recon, target, posterior, kind="l3")


def test_training_reduces_reconstruction_and_scale_factor_normalises() -> None:
    data = squares(8)
    model = tiny_model()

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield data[torch.randint(0, len(data), (8,), generator=g)]  # (8, 3, 16, 16)

    def recon_error() -> float:
        with torch.no_grad():
            return (model.decode_raw(model.encode_dist(data).mode()) - data).abs().mean().item()

    before = recon_error()
    logged: list[int] = []
    metrics = train_autoencoder(
        model, batches(), steps=300, lr=5e-3, log_every=100, progress=False,
        on_log=lambda step, parts: logged.append(step),
    )
    after = recon_error()
    assert logged == [100, 200, 300] and metrics["steps"] == 300
    assert after < 0.4 * before, (before, after)

    scale = measure_scale_factor(model, (data[i : i + 4] for i in range(0, 8, 4)), max_batches=2)
    set_scale_factor(model, scale)
    with torch.no_grad():
        assert model.encode(data).std().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError):
        set_scale_factor(model, 0.0)


def test_training_stops_clearly_when_data_runs_out() -> None:
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        train_autoencoder(tiny_model(), iter([squares(2)] * 2), steps=5, progress=False)
