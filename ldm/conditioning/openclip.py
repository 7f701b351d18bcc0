"""OpenCLIP text towers as Stable Diffusion uses them (SD 2.x: ViT-H-14; SDXL's second encoder: ViT-bigG-14).

``OpenCLIPTextEncoder`` builds the model with ``open_clip.create_model`` without downloading anything and fills
it from a local checkpoint file. ``"penultimate"`` runs all blocks but the last, then ``ln_final`` (SD 2.x) or,
with ``final_norm=False``, nothing (SDXL); ``"last"`` runs every block. ``context_mask`` is all True unless
``mask_padding=True`` (then True up to and including the end-of-text token); ``pooled=True`` adds the
projected text embedding (B, embed_dim) of the end-of-text token, SDXL's pooled vector.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ldm.io import check_state_dict, read_state_dict
from ldm.conditioning.base import Cond, FrozenTextEncoder, check_layer

# The visual tower is discarded: building a one-block stand-in avoids initialising e.g. ViT-H's 630M weights.
_STUB_VISION = {"image_size": 32, "patch_size": 32, "width": 64, "head_width": 64, "layers": 1}
SD2_TEXT_PREFIX = "cond_stage_model.model."  # the OpenCLIP text tower inside a Stable Diffusion 2.x checkpoint
_OPENCLIP_PREFIXES = (SD2_TEXT_PREFIX, "module.")  # "module.": an open_clip DDP training checkpoint
_OPENCLIP_IGNORED = ("visual.", "logit_scale", "logit_bias")


@contextlib.contextmanager
def quiet_random_init_warning() -> Iterator[None]:
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
                 model_overrides: dict[str, Any] | None = None, final_norm: bool = True):
        """path: checkpoint file (a CLIP state dict, or a whole SD 2.x checkpoint); None keeps random weights.

        model_overrides go to ``open_clip.create_model`` as config overrides (e.g. a small ``text_cfg``).
        """
        super().__init__()
        import open_clip

        check_layer(layer)
        with quiet_random_init_warning():
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
        self.mask_padding, self.pooled, self.final_norm = mask_padding, pooled, final_norm
        self.dim = int(tower.positional_embedding.shape[1])
        projection = tower.text_projection
        if projection is None:
            self.pooled_dim = self.dim
        else:
            self.pooled_dim = int(projection.out_features if isinstance(projection, torch.nn.Module)
                                  else projection.shape[1])
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
        hidden = tower.ln_final(states[0]) if self.final_norm else states[0]  # (B, L, D)
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
