"""A linear probe: multinomial logistic regression on frozen features (the linear-evaluation protocol of
representation learning, e.g. Radford et al. 2021 "CLIP", Sec. 3.2), used as an offline text-alignment score.

Trained on Inception features of real training images to predict the emoji's ``subcategory``, it is applied to
images generated from the captions of held-out samples: the fraction whose subcategory it recovers says how well
the images follow their text. The probe's accuracy on the real held-out images is the ceiling of that score and
``chance_level`` (always answering the most frequent label) its floor.

Fitting minimises ``mean cross-entropy + weight_decay / 2 * ||W||^2`` over standardised features with full-batch
L-BFGS (a convex problem: the optimum does not depend on initialisation or batch order).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

Tensor = torch.Tensor


class LinearProbe:
    """Standardise features, then logits = z W^T + b over ``classes``."""

    def __init__(self, classes: Sequence[str], mean: Tensor, scale: Tensor, weight: Tensor, bias: Tensor):
        self.classes = list(classes)
        self.mean, self.scale, self.weight, self.bias = mean, scale, weight, bias  # (D,), (D,), (K, D), (K,)

    def logits(self, features: Tensor) -> Tensor:
        z = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.scale  # (N, D)
        return z @ self.weight.T + self.bias  # (N, K)

    def predict(self, features: Tensor) -> list[str]:
        return [self.classes[i] for i in self.logits(features).argmax(dim=1).tolist()]

    def accuracy(self, features: Tensor, labels: Sequence[str]) -> float:
        """Fraction of rows whose predicted class is their label (a label the probe does not know counts as wrong)."""
        if len(labels) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {len(labels)} labels")
        predicted = self.predict(features)
        return sum(p == y for p, y in zip(predicted, labels)) / len(labels)

    def save(self, path: str | Path) -> Path:
        tensors = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"classes": json.dumps(self.classes)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            classes = json.loads(f.metadata()["classes"])
        t = load_file(str(path))
        return cls(classes, t["mean"], t["scale"], t["weight"], t["bias"])


def chance_level(labels: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent label."""
    if not labels:
        raise ValueError("no labels")
    return Counter(labels).most_common(1)[0][1] / len(labels)


def fit_probe(features: Tensor, labels: Sequence[str], weight_decay: float = 1e-2, max_iter: int = 300) -> LinearProbe:
    """Fit a multinomial logistic regression (L2-regularised, L-BFGS) to features (N, D) and string labels."""
    x = torch.as_tensor(features, dtype=torch.float64)
    if x.dim() != 2 or len(labels) != x.shape[0]:
        raise ValueError(f"features {tuple(x.shape)} and {len(labels)} labels do not match")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {classes}")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels])  # (N,)
    mean, scale = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # (D,) constant features stay finite
    z = (x - mean) / scale  # (N, D)
    weight = torch.zeros(len(classes), x.shape[1], dtype=torch.float64, requires_grad=True)  # (K, D)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)  # (K,)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(classes, mean, scale, weight.detach(), bias.detach())
