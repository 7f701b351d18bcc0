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

The real sets, their features and floor values, and the classifier are computed once and cached (``prepare``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.eval.classifier import LabelClassifier
from ldm.eval.inception import InceptionFeatures
from ldm.eval.metrics import fid_kid_bootstrap
from ldm.eval.realset import RealSet

Tensor = torch.Tensor
Z95 = 1.959964  # two-sided 95 % normal quantile


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
    """What stays fixed across evaluations: the feature network, the real sets, the prompts, seeds and classifier.

    Built from prepared parts (``ldm.eval.prepare_evaluator`` reads them from the cache or computes and caches them);
    the evaluator itself reads and writes nothing."""

    def __init__(self, inception: InceptionFeatures, floor: RealSet, reference: RealSet, floor_scores: dict[str, float],
                 classifier: LabelClassifier | None = None, real_alignment: dict[str, Any] | None = None, clip=None, *,
                 seed: int = 0, bootstrap: int = 50, batch_size: int = 100, progress: bool = True,
                 folder: Path | None = None):
        """``floor`` and ``reference`` carry their features; ``floor_scores`` are the floor set's FID/KID against the
        reference set; ``real_alignment`` the classifier's ceiling and chance; ``folder`` the cache entry of it all."""
        self.inception, self.floor, self.reference, self.floor_scores = inception, floor, reference, floor_scores
        self.classifier, self.real_alignment, self.clip = classifier, real_alignment or {}, clip
        self.seed, self.bootstrap, self.batch_size, self.progress = seed, bootstrap, batch_size, progress
        self.folder = folder
        self.prompts, self.labels = floor.captions, floor.labels
        self.seeds = [seed + i for i in range(len(floor))]

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
                            "class_chance": self.real_alignment["class_chance"],
                            "classifier_images": float(self.real_alignment["classifier_images"])})
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
