"""CLIP text encoders as Stable Diffusion uses them (Rombach et al. 2022; SD 1.x and 2.x model cards).

* ``CLIPTextEncoder``: a transformers ``CLIPTextModel`` from a local folder (SD 1.x: OpenAI CLIP ViT-L/14).
  ``layer="last"`` is its final hidden states after ``final_layer_norm`` (SD 1.x); ``"penultimate"`` the
  states entering the last layer, passed through ``final_layer_norm`` (the "clip skip" of later SD 1.x
  models, and how SD 2.x reads its text tower).
* ``OpenCLIPTextEncoder``: an OpenCLIP text tower (SD 2.x: ViT-H-14), built by ``open_clip.create_model``
  without downloading anything and filled from a local checkpoint file; ``"penultimate"`` (SD 2.x) runs all
  blocks but the last, then ``ln_final``.

Prompts are padded to max_length (77 in SD) and the UNet sees every position: Stable Diffusion attends to
the padding tokens too, so ``context_mask`` is all True unless ``mask_padding=True`` (then True up to and
including the end-of-text token). ``pooled=True`` adds the end-of-text token's final features, for CLIP
its ``pooler_output`` (B, D) and for OpenCLIP the projected text embedding (B, embed_dim).
Transformers 5's ``CLIPTextModel`` holds ``final_layer_norm`` itself (no ``.text_model`` attribute);
folders saved by older versions (``text_model.*`` keys) load unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ldm.io import check_state_dict, read_state_dict
from ldm.conditioning.text import Cond, FrozenTextEncoder

LAYERS = ("last", "penultimate")
# The visual tower is discarded: building a one-block stand-in avoids initialising e.g. ViT-H's 630M weights.
_STUB_VISION = {"image_size": 32, "patch_size": 32, "width": 64, "head_width": 64, "layers": 1}
SD2_TEXT_PREFIX = "cond_stage_model.model."  # the OpenCLIP text tower inside a Stable Diffusion 2.x checkpoint
_OPENCLIP_PREFIXES = (SD2_TEXT_PREFIX, "module.")  # "module.": an open_clip DDP training checkpoint
_OPENCLIP_IGNORED = ("visual.", "logit_scale", "logit_bias")


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" root-logger warning: the weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _until_eot(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Mask (B, L): True up to and including the first end-of-text token of each row."""
    eot = (tokens == eot_id).int().argmax(dim=-1)  # (B,)
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot[:, None]  # (B, L)


class CLIPTextEncoder(FrozenTextEncoder):
    """A transformers CLIP text model + tokenizer from local folders, frozen."""

    def __init__(self, path: str, max_length: int = 77, layer: str = "last", mask_padding: bool = False,
                 pooled: bool = False, tokenizer_path: str | None = None):
        """path: a CLIPTextModel folder, or a diffusers pipeline folder with text_encoder/ and tokenizer/."""
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel

        _check_layer(layer)
        model_dir = Path(path)
        if (model_dir / "text_encoder").is_dir():  # a Stable Diffusion pipeline folder
            model_dir, tokenizer_path = model_dir / "text_encoder", tokenizer_path or str(model_dir / "tokenizer")
        if not model_dir.is_dir():
            raise FileNotFoundError(f"CLIP text model folder not found: {model_dir}")
        if tokenizer_path is None and not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            tokenizer_path = str(model_dir.parent / "tokenizer")  # diffusers keeps it beside text_encoder/
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or str(model_dir))
        self.model, info = CLIPTextModel.from_pretrained(str(model_dir), output_loading_info=True)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"CLIP text model in {model_dir} does not match its config: {bad}")
        positions = int(self.model.config.max_position_embeddings)
        if max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
        self.max_length, self.layer = max_length, layer
        self.mask_padding, self.pooled = mask_padding, pooled
        self.dim = int(self.model.config.hidden_size)
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts to (B, max_length, D) token features of the chosen layer."""
        batch = self.tokenize(prompts)
        ids = batch["input_ids"]  # (B, L); like SD, no attention mask: CLIP is causal, padding comes last
        out = self.model(input_ids=ids, output_hidden_states=self.layer == "penultimate")
        if self.layer == "last":
            hidden = out.last_hidden_state  # (B, L, D), final_layer_norm applied
        else:
            norm = getattr(self.model, "text_model", self.model).final_layer_norm  # transformers 5 / 4
            hidden = norm(out.hidden_states[-2])  # (B, L, D)
        mask = batch["attention_mask"].bool() if self.mask_padding else torch.ones_like(ids, dtype=torch.bool)
        cond = {"context": hidden.float(), "context_mask": mask}  # (B, L, D), (B, L)
        if self.pooled:
            cond["pooled"] = out.pooler_output.float()  # (B, D)
        return cond


def _text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a known prefix (SD 2.x / DDP) and drop the visual tower and logit scale/bias."""
    for prefix in _OPENCLIP_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(_OPENCLIP_IGNORED)}


class OpenCLIPTextEncoder(FrozenTextEncoder):
    """The text tower of an OpenCLIP model, weights from a local file (safetensors or weights-only torch)."""

    def __init__(self, path: str | None, max_length: int = 77, model_name: str = "ViT-H-14",
                 layer: str = "penultimate", mask_padding: bool = False, pooled: bool = False,
                 model_overrides: dict[str, Any] | None = None):
        """path: checkpoint file (a CLIP state dict, or a whole SD 2.x checkpoint); None keeps random weights.

        model_overrides go to ``open_clip.create_model`` as config overrides (e.g. a small ``text_cfg``).
        """
        super().__init__()
        import open_clip

        _check_layer(layer)
        with _quiet_random_init_warning():
            model = open_clip.create_model(model_name, pretrained=None,
                                           **{"vision_cfg": _STUB_VISION, **(model_overrides or {})})
        del model.visual  # only the text tower is used
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps it in .text, CLIP inline
        causal = getattr(tower, "attn_mask", None) is not None and getattr(tower, "cls_emb", None) is None
        if not hasattr(tower, "token_embedding") or not causal:
            raise ValueError(f"OpenCLIP model {model_name!r}: only causal CLIP text transformers are supported")
        if path is not None:
            state = _text_state(read_state_dict(path, prefixes=(SD2_TEXT_PREFIX,)))
            expected = {k: v for k, v in model.state_dict().items() if not k.startswith(_OPENCLIP_IGNORED)}
            check_state_dict(expected, state, str(path))
            model.load_state_dict(state, strict=False)  # the check above covered every used key
        context = int(tower.positional_embedding.shape[0])
        if max_length > context:
            raise ValueError(f"max_length {max_length} exceeds the model's context length {context}")
        self.model, self.tower = model, tower
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=max_length)
        self.max_length, self.layer = max_length, layer
        self.mask_padding, self.pooled = mask_padding, pooled
        self.dim = int(tower.positional_embedding.shape[1])
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts to (B, max_length, D) token features of the chosen layer."""
        from open_clip.transformer import text_global_pool

        tower, length = self.tower, self.max_length
        tokens = self.tokenizer(list(prompts), context_length=length).to(self.device)  # (B, L)
        x = tower.token_embedding(tokens) + tower.positional_embedding[:length]  # (B, L, D)
        causal = tower.attn_mask[:length, :length]  # (L, L) additive -inf above the diagonal
        blocks = len(tower.transformer.resblocks)
        wanted = [blocks - 2, blocks - 1] if self.layer == "penultimate" else [blocks - 1]
        _, states = tower.transformer.forward_intermediates(x, attn_mask=causal, indices=wanted)
        hidden = tower.ln_final(states[0])  # (B, L, D)
        eot_id = int(self.tokenizer.eot_token_id)
        mask = _until_eot(tokens, eot_id) if self.mask_padding else torch.ones_like(tokens, dtype=torch.bool)
        cond = {"context": hidden.float(), "context_mask": mask}  # (B, L, D), (B, L)
        if self.pooled:
            final = tower.ln_final(states[-1])  # (B, L, D)
            pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
            pooled = text_global_pool(final, tokens, pool_type, eos_token_id=eot_id)  # (B, D)
            projection = tower.text_projection
            if projection is not None:
                pooled = projection(pooled) if isinstance(projection, torch.nn.Module) else pooled @ projection
            cond["pooled"] = pooled.float()  # (B, embed_dim)
        return cond
