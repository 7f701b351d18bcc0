"""Dataset builders: image folders (sidecar .txt, CSV, JSONL) and re-sharded img2dataset tars read back through
the stream equal their sources; bad input is skipped and counted; builds are deterministic; CLI exit codes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.cli.shards import main as shards_main
from ldm.data import build_folder_shards, make_loader, reshard, resolve_shards
from ldm.data.builders import BuildError, held_out
from ldm.data.decode import resize_center_crop, to_rgb
from tests.data.test_shards_stream import tar_samples
from tests.data.test_urls import serve_directory

SIZE = 16


def _rng_pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def make_image_folder(root: Path) -> dict[str, str]:
    """Images of many modes with sidecar captions plus bad ones; returns {relative path: caption} of the good ones."""
    (root / "sub").mkdir(parents=True)
    palette = Image.fromarray(_rng_pixels(3, (18, 22)) % 8, "L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i * 30 % 256, i * 70 % 256, i * 110 % 256)])
    palette.info["transparency"] = 2
    images = {
        "rgb.png": Image.fromarray(_rng_pixels(0, (20, 30, 3))),  # non-square: resized and cropped
        "rgba.png": Image.fromarray(_rng_pixels(1, (24, 24, 4)), "RGBA"),
        "sub/grey.png": Image.fromarray(_rng_pixels(2, (16, 16))),
        "sub/palette.png": palette,
        "cmyk.jpg": Image.fromarray(_rng_pixels(4, (24, 24, 4)), "CMYK"),
        "photo.jpg": Image.fromarray(_rng_pixels(5, (SIZE, SIZE, 3))),  # RGB at the output size: kept as JPEG
        "deep.png": Image.fromarray((np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 257)),  # 16-bit
    }
    captions = {}
    for i, (name, image) in enumerate(images.items()):
        image.save(root / name)
        captions[name] = f"caption {i}: {name.split('/')[-1]}"
        (root / name).with_suffix(".txt").write_text(f"  {captions[name]}\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "broken.txt").write_text("a corrupt file")
    Image.fromarray(_rng_pixels(6, (8, 8, 3))).save(root / "empty.png")
    (root / "empty.txt").write_text(" \n")
    Image.fromarray(_rng_pixels(7, (8, 8, 3))).save(root / "uncaptioned.png")
    (root / "notes.md").write_text("not an image")
    return captions


def expected_pixels(path: Path, size: int | None) -> torch.Tensor:
    """What the stream yields for a raw image file: to_rgb, resize + crop, scaled to [-1, 1]; (3, H, W)."""
    with Image.open(path) as image:
        rgb = to_rgb(image)
        if size is not None:
            rgb = resize_center_crop(rgb, size)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def read_split(out: Path, split: str, image_size: int = SIZE) -> dict[str, tuple[torch.Tensor, str]]:
    """{key: (image (3, H, W), caption)} of one split, read back through make_loader."""
    loader = make_loader(resolve_shards(str(out), split), batch_size=1, image_size=image_size, shuffle_buffer=0)
    return {b["key"][0]: (b["image"][0], b["caption"][0]) for b in loader}


def shard_samples(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """{split: {key: {ext: bytes}}} of every shard in the index, checking the index counts on the way."""
    index = json.loads((out / "index.json").read_text())
    result = {}
    for split, info in index["splits"].items():
        result[split] = {}
        assert sum(info["counts"]) == info["total"] and len(info["shards"]) == len(info["counts"])
        for name, count in zip(info["shards"], info["counts"]):
            samples = tar_samples(out / name)
            assert len(samples) == count <= index["samples_per_shard"]
            result[split].update(samples)
    return result


def check_folder_build(src: Path, out: Path, captions: dict[str, str], keys: dict[str, str], val_fraction: float):
    """Every good image comes back equal to its source with its caption, in the split its hash gives."""
    samples = shard_samples(out)
    for split in samples:
        for key, (image, caption) in read_split(out, split).items():
            name = next(n for n, k in keys.items() if k == key)
            assert caption == captions[name]
            assert held_out(name, val_fraction, 0) == (split == "val")
            if name == "deep.png":  # 16-bit grey: the high byte (closed form), not clipped at 255
                grey = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 257) >> 8
                assert torch.equal(image, torch.from_numpy(grey).float().div(127.5).sub(1.0).expand(3, -1, -1))
            else:
                assert torch.equal(image, expected_pixels(src / name, SIZE)), name
            meta = json.loads(samples[split][key]["json"])
            assert meta["source"] == name
    assert sorted(k for s in samples.values() for k in s) == sorted(keys.values())
    return samples


def test_folder_with_sidecar_captions(tmp_path):
    src = tmp_path / "images"
    captions = make_image_folder(src)
    keys = {n: n.rsplit(".", 1)[0].replace("/", "_") for n in captions}
    index = build_folder_shards(src, tmp_path / "out", image_size=SIZE, samples_per_shard=3, val_fraction=0.3)
    assert index["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    assert index == json.loads((tmp_path / "out" / "index.json").read_text())
    assert set(index["splits"]) == {"train", "val"} and index["image_size"] == SIZE
    samples = check_folder_build(src, tmp_path / "out", captions, keys, 0.3)
    every = {k: v for s in samples.values() for k, v in s.items()}
    assert every["photo"]["jpg"] == (src / "photo.jpg").read_bytes()  # RGB at size: the original JPEG bytes
    assert all("png" in every[k] for k in keys.values() if k != "photo")  # converted: lossless PNG
    assert not list((tmp_path / "out").glob("*.tmp"))

    # keep the size: an RGB PNG keeps its bytes and size; RGBA is composited on white at its own size
    kept = build_folder_shards(src, tmp_path / "kept", image_size=None, val_fraction=0.0)
    assert kept["image_size"] is None and set(kept["splits"]) == {"train"}
    train = shard_samples(tmp_path / "kept")["train"]
    assert train["rgb"]["png"] == (src / "rgb.png").read_bytes()
    rgba = np.asarray(Image.open(io.BytesIO(train["rgba"]["png"])), dtype=np.float64)
    source = np.asarray(Image.open(src / "rgba.png"), dtype=np.float64)
    alpha = source[..., 3:] / 255
    np.testing.assert_allclose(rgba, source[..., :3] * alpha + 255 * (1 - alpha), atol=1)  # closed form


def test_csv_and_jsonl_captions(tmp_path):
    src = tmp_path / "images"
    sidecar = make_image_folder(src)
    good = ["rgb.png", "sub/palette.png", "cmyk.jpg", "deep.png", "photo.jpg"]
    rows = [(n, sidecar[n], f"lic{i}") for i, n in enumerate(good)]
    rows += [("missing.png", "listed but absent", "x"), ("rgba.png", "", "x"), ("broken.png", "corrupt", "x")]
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("file,text,license\n" + "".join(f'{p},"{c}",{lic}\n' for p, c, lic in rows))
    jsonl_file = tmp_path / "list.jsonl"
    jsonl_file.write_text("\n".join(json.dumps({"image": p, "caption": c or None, "license": lic})
                                    for p, c, lic in rows) + "\n")
    keys = {n: n.rsplit(".", 1)[0].replace("/", "_") for n in good}
    captions = {n: sidecar[n] for n in good}
    for table, empty in ((csv_file, "empty_caption"), (jsonl_file, "missing_caption")):
        out = tmp_path / table.suffix[1:]
        index = build_folder_shards(src, out, captions=table, image_size=SIZE, samples_per_shard=2,
                                    val_fraction=0.3)
        assert index["skipped"] == {"corrupt_image": 1, "missing_file": 1, empty: 1}
        samples = check_folder_build(src, out, captions, keys, 0.3)
        for split in samples.values():  # the other columns are kept as metadata
            for key, sample in split.items():
                name = next(n for n, k in keys.items() if k == key)
                assert json.loads(sample["json"]) == {"license": f"lic{good.index(name)}", "source": name}
    # the same rows as CSV or as JSONL give byte-identical shards
    for name in json.loads((tmp_path / "csv" / "index.json").read_text())["splits"]["train"]["shards"]:
        assert (tmp_path / "csv" / name).read_bytes() == (tmp_path / "jsonl" / name).read_bytes()


def test_builds_are_deterministic(tmp_path):
    src = tmp_path / "images"
    make_image_folder(src)

    def build(out, seed):
        build_folder_shards(src, out, image_size=SIZE, samples_per_shard=3, val_fraction=0.3, seed=seed)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".tar"}

    first = build(tmp_path / "a", 0)
    assert build(tmp_path / "b", 0) == first  # same input and seed: byte-identical shards
    assert build(tmp_path / "a", 0) == first  # rebuilt in place
    assert build(tmp_path / "c", 1) != first  # another seed: another split and order


def write_img2dataset(folder: Path) -> dict[str, dict]:
    """Three img2dataset-style tars (key.jpg|png, key.txt, key.json; a parquet beside them); the last one is
    truncated in the middle of an image. Returns {key: {"image": PIL, "caption", "meta"}} of every readable one."""
    folder.mkdir()
    expected = {}
    for shard in range(3):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(5):
                key = f"{shard:04d}{i:05d}"
                mode = "RGBA" if i == 2 else "RGB"
                image = Image.fromarray(_rng_pixels(100 * shard + i, (20, 28, len(mode))), mode)
                buf = io.BytesIO()
                image.save(buf, format="PNG" if mode == "RGBA" else "JPEG", quality=90)
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "width": 28, "height": 20}
                sample = {"__key__": key, "png" if mode == "RGBA" else "jpg": buf.getvalue(),
                          "txt": f"photo {key}", "json": json.dumps(meta)}
                if shard == 1 and i == 1:
                    sample["jpg"] = b"\xff\xd8\xff broken jpeg"
                elif shard == 1 and i == 3:
                    del sample["txt"]
                else:
                    expected[key] = {"image": Image.open(buf), "caption": f"photo {key}", "meta": meta}
                sink.write(sample)
    (folder / "00000.parquet").write_bytes(b"PAR1 not a tar")
    (folder / "00000_stats.json").write_text("{}")
    last = folder / "00002.tar"
    with tarfile.open(last) as tar:
        member = tar.getmember("000200003.jpg")
    last.write_bytes(last.read_bytes()[: member.offset_data + member.size // 2])
    for i in (3, 4):  # cut off
        del expected[f"0002{i:05d}"]
    return expected


def check_reshard(out: Path, expected: dict[str, dict], source_prefix: str) -> None:
    samples = shard_samples(out)
    assert sorted(k for s in samples.values() for k in s) == sorted(expected)
    for split in samples:
        for key, (image, caption) in read_split(out, split, image_size=12).items():
            assert held_out(key, 0.25, 0) == (split == "val")
            assert caption == expected[key]["caption"]
            rgb = resize_center_crop(to_rgb(expected[key]["image"]), 12)
            assert torch.equal(image, torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).div(127.5).sub(1.0))
            meta = json.loads(samples[split][key]["json"])
            ext = "png" if key.endswith("2") else "jpg"
            assert meta == {**expected[key]["meta"], "source": f"{source_prefix}/0{key[:4]}.tar#{key}.{ext}"}


def test_reshard_img2dataset_tars_local_and_over_http(tmp_path):
    expected = write_img2dataset(tmp_path / "in")
    index = reshard([str(tmp_path / "in")], tmp_path / "out", image_size=12, samples_per_shard=4, val_fraction=0.25)
    assert index["skipped"] == {"bad_shard": 1, "corrupt_image": 1, "missing_caption": 1}
    assert index["image_size"] == 12 and index["source"]["shards"] == 3
    for split in index["splits"].values():  # 4 per shard but the last
        assert set(split["counts"][:-1]) <= {4} and 0 < split["counts"][-1] <= 4
    check_reshard(tmp_path / "out", expected, str(tmp_path / "in"))

    # a brace pattern over http (plus a missing URL, counted as one more bad shard) gives the same shards
    with serve_directory(tmp_path / "in", "00000.tar") as base:
        urls = [f"{base}/{{00000..00002}}.tar", f"{base}/00009.tar"]
        http = reshard(urls, tmp_path / "http", image_size=12, samples_per_shard=4, val_fraction=0.25)
    assert http["skipped"] == {**index["skipped"], "bad_shard": 2} and http["splits"] == index["splits"]
    for split in index["splits"].values():
        for name in split["shards"]:
            local, remote = tar_samples(tmp_path / "out" / name), tar_samples(tmp_path / "http" / name)
            for key in local:  # identical apart from where the sample came from
                assert local[key].pop("json") != remote[key].pop("json") and local[key] == remote[key]

    # re-sharding again (through pipe:) at the kept size is lossless: the PNGs written above come back byte for byte
    train = index["splits"]["train"]
    again = reshard([f"pipe:cat {tmp_path}/out/train-{{000000..{len(train['shards']) - 1:06d}}}.tar"],
                    tmp_path / "again", image_size=None, samples_per_shard=100, val_fraction=0.0)
    assert again["skipped"] == {} and again["splits"]["train"]["counts"] == [train["total"]]
    before = {k: v["png"] for name in train["shards"] for k, v in tar_samples(tmp_path / "out" / name).items()}
    assert {k: v["png"] for k, v in tar_samples(tmp_path / "again" / "train-000000.tar").items()} == before


def test_cli_builds_and_usage_errors_exit_2(tmp_path, capsys):
    src = tmp_path / "images"
    make_image_folder(src)
    assert shards_main(["folder", "--images", str(src), "--out", str(tmp_path / "o"), "--image-size", "none",
                        "--samples-per-shard", "4", "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "image_size=kept" in out and "skipped: corrupt_image=1, empty_caption=1, missing_caption=1" in out
    assert json.loads((tmp_path / "o" / "index.json").read_text())["splits"]["train"]["total"] == 7

    (tmp_path / "nocap.csv").write_text("path,label\nrgb.png,x\n")
    (tmp_path / "bad.jsonl").write_text('{"path": "rgb.png", "caption": "x"}\n[1, 2]\n')
    cases = {
        ("folder", "--images", str(tmp_path / "nope")): "image folder",
        ("folder", "--images", str(src), "--captions", str(tmp_path / "nocap.csv")): "no caption column",
        ("folder", "--images", str(src), "--captions", str(tmp_path / "nocap.csv"), "--path-column", "file"):
            "no path column 'file'",
        ("folder", "--images", str(src), "--captions", str(tmp_path / "bad.jsonl")): "bad.jsonl:2",
        ("folder", "--images", str(src), "--captions", str(tmp_path / "none.csv")): "not found",
        ("reshard", str(tmp_path / "none-{0..2}.tar")): "no shards match",
        ("folder", "--images", str(tmp_path / "o")): "has no images",
    }
    for argv, message in cases.items():
        assert shards_main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    for argv in (["folder", "--out", "x"], ["folder", "--images", str(src), "--out", "x", "--image-size", "-3"],
                 ["reshard", "--out", "x"]):
        with pytest.raises(SystemExit) as exc:
            shards_main(argv)
        assert exc.value.code == 2
    assert not (tmp_path / "x").exists()
    (tmp_path / "bad.csv").write_text("path,caption\nbroken.png,x\nmissing.png,y\n")
    with pytest.raises(BuildError, match="no usable sample"):  # nothing written, not even an empty index
        build_folder_shards(src, tmp_path / "y", captions=tmp_path / "bad.csv")
    assert not list((tmp_path / "y").iterdir())
