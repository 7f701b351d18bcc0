"""Weights and files on disk, for every package: reading tensors safely, checking them against a model, and
writing files and folders atomically, and where caches live.

Tensors are read with safetensors or ``torch.load(weights_only=True)``, so loading never runs pickled code; a file
that is cut short or is not what its suffix says fails with one error naming the file. Writes go to a temporary
name beside the target and are renamed into place, so a crash leaves the previous version or the complete new one.
This module imports nothing of the project: the autoencoder, models, conditioning, data, evaluation and training
packages all use it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class WeightsError(ValueError):
    """A weights file that is missing, truncated, corrupt, unsafe or of the wrong layout; the message names it."""


# --- reading ------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .ckpt/.pt/.pth/.bin file read with torch.load(weights_only=True).

    Nothing is unpickled beyond tensors and plain containers, so a file cannot run code. A Lightning
    checkpoint's ``state_dict`` entry is returned when present. When some key starts with one of
    `prefixes`, only those keys are returned (and only those are read from a safetensors file, e.g.
    the VAE of a whole Stable Diffusion checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = _select(list(f.keys()), prefixes)
                return {k: f.get_tensor(k) for k in keys}
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise WeightsError(f"{path}: truncated or corrupt safetensors file ({_first_line(err)})") from None
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"{path}: unknown checkpoint format (expected {', '.join(WEIGHT_SUFFIXES)})")
    data = load_torch(path)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(data).__name__}")
    not_tensors = sorted(k for k, v in data.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise WeightsError(f"{path}: entries that are not tensors: {not_tensors[:10]}")
    return {k: data[k] for k in _select(list(data), prefixes)}


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file raises an error naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({_first_line(err)})") from None


def load_torch(path: str | os.PathLike, trusted: bool = False) -> Any:
    """torch.load of a file, tensors and plain containers only unless ``trusted`` (files this project wrote itself).

    A truncated or corrupt file raises an error naming it instead of torch's bare OSError or unpickling error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if trusted:
            raise WeightsError(f"{path}: truncated or corrupt file ({_first_line(err)})") from None
        raise WeightsError(f"{path}: refusing to unpickle objects other than tensors; convert the file to "
                           f"safetensors in a trusted environment ({_first_line(err)})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsError(f"{path}: truncated or corrupt file ({_first_line(err)})") from None


def _select(keys: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The keys under prefixes if there are any, else all keys."""
    chosen = [k for k in keys if k.startswith(prefixes)] if prefixes else []
    return chosen or keys


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_state_dict(
    expected: torch.nn.Module | Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise a WeightsError naming `source` and every missing, unexpected or mis-shaped key."""
    if isinstance(expected, torch.nn.Module):
        expected = expected.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        raise WeightsError(
            f"checkpoint {source} does not match the model config: "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {shapes}"
        )


# --- writing ------------------------------------------------------------------------------------------
def cpu_tensors(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a state dict's tensors (optionally cast), ready for safetensors."""
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        out[k] = (v.to(dtype) if dtype is not None else v).contiguous()
    return out


def save_tensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a state dict as safetensors (CPU, contiguous; optionally cast)."""
    from safetensors.torch import save_file

    save_file(cpu_tensors(state, dtype), str(path), metadata={"format": "pt"})


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write pretty, key-sorted JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path through a temporary file beside it and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_dir(name: str) -> Path:
    """The project's cache folder ``name``: ``$LDM_CACHE/<name>``, else ``~/.cache/ldm/<name>``."""
    root = os.environ.get("LDM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ldm") / name


def write_folder_atomically(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with fill(tmp) in a temp dir beside it, then rename it into place.

    A crash leaves either the previous folder or the complete new one, never a partial folder. The
    folder is replaced as a whole: other files inside an existing `folder` are not kept (callers that must
    not replace what they did not write check the target first, see ``ldm.export``).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fill(tmp)
        if folder.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old / folder.name, folder)  # put the previous version back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
