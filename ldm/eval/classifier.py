"""Text alignment by a classifier trained on the real images: does a generated image show what its caption names?

A small convolutional network (three stages of 3x3 convolutions with batch norm, global average pooling, a linear
head) learns the json label of the real training images (for emoji, the ``subcategory``: "heart", "animal-mammal",
"face-smiling", ...). Each generated image is classified and counted right when the class is the label of the real
image whose caption prompted it. The same classifier on those real images (never seen in its training) is the
ceiling of the score; always answering the most frequent label is chance.

Images go in at ``INPUT_SIZE`` (resized from any size, bilinear), in [0, 1]. Training: AdamW with a one-cycle
cosine schedule, random translations of up to 2 pixels (padding with the image's own border), seeded, so the same
data gives the same classifier; it is cached by the evaluation (``ldm.eval.prepare``) under a hash of its data.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm.io import load_tensors, save_tensors

Tensor = torch.Tensor
INPUT_SIZE = 32
ARCH = "cnn3-v1"  # bump when the network or its training changes: cached classifiers are keyed by it


def _stage(cin: int, cout: int, convs: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    return layers


class LabelClassifier(nn.Module):
    """(B, 3, H, W) in [0, 1] -> logits (B, K) over ``classes``."""

    def __init__(self, classes: Sequence[str], width: int = 24):
        super().__init__()
        self.classes = list(classes)
        w = width
        self.features = nn.Sequential(*_stage(3, w, 2), nn.MaxPool2d(2), *_stage(w, 2 * w, 2), nn.MaxPool2d(2),
                                      *_stage(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, len(self.classes)))
        self.width = width

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.head(self.features((x - 0.5) / 0.5))  # (B, K)

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> list[str]:
        """The predicted class of each image (B, 3, H, W) in [0, 1]."""
        self.eval()
        out = [self(images[i:i + batch_size]).argmax(dim=1) for i in range(0, len(images), batch_size)]
        return [self.classes[i] for i in torch.cat(out).tolist()]

    def accuracy(self, images: Tensor, labels: Sequence[str]) -> float:
        """Fraction of images classified as their label (a label the classifier does not know counts as wrong)."""
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return sum(p == y for p, y in zip(self.predict(images), labels)) / max(len(labels), 1)

    def save(self, path: str | Path) -> Path:
        save_tensors(self.state_dict(), path)
        Path(path).with_suffix(".json").write_text(json.dumps({"arch": ARCH, "width": self.width,
                                                                "classes": self.classes}))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "LabelClassifier":
        info = json.loads(Path(path).with_suffix(".json").read_text())
        model = cls(info["classes"], width=info["width"])
        model.load_state_dict(load_tensors(path))
        return model.eval()


def chance_level(labels: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent label."""
    if not labels:
        raise ValueError("no labels")
    return Counter(labels).most_common(1)[0][1] / len(labels)


def _translate(x: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random shifts of up to max_shift pixels per image, the border replicated."""
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


def train_classifier(images: Tensor, labels: Sequence[str], *, epochs: int = 12, batch_size: int = 128,
                     lr: float = 3e-3, width: int = 24, seed: int = 0, progress: bool = True) -> LabelClassifier:
    """Fit a LabelClassifier on uint8 images (N, 3, H, W) and their labels (empty labels are left out)."""
    keep = [i for i, y in enumerate(labels) if y]
    classes = sorted({labels[i] for i in keep})
    if len(classes) < 2:
        raise ValueError(f"the classifier needs images of at least 2 labels, found {classes}")
    index = {c: k for k, c in enumerate(classes)}
    x = images[keep].float() / 255  # (N, 3, H, W)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    y = torch.tensor([index[labels[i]] for i in keep])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights and dropout
    model = LabelClassifier(classes, width)
    steps = epochs * math.ceil(len(y) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    with tqdm(total=steps, desc="alignment classifier", unit="step", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for start in range(0, len(y), batch_size):
                rows = order[start:start + batch_size]
                loss = F.cross_entropy(model(_translate(x[rows], g)), y[rows], label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    return model.eval()
