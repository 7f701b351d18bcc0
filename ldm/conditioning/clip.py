"""CLIP text encoders (transformers) as Stable Diffusion uses them (Rombach et al. 2022; SD 1.x and SDXL model cards).

``CLIPTextEncoder``: a transformers ``CLIPTextModel`` from a local folder (SD 1.x: OpenAI CLIP ViT-L/14), or
``CLIPTextModelWithProjection`` with ``projection=True`` (SDXL's ``text_encoder_2``, OpenCLIP ViT-bigG in
transformers' layout). ``layer="last"`` is the final hidden states after ``final_layer_norm`` (SD 1.x);
``"penultimate"`` the states entering the last layer, through ``final_layer_norm`` (the "clip skip" of later
SD 1.x models) or, with ``final_norm=False``, as they are (SDXL reads both of its encoders that way).

Prompts are padded to max_length (77 in SD) and the UNet sees every position: Stable Diffusion attends to
the padding tokens too, so ``context_mask`` is all True unless ``mask_padding=True`` (then the tokenizer's
attention mask). ``pooled=True`` adds the end-of-text token's final features: ``pooler_output`` (B, D), or
with ``projection=True`` the projected ``text_embeds`` (B, projection_dim), SDXL's pooled vector.
Transformers 5's ``CLIPTextModel`` holds ``final_layer_norm`` itself (no ``.text_model`` attribute);
folders saved by older versions (``text_model.*`` keys) load unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.conditioning.base import Cond, FrozenTextEncoder, check_layer


class CLIPTextEncoder(FrozenTextEncoder):
    """A transformers CLIP text model + tokenizer from local folders, frozen."""

    def __init__(self, path: str, max_length: int = 77, layer: str = "last", mask_padding: bool = False,
                 pooled: bool = False, tokenizer_path: str | None = None, final_norm: bool = True,
                 projection: bool = False, subfolder: str = "text_encoder"):
        """path: a CLIP text model folder, or a diffusers pipeline folder with ``subfolder``/ and its tokenizer
        (``text_encoder``/``tokenizer``; SDXL's second encoder: ``text_encoder_2``/``tokenizer_2``)."""
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        check_layer(layer)
        model_dir = Path(path)
        if (model_dir / subfolder).is_dir():  # a Stable Diffusion pipeline folder
            tokenizer_dir = model_dir / subfolder.replace("text_encoder", "tokenizer")
            model_dir, tokenizer_path = model_dir / subfolder, tokenizer_path or str(tokenizer_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"CLIP text model folder not found: {model_dir}")
        if tokenizer_path is None and not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            # diffusers keeps it beside the model: text_encoder/ -> tokenizer/, text_encoder_2/ -> tokenizer_2/
            tokenizer_path = str(model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or str(model_dir))
        model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
        self.model, info = model_class.from_pretrained(str(model_dir), output_loading_info=True)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"CLIP text model in {model_dir} does not match its config: {bad}")
        positions = int(self.model.config.max_position_embeddings)
        if max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
        self.max_length, self.layer, self.final_norm, self.projection = max_length, layer, final_norm, projection
        self.mask_padding, self.pooled = mask_padding, pooled
        self.dim = int(self.model.config.hidden_size)
        self.pooled_dim = int(self.model.config.projection_dim) if projection else self.dim
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts to (B, max_length, D) token features of the chosen layer."""
        batch = self.tokenize(prompts)
        ids = batch["input_ids"]  # (B, L); like SD, no attention mask: CLIP is causal, padding comes last
        plain_last = self.layer == "last" and self.final_norm
        out = self.model(input_ids=ids, output_hidden_states=not plain_last)
        if plain_last:
            hidden = out.last_hidden_state  # (B, L, D), final_layer_norm applied
        else:
            hidden = out.hidden_states[-1 if self.layer == "last" else -2]  # (B, L, D)
            if self.final_norm:
                hidden = getattr(self.model, "text_model", self.model).final_layer_norm(hidden)  # transformers 5 / 4
        mask = batch["attention_mask"].bool() if self.mask_padding else torch.ones_like(ids, dtype=torch.bool)
        cond = {"context": hidden.float(), "context_mask": mask}  # (B, L, D), (B, L)
        if self.pooled:
            cond["pooled"] = (out.text_embeds if self.projection else out.pooler_output).float()  # (B, P)
        return cond
