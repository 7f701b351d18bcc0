"""A text encoder's fingerprint: SHA-256 over its settings, tokenizer vocabulary and weights.

A cache of text embeddings is valid only for the encoder that made it; any change of weights (another
checkpoint), tokenizer (another vocabulary or merges) or setting (layer, final norm, length, masking, pooling,
the order of a composite's encoders) changes the fingerprint, so a stale cache is refused instead of
silently training on other embeddings.

Two forms: ``text_encoder_fingerprint(encoder)`` of a loaded encoder (its modules and tensors), and
``files_fingerprint(specs, null)`` of encoder specs (``build_text_encoders``' arguments) from their files alone: the
settings and the bytes of each encoder's model and tokenizer files. Training checks a text cache with the second,
so it refuses a stale cache without loading any text encoder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

SETTINGS = ("max_length", "dim", "pooled_dim", "layer", "final_norm", "mask_padding", "pooled", "projection",
            "pooled_from")


def _settings(module: nn.Module) -> dict[str, Any]:
    return {"class": type(module).__name__, **{k: getattr(module, k) for k in SETTINGS if hasattr(module, k)}}


def _tokenizer_state(tokenizer: Any) -> Any:
    """What a tokenizer maps text with: its vocabulary (and BPE merges), special tokens and length settings."""
    if hasattr(tokenizer, "get_vocab"):  # transformers
        special = getattr(tokenizer, "all_special_tokens", [])
        return {"vocab": sorted(tokenizer.get_vocab().items()), "special": list(special),
                "lower": bool(getattr(tokenizer, "do_lower_case", False)), "class": type(tokenizer).__name__}
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's wrapper holds a SimpleTokenizer
    state = {"class": type(tokenizer).__name__, "context_length": getattr(tokenizer, "context_length", None)}
    if hasattr(inner, "encoder"):
        state["vocab"] = sorted(inner.encoder.items())
    if hasattr(inner, "bpe_ranks"):
        state["merges"] = sorted((" ".join(pair), rank) for pair, rank in inner.bpe_ranks.items())
    if len(state) == 2:
        raise ValueError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: no vocabulary found")
    return state


def text_encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 hex digest of an encoder's (or a composite's) settings, tokenizers and weights, in module order."""
    h = hashlib.sha256()
    for name, module in encoder.named_modules():
        if hasattr(module, "max_length"):  # every text encoder, composites and their parts
            h.update(json.dumps([name, _settings(module)], sort_keys=True, default=str).encode())
        if hasattr(module, "tokenizer") and not isinstance(module.tokenizer, nn.Module):
            h.update(json.dumps([name, _tokenizer_state(module.tokenizer)], default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


FILES_FORMAT = 1  # bump when what files_fingerprint covers changes
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256 of the file, per process


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def _folder_files(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def encoder_files(spec: Mapping[str, Any]) -> list[Path]:
    """The files an encoder spec reads its weights and tokenizer from (the layouts ``hf``, ``clip``, ``t5`` and
    ``openclip`` load; openclip's tokenizer ships in its package, whose version the settings record)."""
    kind, path = spec["kind"], spec.get("path")
    if kind == "hf":
        from ldm.conditioning.hf import default_text_encoder_path

        return list(_folder_files(Path(path or default_text_encoder_path())))
    if kind == "openclip":
        return [Path(path)]
    model_dir, tokenizer = Path(path), spec.get("tokenizer_path")
    subfolder = spec.get("subfolder", "text_encoder")
    if (model_dir / subfolder).is_dir():  # a diffusers pipeline folder: only this encoder's two folders
        model_dir = model_dir / subfolder
        tokenizer = tokenizer or str(model_dir.parent / subfolder.replace("text_encoder", "tokenizer"))
    own_tokenizer = ("tokenizer.json", "vocab.json", "spiece.model")
    if tokenizer is None and not any((model_dir / f).is_file() for f in own_tokenizer):
        tokenizer = str(model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer"))
    folders = [model_dir] + ([Path(tokenizer)] if tokenizer and Path(tokenizer) != model_dir else [])
    return [f for folder in folders for f in _folder_files(folder)]


def files_fingerprint(specs: Sequence[Mapping[str, Any]], null: str = "empty",
                      pooled_from: int | Sequence[int] | None = None,
                      appended: Sequence[Mapping[str, Any]] = ()) -> str:
    """SHA-256 of encoder specs from their files (no model is loaded): the settings of each (paths aside), the
    null-condition kind, which encoders pool, which follow along the tokens (``appended``), the library versions that
    tokenize and run them, and every file's bytes. Files are hashed once per process (keyed by path, size and
    modification time)."""
    versions = {name: _version(name) for name in ("transformers", "open_clip_torch", "tokenizers")}
    h = hashlib.sha256()
    settings = [{k: v for k, v in spec.items() if k not in ("path", "tokenizer_path")} for spec in specs]
    record = {"format": FILES_FORMAT, "settings": settings, "null": null, "pooled_from": pooled_from,
              "versions": versions}
    if appended:  # absent otherwise: the fingerprints of caches written before appended encoders existed hold
        record["appended"] = [{k: v for k, v in spec.items() if k not in ("path", "tokenizer_path")}
                              for spec in appended]
        specs = [*specs, *appended]
    h.update(json.dumps(record, sort_keys=True, default=str).encode())
    for i, spec in enumerate(specs):
        files = encoder_files(spec)
        if not files:
            raise FileNotFoundError(f"text encoder {i} ({spec['kind']}): no model files at {spec.get('path')}")
        for path in files:
            h.update(f"{i}:{path.name}:{_file_digest(path)}".encode())
    return h.hexdigest()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
