"""Emoji source: npm fetch/cache, safe extraction, the label join, compositing on white."""

import io
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm.data import emoji
from ldm.data.emoji import EmojiDataError, emoji_records, extract_package, fetch_npm_package, load_rgb

def test_join_labels_every_image(npm_cache):
    records = emoji_records(cache_dir=npm_cache)
    for style in ("google", "twitter"):
        mine = [r for r in records if r.style == style]
        assert len(mine) == 3786
        assert all(r.label.strip() for r in mine)
        assert all(r.png.is_file() for r in mine)
    assert len({r.key for r in records}) == len(records)
    assert all("." not in r.key for r in records)  # WebDataset splits keys at the first dot
    apple = next(r for r in records if r.key == "google_1f34e")
    assert apple.label == "red apple" and "fruit" in apple.tags and apple.category == "Food & Drink"
    tone = next(r for r in records if r.code == "1f44b-1f3ff")
    assert tone.base == "1f44b" and tone.label == "waving hand: dark skin tone" and tone.tags


def test_rgba_composited_on_white(npm_cache):
    records = emoji_records(styles=("twitter",), cache_dir=npm_cache)
    png = next(r.png for r in records if r.code == "1f34e")
    with Image.open(png) as raw:
        alpha = np.asarray(raw.convert("RGBA"))[..., 3]
    rgb = load_rgb(png)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    pixels = np.asarray(rgb)
    assert (alpha == 0).any()
    assert (pixels[alpha == 0] == 255).all()
    assert (pixels[alpha == 255] != 255).any()  # the apple itself is not white


def test_fetch_uses_cache_and_reports_missing_npm(tmp_path, monkeypatch):
    (tmp_path / "pkg-1.0.0.tgz").write_bytes(b"x")
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    assert fetch_npm_package("pkg", "1.0.0", tmp_path) == tmp_path / "pkg-1.0.0.tgz"
    with pytest.raises(EmojiDataError, match="npm not found"):
        fetch_npm_package("other", "1.0.0", tmp_path)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed")
def test_npm_failure_is_clear(tmp_path):
    with pytest.raises(EmojiDataError, match="npm pack"):
        fetch_npm_package("emoji-datasource-google", "0.0.0-does-not-exist", tmp_path)


def test_extraction_is_safe(tmp_path):
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name in ["package/ok.txt", "package/../escape.txt", "/abs.txt", "other/x.txt"]:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("package/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    out = extract_package(tgz, lambda name: True, tmp_path / "out")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink())
    assert files == [".complete", "package/ok.txt"]
    assert not (tmp_path / "escape.txt").exists()
