"""The evaluation protocol's fixed parts, prepared once: the feature network, the real floor and reference sets with
their features and the floor's own scores, and the alignment classifier with its ceiling and chance. Each is read
from the cache when it is there, else computed from the real images and cached (``realset``); the ``Evaluator`` is
then built from them and does no I/O of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.eval.classifier import ARCH, LabelClassifier, chance_level, train_classifier
from ldm.eval.evaluate import Evaluator
from ldm.eval.inception import InceptionFeatures
from ldm.eval.metrics import fid_kid_bootstrap
from ldm.eval.realset import (
    RealSet, Split, cache_key, default_cache_dir, load_features, read_split, resolve_shards, save_features, shards_hash,
    split_pool,
)
from ldm.eval.tuning import TUNING_SEED_OFFSET, tuning_indices
from ldm.io import atomic_write_bytes

PROMPT_SETS = ("scored", "tuning")  # the floor set's captions, or the tuning set's (ldm.eval.tuning)

CLASSIFIER_POOL = 50_000  # at most this many real images are read for the classifier (plus the floor and reference)


def prepare_evaluator(data: str, *, image_size: int, caption: str = "label", num_images: int = 1000,
                      reference_images: int = 1000, seed: int = 0, inception: str | Path | None = None,
                      classifier: bool = True, classifier_label: str = "subcategory", bootstrap: int = 50,
                      clip: str | Path | None = None, clip_model: str = "ViT-B-32", batch_size: int = 100,
                      cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                      progress: bool = True, prompt_set: str = "scored") -> Evaluator:
    """The protocol on the training split of ``data``: ``num_images`` prompts (the floor set's captions) and seeds,
    FID/KID against ``reference_images`` real images, the alignment classifier (``classifier``) and CLIP score
    (``clip`` weights), all fixed by ``seed``; cached under ``cache_dir`` by a hash of everything they depend on.

    ``prompt_set="tuning"``: the same protocol on the tuning set instead of the floor set (``ldm.eval.tuning``: rest
    images whose captions are not scored prompts, seeds offset by ``TUNING_SEED_OFFSET``), for choosing how a model
    is sampled without looking at the scored prompts; its own floor is its real images against the reference set."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    if num_images < 2 or reference_images < 2:
        raise ValueError(f"FID needs at least 2 images per set, got num_images={num_images}, "
                         f"reference_images={reference_images}")
    network = InceptionFeatures(inception, device, batch_size)
    key = cache_key(kind="eval-v2", shards=shards_hash(resolve_shards(data, "train")), image_size=image_size,
                    caption=caption, label=classifier_label, floor=num_images, reference=reference_images, seed=seed,
                    inception=network.hash)
    folder = Path(cache_dir or default_cache_dir()) / key
    floor, reference = load_features(folder, "floor"), load_features(folder, "reference")
    pool = split = None
    if floor is None or reference is None or (classifier and not _classifier_file(folder).is_file()):
        limit = num_images + reference_images + (CLASSIFIER_POOL if classifier else 0)
        pool = read_split(data, "train", image_size, caption, classifier_label, limit=limit, progress=progress)
        split = split_pool(len(pool), num_images, reference_images, seed)
    if floor is None or reference is None:
        floor, reference = _real_features(network, pool, split, folder, data, bootstrap, seed, progress)
    floor_scores = json.loads((folder / "floor.json").read_text())["scores"]
    label_classifier, real_alignment = None, {}
    if classifier:
        label_classifier, real_alignment = _alignment_classifier(folder, pool, split, floor.labels, classifier_label,
                                                                 data, seed, progress)
    if prompt_set == "tuning":  # the classifier's ceiling stays the floor set's (it was trained on the rest)
        tuning = load_features(folder, "tuning")
        if tuning is None:
            pool = read_split(data, "train", image_size, caption, classifier_label,
                              limit=num_images + reference_images + CLASSIFIER_POOL, progress=progress)
            split = split_pool(len(pool), num_images, reference_images, seed)
            tuning = _tuning_features(network, pool, split, floor, reference, folder, num_images, bootstrap, seed,
                                      progress)
        floor, floor_scores = tuning, json.loads((folder / "tuning.json").read_text())["scores"]
    clip_scorer = None
    if clip is not None:
        from ldm.eval.clip_score import ClipScorer

        clip_scorer = ClipScorer(clip, clip_model, device)
    return Evaluator(network, floor, reference, floor_scores, label_classifier, real_alignment, clip_scorer,
                     seed=seed + (TUNING_SEED_OFFSET if prompt_set == "tuning" else 0), bootstrap=bootstrap,
                     batch_size=batch_size, progress=progress, folder=folder)


def _classifier_file(folder: Path) -> Path:
    return folder / f"{ARCH}.safetensors"


def _real_features(network: InceptionFeatures, pool: RealSet, split: Split, folder: Path, data: str, bootstrap: int,
                   seed: int, progress: bool) -> tuple[RealSet, RealSet]:
    """The floor and reference sets with their Inception features, and the floor's scores, computed and cached."""
    floor, reference = pool.subset(split.floor), pool.subset(split.reference)
    for name, real in (("floor", floor), ("reference", reference)):
        real.features = network.features(real.floats(), desc=f"inception (real {name} set)", progress=progress)
    floor_scores = fid_kid_bootstrap(floor.features, reference.features, bootstrap, seed)
    save_features(folder, "reference", reference)
    save_features(folder, "floor", floor, {"scores": floor_scores, "data": str(data)})
    return floor, reference


def _tuning_features(network: InceptionFeatures, pool: RealSet, split: Split, floor: RealSet, reference: RealSet,
                     folder: Path, num_images: int, bootstrap: int, seed: int, progress: bool) -> RealSet:
    """The tuning set (as many images as the floor set, fewer when the rest is short) with its features and its own
    floor against the reference set, computed and cached. Whatever pool the cached sets were drawn from, no tuning
    image is one of theirs and no tuning caption is a scored prompt."""
    scored, used = set(floor.captions), set(floor.keys) | set(reference.keys)
    indices = [i for i in tuning_indices(pool.captions, split.floor, split.rest, len(pool))
               if pool.captions[i] not in scored and pool.keys[i] not in used][:num_images]
    if len(indices) < 2:
        raise ValueError(f"the tuning set needs real images outside the floor and reference sets whose captions are "
                         f"not scored prompts; the data has {len(indices)}")
    tuning = pool.subset(indices)
    tuning.features = network.features(tuning.floats(), desc="inception (real tuning set)", progress=progress)
    save_features(folder, "tuning", tuning, {"scores": fid_kid_bootstrap(tuning.features, reference.features,
                                                                         bootstrap, seed)})
    return tuning


def _alignment_classifier(folder: Path, pool: RealSet | None, split: Split | None, floor_labels: list[str],
                          label: str, data: str, seed: int, progress: bool) -> tuple[LabelClassifier, dict]:
    """(classifier, its ceiling and chance) from the cache, else trained on every pool image outside the floor set,
    measured on the floor set and cached."""
    path = _classifier_file(folder)
    if path.is_file():
        return LabelClassifier.load(path), json.loads(path.with_name(f"{ARCH}-ceiling.json").read_text())
    if not any(floor_labels):
        raise ValueError(f"{data}: its json metadata has no {label!r} labels for the alignment classifier "
                         "(eval.classifier_label), or turn it off (eval.classifier=false / --no-classifier)")
    train = pool.subset(split.reference + split.rest)
    model = train_classifier(train.images, train.labels, seed=seed, progress=progress)
    floor_images = pool.subset(split.floor).floats()
    real_alignment = {"class_acc_real": model.accuracy(floor_images, floor_labels),
                      "class_chance": chance_level(floor_labels), "classifier_images": len(train),
                      "classifier_keys": train.keys}
    model.save(path)
    atomic_write_bytes(path.with_name(f"{ARCH}-ceiling.json"), json.dumps(real_alignment).encode())
    return model, real_alignment
