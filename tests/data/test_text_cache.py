"""Text embeddings cached in shards: exact round trip through make_loader (float32 / float16 / bfloat16), several
captions per sample, the stored null condition, latents + text in one sample, stale caches refused by fingerprint."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.conditioning import build_text_encoder, null_condition, text_encoder_fingerprint
from ldm.data import make_loader, resolve_shards
from ldm.data.shards import encode_png, write_shards
from ldm.data.text_cache import check_text_cache, encode_text_shards, load_cached_null_condition
from tests.conditioning.tiny import tiny_clip_config, tiny_clip_tokenizer

L, D, P = 6, 8, 4


def fake_encode(prompts: list[str]) -> dict[str, torch.Tensor]:
    """A deterministic stand-in encoder: each prompt's features depend on that prompt alone (any batching)."""
    out = {"context": [], "context_mask": [], "pooled": []}
    for p in prompts:
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:6], "big"))
        out["context"].append(torch.randn(L, D, generator=g))
        out["context_mask"].append(torch.arange(L) < 1 + len(p) % L)
        out["pooled"].append(torch.randn(P, generator=g))
    return {k: torch.stack(v) for k, v in out.items()}


def _sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    return {"__key__": f"k{i:03d}", "png": encode_png(Image.fromarray(pixels)), "txt": f"caption number {i}",
            "json": json.dumps({"tags": []}).encode()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    names, counts = write_shards((_sample(i) for i in range(14)), out, "train", samples_per_shard=5)
    val_names, val_counts = write_shards((_sample(i) for i in range(100, 103)), out, "val", samples_per_shard=5)
    index = {"splits": {"train": {"shards": names, "counts": counts, "total": sum(counts)},
                        "val": {"shards": val_names, "counts": val_counts, "total": sum(val_counts)}}}
    (out / "index.json").write_text(json.dumps(index))
    return out


def _null() -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in fake_encode([""]).items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cached_embeddings_round_trip_exactly(images, tmp_path, dtype):
    out = tmp_path / "cache"
    index = encode_text_shards(str(images), out, fake_encode, fingerprint="f" * 64, null_cond=_null(), dtype=dtype,
                               batch_size=4, progress=False)
    assert index["text"]["dtype"] == dtype and (index["text"]["max_length"], index["text"]["dim"]) == (L, D)
    assert index["splits"]["train"]["total"] == 14 and index["splits"]["val"]["total"] == 3
    store = getattr(torch, dtype)
    for split in ("train", "val"):
        cached = list(make_loader(resolve_shards(str(out), split), batch_size=4, image_size=8, seed=3,
                                  shuffle_buffer=5, text=True))
        plain = list(make_loader(resolve_shards(str(images), split), batch_size=4, image_size=8, seed=3,
                                 shuffle_buffer=5))
        assert [b["key"] for b in cached] == [b["key"] for b in plain]  # same samples, same order
        for got, ref in zip(cached, plain):
            assert got["caption"] == ref["caption"] and torch.equal(got["image"], ref["image"])
            expected = fake_encode(got["caption"])
            assert got["context"].dtype == torch.float32 and got["context_mask"].dtype == torch.bool
            assert torch.equal(got["context"], expected["context"].to(store).float())  # (B, L, D)
            assert torch.equal(got["pooled"], expected["pooled"].to(store).float())  # (B, P)
            assert torch.equal(got["context_mask"], expected["context_mask"])  # (B, L)
    null = load_cached_null_condition(str(out))
    assert null.keys() == {"context", "context_mask", "pooled"}
    assert all(torch.equal(null[k], v) for k, v in _null().items())  # float32, whatever the cache's dtype


def test_several_captions_per_sample(images, tmp_path):
    out = tmp_path / "cache"

    def two(sample: dict) -> list[str]:
        text = sample["txt"].decode()
        return [text, text.upper()]

    encode_text_shards(str(images), out, fake_encode, fingerprint="f" * 64, null_cond=_null(), captions=two,
                       splits=("train",), progress=False)
    seen = set()
    loader = make_loader(resolve_shards(str(out)), batch_size=7, image_size=8, seed=1, text=True)
    for _ in range(3):  # epochs
        for batch in loader:
            for i, cap in enumerate(batch["caption"]):
                k = int(batch["key"][i][1:])
                assert cap in (f"caption number {k}", f"CAPTION NUMBER {k}")
                seen.add(cap)
            assert torch.equal(batch["context"], fake_encode(batch["caption"])["context"])
    assert len(seen) > 14  # both captions of some samples came out: one embedding per caption


def test_latents_and_text_in_one_sample(tmp_path):
    latents = tmp_path / "latents"
    samples = []
    for i in range(5):
        buf = io.BytesIO()
        np.save(buf, np.full((4, 2, 2), i, dtype=np.float32))
        samples.append({"__key__": f"z{i}", "npy": buf.getvalue(), "txt": f"latent {i}"})
    names, counts = write_shards(samples, latents, "train")
    (latents / "index.json").write_text(json.dumps({"splits": {"train": {"shards": names, "counts": counts,
                                                                          "total": 5}},
                                                    "latents": {"encoder_hash": "abc", "latent_shape": [4, 2, 2]}}))
    index = encode_text_shards(str(latents), tmp_path / "both", fake_encode, fingerprint="f" * 64,
                               null_cond=_null(), progress=False)
    assert index["latents"]["encoder_hash"] == "abc"  # the latent cache's record travels along
    batch = next(iter(make_loader(resolve_shards(str(tmp_path / "both")), batch_size=5, image_size=1,
                                  shuffle_buffer=0, latents=True, text=True)))
    assert batch["latent"].shape == (5, 4, 2, 2) and batch["context"].shape == (5, L, D)
    assert [float(z[0, 0, 0]) for z in batch["latent"]] == [float(k[1:]) for k in batch["key"]]
    assert torch.equal(batch["context"], fake_encode(batch["caption"])["context"])


def test_fingerprint_refuses_a_cache_of_another_encoder(images, tmp_path):
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    CLIPTextModel(tiny_clip_config(tokenizer)).save_pretrained(tmp_path / "clip" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "clip" / "tokenizer")
    build = lambda **kw: build_text_encoder("clip", str(tmp_path / "clip"), **{"max_length": 12, "pooled": True, **kw})
    encoder = build()
    fingerprint = text_encoder_fingerprint(encoder)
    assert text_encoder_fingerprint(build()) == fingerprint  # the same files and settings
    for other in (build(max_length=10), build(layer="penultimate"), build(mask_padding=True)):
        assert text_encoder_fingerprint(other) != fingerprint
    out = tmp_path / "cache"
    encode_text_shards(str(images), out, encoder, fingerprint=fingerprint, null_cond=null_condition(encoder),
                       batch_size=5, splits=("train",), progress=False)
    info = check_text_cache(str(out), fingerprint)
    assert (info["max_length"], info["dim"], info["pooled_dim"]) == (12, 32, 32)
    batch = next(iter(make_loader(resolve_shards(str(out)), batch_size=5, image_size=8, shuffle_buffer=0,
                                  text=True)))
    fresh = encoder(batch["caption"])
    torch.testing.assert_close(batch["context"], fresh["context"], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["pooled"], fresh["pooled"], atol=1e-6, rtol=0)
    assert all(torch.equal(v, null_condition(encoder)[k]) for k, v in load_cached_null_condition(str(out)).items())

    retrained = build()
    with torch.no_grad():
        retrained.model.get_input_embeddings().weight.mul_(1.01)  # same architecture, other weights
    other = text_encoder_fingerprint(retrained)
    with pytest.raises(ValueError) as err:
        check_text_cache(str(out), other)
    assert fingerprint[:16] in str(err.value) and other[:16] in str(err.value) and "re-encode" in str(err.value)
    with pytest.raises(ValueError, match="no 'text' section"):
        check_text_cache(str(images), fingerprint)
