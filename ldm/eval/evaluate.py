"""The evaluation protocol: one fixed prompt set and fixed seeds, FID/KID beside their real-vs-real floor with
bootstrap intervals, text alignment by a classifier beside its ceiling and chance, and (given CLIP weights) the
CLIP score.

Two models evaluated with the same settings see the same prompts and the same starting noise (image i from seed
``seed + i``), so their difference is the models'. Every value comes with what it must be read against:

* ``fid`` / ``kid``: generated set G against the reference set R (Inception-v3 pool features), with ``*_lo``/``*_hi``
  = value -/+ 1.96 bootstrap standard deviations over G;
* ``fid_floor`` / ``kid_floor``: the real floor set F (the images whose captions prompted G) against R at the same
  counts, with its interval: the score of a perfect generator, which FID's small-sample bias keeps above 0;
* ``class_acc``: the fraction of G the alignment classifier assigns the label of its prompt's real image, with a
  binomial 95 % interval; ``class_acc_real`` (the classifier on F, never trained on) is its ceiling and
  ``class_chance`` (always the most frequent label) its chance level.

The real sets, their features and floor values, and the classifier are computed once and cached (``realset``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.eval.classifier import ARCH, LabelClassifier, chance_level, train_classifier
from ldm.eval.inception import InceptionFeatures
from ldm.eval.metrics import fid_kid_bootstrap
from ldm.eval.realset import (
    RealSet, cache_key, default_cache_dir, load_features, read_split, resolve_shards, save_features, shards_hash,
    split_pool,
)
from ldm.io import atomic_write_bytes

Tensor = torch.Tensor
Z95 = 1.959964  # two-sided 95 % normal quantile
CLASSIFIER_POOL = 50_000  # at most this many real images are read for the classifier (plus the floor and reference)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: Tensor  # (N, 3, H, W) in [0, 1]
    predictions: list[str] = field(default_factory=list)  # the classifier's label per generated image

    def summary(self) -> str:
        return summary(self.metrics)


def interval(value: float, sd: float) -> tuple[float, float]:
    """value -/+ 1.96 sd (the normal 95 % interval); nan bounds when there is no sd."""
    return value - Z95 * sd, value + Z95 * sd


def binomial_interval(p: float, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval of a proportion p out of n trials (Wilson 1927)."""
    if n == 0:
        return float("nan"), float("nan")
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def summary(m: dict[str, float]) -> str:
    """One line: FID and KID with their intervals and floors, alignment with its interval, ceiling and chance."""
    def span(key: str, scale: float = 1.0, digits: int = 2) -> str:
        v, lo, hi = (m.get(k, float("nan")) * scale for k in (key, f"{key}_lo", f"{key}_hi"))
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) else f"{v:.{digits}f}"

    parts = [f"FID {span('fid')} (real floor {span('fid_floor')})",
             f"KID x1e3 {span('kid', 1e3)} (floor {span('kid_floor', 1e3)})"]
    if "class_acc" in m:
        parts.append(f"alignment {span('class_acc', 100, 1)} % (ceiling {100 * m['class_acc_real']:.1f} %, "
                     f"chance {100 * m['class_chance']:.1f} %)")
    if "clip_score" in m:
        parts.append(f"CLIP score {m['clip_score']:.2f}")
    return f"{int(m.get('num_images', 0))} images: " + "; ".join(parts)


class Evaluator:
    """What stays fixed across evaluations: the feature network, the real sets, the prompts, seeds and classifier."""

    def __init__(self, data: str, *, image_size: int, caption: str = "label", num_images: int = 1000,
                 reference_images: int = 1000, seed: int = 0, inception: str | Path | None = None,
                 classifier: bool = True, classifier_label: str = "subcategory", bootstrap: int = 50,
                 clip: str | Path | None = None, clip_model: str = "ViT-B-32", batch_size: int = 100,
                 cache_dir: str | Path | None = None, device: torch.device | str = "cpu", progress: bool = True):
        if num_images < 2 or reference_images < 2:
            raise ValueError(f"FID needs at least 2 images per set, got num_images={num_images}, "
                             f"reference_images={reference_images}")
        self.batch_size, self.bootstrap, self.seed, self.progress = batch_size, bootstrap, seed, progress
        self.inception = InceptionFeatures(inception, device, batch_size)
        shards = shards_hash(resolve_shards(data, "train"))
        self.key = cache_key(kind="eval-v2", shards=shards, image_size=image_size, caption=caption,
                             label=classifier_label, floor=num_images, reference=reference_images, seed=seed,
                             inception=self.inception.hash)
        self.folder = Path(cache_dir or default_cache_dir()) / self.key
        floor, reference = load_features(self.folder, "floor"), load_features(self.folder, "reference")
        pool = None
        if floor is None or reference is None or (classifier and not (self.folder / f"{ARCH}.safetensors").is_file()):
            limit = num_images + reference_images + (CLASSIFIER_POOL if classifier else 0)
            pool = read_split(data, "train", image_size, caption, classifier_label, limit=limit, progress=progress)
            split = split_pool(len(pool), num_images, reference_images, seed)
        if floor is None or reference is None:
            floor, reference = pool.subset(split.floor), pool.subset(split.reference)
            for name, real in (("floor", floor), ("reference", reference)):
                real.features = self.inception.features(real.floats(), desc=f"inception (real {name} set)",
                                                        progress=progress)
            floor_scores = fid_kid_bootstrap(floor.features, reference.features, bootstrap, seed)
            save_features(self.folder, "reference", reference)
            save_features(self.folder, "floor", floor, {"scores": floor_scores, "data": str(data)})
        self.floor, self.reference = floor, reference
        self.floor_scores = json.loads((self.folder / "floor.json").read_text())["scores"]
        self.prompts, self.labels = floor.captions, floor.labels
        self.seeds = [seed + i for i in range(num_images)]
        self.classifier, self.real_alignment = None, {}
        if classifier:
            self.classifier = self._classifier(pool, split if pool is not None else None, classifier_label, data)
        self.clip = None
        if clip is not None:
            from ldm.eval.clip_score import ClipScorer

            self.clip = ClipScorer(clip, clip_model, device)

    def _classifier(self, pool: RealSet | None, split, label: str, data: str) -> LabelClassifier:
        """The alignment classifier from the cache, else trained on every pool image outside the floor set."""
        path = self.folder / f"{ARCH}.safetensors"
        if path.is_file():
            model = LabelClassifier.load(path)
            self.real_alignment = json.loads(path.with_name(f"{ARCH}-ceiling.json").read_text())
            return model
        if not any(self.labels):
            raise ValueError(f"{data}: its json metadata has no {label!r} labels for the alignment classifier "
                             "(eval.classifier_label), or turn it off (eval.classifier=false / --no-classifier)")
        train = pool.subset(split.reference + split.rest)
        model = train_classifier(train.images, train.labels, seed=self.seed, progress=self.progress)
        floor_images = pool.subset(split.floor).floats()
        self.real_alignment = {"class_acc_real": model.accuracy(floor_images, self.labels),
                               "class_chance": chance_level(self.labels), "classifier_images": len(train)}
        model.save(path)
        atomic_write_bytes(path.with_name(f"{ARCH}-ceiling.json"), json.dumps(self.real_alignment).encode())
        return model

    @property
    def num_images(self) -> int:
        return len(self.prompts)

    def score(self, images: Tensor) -> tuple[dict[str, float], list[str]]:
        """Metrics of generated images (N, 3, H, W) in [0, 1], image i made for prompt i of the prompt set."""
        if images.shape[0] != self.num_images:
            raise ValueError(f"{images.shape[0]} images for {self.num_images} prompts")
        features = self.inception.features(images, desc="inception (generated)", progress=self.progress)  # (N, D)
        s, f = fid_kid_bootstrap(features, self.reference.features, self.bootstrap, self.seed), self.floor_scores
        metrics: dict[str, float] = {"num_images": float(self.num_images),
                                     "reference_images": float(len(self.reference))}
        for name, scores in (("", s), ("_floor", f)):
            for metric in ("fid", "kid"):
                value = scores[metric]
                lo, hi = interval(value, scores[f"{metric}_sd"])
                metrics.update({f"{metric}{name}": value, f"{metric}{name}_lo": lo, f"{metric}{name}_hi": hi})
        predictions: list[str] = []
        if self.classifier is not None:
            predictions = self.classifier.predict(images)
            acc = sum(p == y for p, y in zip(predictions, self.labels)) / self.num_images
            lo, hi = binomial_interval(acc, self.num_images)
            metrics.update({"class_acc": acc, "class_acc_lo": lo, "class_acc_hi": hi,
                            "class_acc_real": self.real_alignment["class_acc_real"],
                            "class_chance": self.real_alignment["class_chance"]})
        if self.clip is not None:
            scores = torch.cat([self.clip(images[i:i + self.batch_size], self.prompts[i:i + self.batch_size])
                                for i in range(0, self.num_images, self.batch_size)])
            metrics["clip_score"] = float(scores.mean())
        return metrics, predictions

    def evaluate(self, pipe, *, sampler: str, steps: int, guidance: float, negative_prompt: str = "",
                 **options: Any) -> EvalResult:
        """Generate the prompt set with these settings and score it."""
        images = pipe.generate(self.prompts, self.seeds, batch_size=self.batch_size, progress=self.progress,
                               desc=f"sampling {sampler} x{steps} g{guidance:g}", negative_prompt=negative_prompt,
                               sampler=sampler, steps=steps, guidance=guidance, **options)
        metrics, predictions = self.score(images)
        return EvalResult(metrics, images, predictions)
