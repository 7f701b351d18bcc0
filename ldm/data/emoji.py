"""Emoji image-caption pairs from npm packages: art from emoji-datasource, captions from emojibase.

Art: `emoji-datasource-google` (Apache-2.0) and `emoji-datasource-twitter` (CC-BY-4.0, credit
Twitter/Twemoji), 64-pixel PNGs at `package/img/<style>/64/<code>.png`. Captions: `emojibase-data`
`package/en/data.json` (`label`, `tags`). The two are joined on the code points with every FE0F
(variation selector 16) dropped, which matches every image of both styles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ldm.data.decode import to_rgb
from ldm.io import cache_dir

STYLES = ("google", "twitter")
DATASOURCE_VERSION = "16.0.0"
EMOJIBASE = ("emojibase-data", "17.0.0")
LICENSES = {"google": "Apache-2.0 (Google Noto Emoji)", "twitter": "CC-BY-4.0 (Twitter, Twemoji)"}


class EmojiDataError(RuntimeError):
    """Fetching or reading the emoji npm packages failed."""


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji image of one style, with its caption and metadata."""

    key: str  # e.g. "google_1f34e"; no dots, so it is a valid WebDataset key
    style: str  # "google" | "twitter"
    code: str  # image file stem, e.g. "1f34e" or "1f468-200d-1f469"
    base: str  # code of the emoji without skin tone; skin variants share it
    label: str  # caption text, e.g. "red apple"
    tags: tuple[str, ...]
    name: str  # emoji-datasource name, e.g. "RED APPLE"
    category: str
    subcategory: str
    png: Path

    def metadata(self) -> dict:
        """JSON-ready metadata (everything but the image path)."""
        meta = asdict(self)
        meta.pop("png")
        meta["tags"] = list(self.tags)
        meta["license"] = LICENSES[self.style]
        return meta


def default_cache_dir() -> Path:
    """Folder for npm tarballs: `$LDM_CACHE/npm`, else `~/.cache/ldm/npm`."""
    return cache_dir("npm")


def fetch_npm_package(name: str, version: str, cache_dir: Path) -> Path:
    """Return the path of `<name>-<version>.tgz` in cache_dir, running `npm pack` if it is not there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"{name}-{version}.tgz"
    if tarball.exists():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiDataError(f"npm not found on PATH; install Node.js or put {tarball.name} into {cache_dir}")
    proc = subprocess.run([npm, "pack", f"{name}@{version}"], cwd=cache_dir, capture_output=True, text=True)
    if proc.returncode != 0 or not tarball.exists():
        raise EmojiDataError(f"`npm pack {name}@{version}` failed in {cache_dir}: {proc.stderr.strip()[-500:]}")
    return tarball


def _safe_member(member: tarfile.TarInfo) -> bool:
    """A regular file under `package/` with a relative path and no `..` parts."""
    path = PurePosixPath(member.name)
    return (member.isfile() and not path.is_absolute() and ".." not in path.parts
            and len(path.parts) > 1 and path.parts[0] == "package")


def extract_package(tarball: Path, wanted: Callable[[str], bool], out_dir: Path) -> Path:
    """Extract the members of tarball whose name satisfies wanted into out_dir (once); returns out_dir."""
    done = out_dir / ".complete"
    if done.exists():
        return out_dir
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")  # private to this process
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if not (_safe_member(member) and wanted(member.name)):
                continue
            target = tmp.joinpath(*PurePosixPath(member.name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    (tmp / ".complete").touch()
    if done.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)  # an incomplete earlier attempt
        os.replace(tmp, out_dir)  # a crash above leaves only the .tmp folder
    return out_dir


def normalize_code(code: str) -> str:
    """Uppercase, dash-separated code points with every FE0F dropped: the join key."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


def _captions(data_json: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Map join key -> (label, tags) from emojibase; skin variants inherit the tags of their base."""
    captions = {}
    for entry in json.loads(data_json.read_text(encoding="utf-8")):
        tags = tuple(entry.get("tags") or ())
        captions[normalize_code(entry["hexcode"])] = (entry["label"], tags)
        for skin in entry.get("skins") or ():
            captions[normalize_code(skin["hexcode"])] = (skin["label"], tuple(skin.get("tags") or tags))
    return captions


def emoji_records(styles: tuple[str, ...] = STYLES, cache_dir: str | Path | None = None) -> list[EmojiRecord]:
    """All emoji images of the given styles with captions, fetching and extracting packages as needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name, version = EMOJIBASE
    base_dir = extract_package(fetch_npm_package(name, version, cache), lambda m: m == "package/en/data.json",
                               cache / f"{name}-{version}")
    captions = _captions(base_dir / "package" / "en" / "data.json")
    records = []
    for style in styles:
        if style not in STYLES:
            raise ValueError(f"unknown emoji style {style!r}; choose from {STYLES}")
        pkg = f"emoji-datasource-{style}"
        prefix = f"package/img/{style}/64/"
        pkg_dir = extract_package(fetch_npm_package(pkg, DATASOURCE_VERSION, cache),
                                  lambda m, p=prefix: m == "package/emoji.json" or m.startswith(p),
                                  cache / f"{pkg}-{DATASOURCE_VERSION}")
        entries = json.loads((pkg_dir / "package" / "emoji.json").read_text(encoding="utf-8"))
        for entry in entries:
            if not entry.get(f"has_img_{style}", True):
                continue
            variants = [entry] + list((entry.get("skin_variations") or {}).values())
            base = entry["image"].removesuffix(".png")
            for variant in variants:
                if not variant.get(f"has_img_{style}", True):
                    continue
                code = variant["image"].removesuffix(".png")
                png = pkg_dir / "package" / "img" / style / "64" / variant["image"]
                if not png.exists():
                    continue
                label, tags = captions.get(normalize_code(code), ("", ()))
                records.append(EmojiRecord(
                    key=f"{style}_{code}", style=style, code=code, base=base, label=label, tags=tags,
                    name=entry.get("name") or "", category=entry.get("category") or "",
                    subcategory=entry.get("subcategory") or "", png=png))
    return records


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file and return it as RGB composited on white."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
