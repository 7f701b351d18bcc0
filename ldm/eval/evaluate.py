"""Evaluate a text-to-image model on a fixed prompt set: generate, then FID/KID against a held-out real set, the
probe's text alignment and (given CLIP weights) the CLIP score.

The prompt set is the captions of ``num_images`` held-out samples, drawn once with the seed (repeated in that
order when more images than samples are asked for); image i uses seed + i, as ``ldm-sample`` does, so every
evaluation of every checkpoint sees the same prompts and starting noise. FID and KID compare the generated images
with the whole held-out split; the probe (``ldm.eval.probe``) is scored on the generated images against the
subcategories of their prompts, next to its accuracy on the real images of the same samples (the ceiling) and
the chance level (the most frequent subcategory among them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ldm.eval.inception import InceptionFeatures
from ldm.eval.metrics import fid, kid
from ldm.eval.probe import chance_level
from ldm.eval.reference import load_probe, load_reference

Tensor = torch.Tensor


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: Tensor  # (N, 3, H, W) in [0, 1]
    predictions: list[str] = field(default_factory=list)  # the probe's subcategory per generated image


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, sampler: str, steps: int, guidance: float,
             negative_prompt: str = "", batch_size: int = 32, progress: bool = True, **options) -> Tensor:
    """Images (N, 3, H, W) in [0, 1] for the prompts, image i from seed i, in batches."""
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"sampling {sampler} x{steps} g{guidance:g}",
                      unit="batch", disable=not progress, leave=False):
        chunk = slice(start, start + batch_size)
        out.append(pipe(prompts[chunk], seeds=seeds[chunk], negative_prompt=negative_prompt, sampler=sampler,
                        steps=steps, guidance=guidance, **options).cpu())
    return torch.cat(out)


class Evaluator:
    """What stays fixed across evaluations: the feature network, the real reference set, the prompts, the probe."""

    def __init__(self, data: str, *, image_size: int, train_data: str | None = None, split: str = "val",
                 caption: str = "label", num_images: int = 64, seed: int = 0, inception: str | Path | None = None,
                 probe: bool = True, probe_per_class: int = 16, clip: str | Path | None = None,
                 clip_model: str = "ViT-B-32", kid_subset_size: int = 1000, batch_size: int = 32,
                 cache_dir: str | Path | None = None, device: torch.device | str = "cpu", progress: bool = True):
        if num_images < 2:
            raise ValueError(f"num_images must be at least 2 (FID needs a covariance), got {num_images}")
        self.batch_size, self.kid_subset_size, self.progress = batch_size, kid_subset_size, progress
        self.inception = InceptionFeatures(inception, device, batch_size)
        self.reference, folder = load_reference(data, split, image_size, caption, self.inception, cache_dir, progress)
        if len(self.reference) < 2:
            raise ValueError(f"{data}: the {split} split has {len(self.reference)} sample(s); FID needs at least 2")
        order = torch.randperm(len(self.reference), generator=torch.Generator().manual_seed(seed)).tolist()
        self.indices = [order[i % len(order)] for i in range(num_images)]
        self.prompts = [self.reference.captions[i] for i in self.indices]
        self.labels = [self.reference.labels[i] for i in self.indices]
        self.seeds = [seed + i for i in range(num_images)]
        self.probe, self.real_metrics = None, {}
        if probe:
            classes = sorted({label for label in self.reference.labels if label})
            if len(classes) < 2:
                raise ValueError(f"{data}: the {split} split's json metadata names {len(classes)} subcategory(ies); "
                                 "the probe needs at least 2 (turn the probe off)")
            self.probe = load_probe(folder, train_data or data, classes, image_size, self.inception,
                                    per_class=probe_per_class, progress=progress)
            real = self.reference.features[self.indices]  # (N, D)
            self.real_metrics = {"probe_acc_real": self.probe.accuracy(real, self.labels),
                                 "probe_chance": chance_level(self.labels)}
        self.clip = None
        if clip is not None:
            from ldm.eval.clip_score import ClipScorer

            self.clip = ClipScorer(clip, clip_model, device)

    def score(self, images: Tensor) -> tuple[dict[str, float], list[str]]:
        """Metrics of generated images (N, 3, H, W) in [0, 1], image i made for prompt i of the prompt set."""
        if images.shape[0] != len(self.prompts):
            raise ValueError(f"{images.shape[0]} images for {len(self.prompts)} prompts")
        features = self.inception.features(images, desc="inception (generated)", progress=self.progress)  # (N, D)
        kid_mean, kid_std = kid(features, self.reference.features, subset_size=self.kid_subset_size)
        metrics = {"fid": fid(features, self.reference.features), "kid": kid_mean, "kid_std": kid_std}
        predictions = []
        if self.probe is not None:
            predictions = self.probe.predict(features)
            metrics["probe_acc"] = sum(p == y for p, y in zip(predictions, self.labels)) / len(self.labels)
            metrics.update(self.real_metrics)
        if self.clip is not None:
            scores = torch.cat([self.clip(images[i:i + self.batch_size], self.prompts[i:i + self.batch_size])
                                for i in range(0, len(self.prompts), self.batch_size)])
            metrics["clip_score"] = float(scores.mean())
        return metrics, predictions

    def evaluate(self, pipe, *, sampler: str, steps: int, guidance: float, negative_prompt: str = "",
                 **options) -> EvalResult:
        """Generate the prompt set with these settings and score it."""
        images = generate(pipe, self.prompts, self.seeds, sampler=sampler, steps=steps, guidance=guidance,
                          negative_prompt=negative_prompt, batch_size=self.batch_size, progress=self.progress,
                          **options)
        metrics, predictions = self.score(images)
        return EvalResult(metrics, images, predictions)
