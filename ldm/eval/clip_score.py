"""CLIP score: how well an image matches its prompt under a CLIP model (Hessel et al. 2021, "CLIPScore", Eq. 1,
with the weight w = 100 that text-to-image papers and torchmetrics report instead of 2.5):

    CLIP-S(image, text) = 100 * max(cos(E_image(image), E_text(text)), 0)

The model is an OpenCLIP architecture built offline (``open_clip.create_model(name, pretrained=None)``) and filled
from a local checkpoint file (safetensors, or torch.load with weights_only=True), checked key by key as the text
encoders in ``ldm.conditioning.clip`` are. Images are resized (bicubic, antialiased) to the model's input size and
normalised with the model's own mean and std, as its preprocessing transform does for square images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.io import check_state_dict, read_state_dict
from ldm.conditioning import quiet_random_init_warning

Tensor = torch.Tensor
WEIGHT = 100.0
_PREFIXES = ("module.",)  # an open_clip DDP training checkpoint


class ClipScorer:
    """CLIP score of (image, prompt) pairs with an OpenCLIP model loaded from a local checkpoint file."""

    def __init__(self, path: str | Path, model_name: str = "ViT-B-32", device: torch.device | str = "cpu"):
        """path: a CLIP checkpoint file; model_name: an OpenCLIP architecture (``open_clip.list_models()``)."""
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown OpenCLIP architecture {model_name!r}; see open_clip.list_models()")
        with quiet_random_init_warning():
            model = open_clip.create_model(model_name, pretrained=None)
        state = read_state_dict(path)
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        check_state_dict(model, state, str(path))
        model.load_state_dict(state)
        self.model = model.to(device).eval().requires_grad_(False)
        cfg = getattr(model.visual, "preprocess_cfg", {})
        self.size = tuple(model.visual.image_size) if isinstance(model.visual.image_size, (tuple, list)) \
            else (model.visual.image_size,) * 2
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, h, w) normalised model input."""
        x = images.float().clamp(0, 1).to(self.device)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std  # (B, 3, h, w)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-pair CLIP scores (B,) in [0, 100]."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        image = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)  # (B, E)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return WEIGHT * (image * text).sum(dim=-1).clamp_min(0)  # (B,)
