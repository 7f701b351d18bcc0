"""The evaluation protocol's statistics on real emoji with the real Inception-v3: an independent draw of real images
scores inside the printed real-vs-real floor interval; deliberately worse generators (blurred images, permuted
colour channels) are separated from it beyond the interval; the floor set scores exactly the floor; the
classifier's ceiling is measured on images it did not train on; the real sets come from the cache the second time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.eval import prepare_evaluator as Evaluator
from ldm.eval.inception import InceptionFeatures
from ldm.eval.realset import read_split, split_pool

N = 48  # images per set: floor, reference, and each scored "generator"


class Images:
    """A stand-in pipeline whose generate() returns given images (the protocol only sees images)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def generate(self, prompts, seeds, **settings):
        assert len(prompts) == len(seeds) == len(self.images)
        return self.images


def _blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)


@pytest.fixture(scope="module")
def protocol(protocol_shards, tmp_path_factory):
    cache = tmp_path_factory.mktemp("protocol_cache")
    evaluator = Evaluator(str(protocol_shards), image_size=32, num_images=N, reference_images=N, bootstrap=40,
                          batch_size=N, cache_dir=cache, progress=False)
    pool = read_split(str(protocol_shards), "train", 32, progress=False)
    split = split_pool(len(pool), N, N, seed=0)
    return evaluator, pool, split, cache


def test_real_draw_inside_the_floor_interval_worse_generators_beyond_it(protocol):
    evaluator, pool, split, _ = protocol
    assert [pool.keys[i] for i in split.floor] == evaluator.floor.keys  # the same seeded split every time
    floor_images = pool.subset(split.floor).floats()

    same, _ = evaluator.score(floor_images)  # the floor set itself: exactly the floor
    assert same["fid"] == pytest.approx(same["fid_floor"], rel=1e-9)
    assert same["class_acc"] == pytest.approx(same["class_acc_real"])

    real, _ = evaluator.score(pool.subset(split.rest[:N]).floats())  # another draw of real images
    for metric in ("fid", "kid"):
        assert real[f"{metric}_floor_lo"] <= real[metric] <= real[f"{metric}_floor_hi"], (metric, real)
        assert real[f"{metric}_lo"] < real[metric] < real[f"{metric}_hi"]

    blurred, _ = evaluator.score(_blur(floor_images))
    assert blurred["fid_lo"] > blurred["fid_floor_hi"], blurred  # separated beyond both intervals
    assert blurred["kid_lo"] > blurred["kid_floor_hi"], blurred
    permuted, _ = evaluator.score(floor_images[:, [2, 0, 1]])
    # at 48 images FID's small-sample bias hides most of a colour permutation; the unbiased KID separates it
    assert permuted["kid_lo"] > permuted["kid_floor_hi"], permuted
    assert permuted["fid"] > permuted["fid_floor"] and permuted["class_acc"] < permuted["class_acc_real"]


def test_classifier_ceiling_is_measured_on_images_it_did_not_train_on(protocol):
    evaluator, pool, split, _ = protocol
    trained_on = set(evaluator.real_alignment["classifier_keys"])
    assert trained_on == {pool.keys[i] for i in split.reference + split.rest}
    assert trained_on.isdisjoint(evaluator.floor.keys)
    metrics, _ = evaluator.score(pool.subset(split.floor).floats())
    assert metrics["class_chance"] < metrics["class_acc_real"] <= 1.0  # better than always guessing one label
    assert metrics["class_acc_lo"] <= metrics["class_acc"] <= metrics["class_acc_hi"]


def test_real_sets_and_classifier_come_from_the_cache(protocol, protocol_shards):
    evaluator, _, _, cache = protocol

    class NoNetwork(InceptionFeatures):
        def __init__(self, path=None, device="cpu", batch_size=32):  # the real network's identity, computing fails
            self.path, self.hash, self.batch_size = evaluator.inception.path, evaluator.inception.hash, batch_size

        def __call__(self, images):
            raise AssertionError("features were recomputed instead of read from the cache")

    import ldm.eval.prepare as evaluate_mod

    real_class = evaluate_mod.InceptionFeatures
    evaluate_mod.InceptionFeatures = NoNetwork
    try:
        again = Evaluator(str(protocol_shards), image_size=32, num_images=N, reference_images=N, bootstrap=40,
                          batch_size=N, cache_dir=cache, progress=False)
    finally:
        evaluate_mod.InceptionFeatures = real_class
    assert again.folder == evaluator.folder and again.prompts == evaluator.prompts
    assert torch.equal(again.reference.features, evaluator.reference.features)
    assert again.real_alignment == evaluator.real_alignment
    # the key follows the settings: another seed or set size is another cache entry
    other = Evaluator(str(protocol_shards), image_size=32, num_images=N, reference_images=N, seed=1, bootstrap=0,
                      batch_size=N, cache_dir=cache, progress=False, classifier=False)
    assert other.folder != evaluator.folder and other.prompts != evaluator.prompts
