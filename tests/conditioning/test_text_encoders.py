"""Text encoders behind one interface: MiniLM (hf), CLIP (transformers) and OpenCLIP, from local files only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ldm.conditioning import (
    CLIPTextEncoder,
    OpenCLIPTextEncoder,
    build_text_encoder,
    conditioning_dropout,
    masked_mean,
    null_condition,
)
from tests.conditioning.tiny import TINY_OPENCLIP, tiny_clip_config, tiny_clip_tokenizer

PROMPTS = ["red apple", "a dog face with a hat", ""]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU


def _check_interface(encoder, cond: dict, batch: int) -> None:
    assert cond["context"].shape == (batch, encoder.max_length, encoder.dim)
    assert cond["context"].dtype == torch.float32 and cond["context_mask"].dtype == torch.bool
    assert cond["context_mask"].shape == (batch, encoder.max_length)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


# --- MiniLM (the default) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("hf", None, max_length=16, pooled=True)


def test_minilm_interface_and_similarity(minilm):
    cond = minilm(["red apple", "green apple", "traffic light"])
    _check_interface(minilm, cond, 3)
    pooled = cond["pooled"]  # (3, 384) mean over the real tokens
    torch.testing.assert_close(pooled, masked_mean(cond["context"], cond["context_mask"]))
    red, green, light = F.normalize(pooled, dim=-1)
    assert red @ green > red @ light + 0.1, (float(red @ green), float(red @ light))
    assert cond["context_mask"][0].sum() < 16  # padding is masked for this kind
    null = null_condition(minilm)
    assert null["context"].shape == (1, 16, 384)
    dropped = conditioning_dropout(cond, null, p=0.999999, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped["pooled"], null["pooled"].expand(3, -1))


def test_builder_rejects_unknown_kinds_and_options():
    with pytest.raises(ValueError, match="unknown text encoder kind 'bert'"):
        build_text_encoder("bert")
    with pytest.raises(ValueError, match="needs a path"):
        build_text_encoder("clip", None)
    with pytest.raises(ValueError, match="'hf'.*layer"):
        build_text_encoder("hf", None, 8, layer="penultimate")


# --- CLIP (transformers) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random 3-layer CLIP text model (32-d) saved as a diffusers-style pipeline folder."""
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    config = tiny_clip_config(tokenizer)
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    root = tmp_path_factory.mktemp("clip")
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root, model


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_from_folder_matches_in_memory_model(clip_folder, layer):
    root, original = clip_folder
    encoder = build_text_encoder("clip", str(root), max_length=12, layer=layer, pooled=True)
    assert isinstance(encoder, CLIPTextEncoder)
    cond = encoder(PROMPTS)
    _check_interface(encoder, cond, 3)
    assert cond["context_mask"].all()  # SD attends to the padding too
    ids = encoder.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=12,
                            return_tensors="pt")["input_ids"]
    reference = copy.deepcopy(original)
    if layer == "penultimate":  # the same network without its last layer: final_layer_norm(hidden_states[-2])
        reference.encoder.layers = reference.encoder.layers[:-1]
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state  # (3, 12, 32)
        pooled = original(input_ids=ids).pooler_output  # (3, 32)
    assert torch.equal(cond["context"], expected)
    assert torch.equal(cond["pooled"], pooled)
    masked = CLIPTextEncoder(str(root / "text_encoder"), max_length=12, mask_padding=True)  # tokenizer found beside
    assert masked(PROMPTS)["context_mask"].sum(1).tolist() == [len("redapple") + 2, 12, 2]  # truncated


def test_clip_folder_with_missing_weights_is_refused(clip_folder, tmp_path):
    root, original = clip_folder
    original.save_pretrained(tmp_path / "text_encoder")
    weights = tmp_path / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    del state["final_layer_norm.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layer_norm.weight"):
        CLIPTextEncoder(str(tmp_path / "text_encoder"), max_length=8, tokenizer_path=str(root / "tokenizer"))


# --- OpenCLIP ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openclip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_OPENCLIP)
    # Frozen like the encoder: nn.MultiheadAttention takes its fused inference path only without grads.
    return model.eval().requires_grad_(False)


def _openclip_encoder(path, **options) -> OpenCLIPTextEncoder:
    return build_text_encoder("openclip", str(path), options.pop("max_length", 77), model_name="ViT-B-32",
                              model_overrides={"embed_dim": 16, "text_cfg": TINY_OPENCLIP["text_cfg"]}, **options)


@pytest.mark.parametrize("layer, suffix", [("penultimate", ".safetensors"), ("last", ".pt")])
def test_openclip_from_checkpoint_matches_in_memory_model(openclip_model, tmp_path, layer, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in openclip_model.state_dict().items()}  # whole CLIP: visual too
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    encoder = _openclip_encoder(path, layer=layer, pooled=True)
    cond = encoder(PROMPTS)
    _check_interface(encoder, cond, 3)
    tokens = encoder.tokenizer(PROMPTS)  # (3, 77)
    with torch.no_grad():
        out = openclip_model.forward_intermediates(text=tokens, text_indices=2, normalize_intermediates=True,
                                                   intermediates_only=True)
        expected = out["text_intermediates"][0 if layer == "penultimate" else 1]  # ln_final(block n-2 | n-1)
        pooled = openclip_model.encode_text(tokens)  # (3, 16)
    assert torch.equal(cond["context"], expected)
    assert torch.equal(cond["pooled"], pooled)
    assert cond["context_mask"].all()


def test_openclip_short_context_sd2_checkpoint_and_mismatch(openclip_model, tmp_path):
    text_keys = {k: v.contiguous() for k, v in openclip_model.state_dict().items() if not k.startswith("visual.")}
    sd2 = {f"cond_stage_model.model.{k}": v for k, v in text_keys.items()}
    sd2["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of an SD 2.x checkpoint is ignored
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    full = _openclip_encoder(tmp_path / "sd2.safetensors", mask_padding=True)(PROMPTS)
    short = _openclip_encoder(tmp_path / "sd2.safetensors", max_length=16, mask_padding=True)(PROMPTS)
    torch.testing.assert_close(short["context"], full["context"][:, :16], atol=1e-6, rtol=0)  # causal: a prefix
    assert short["context_mask"].sum(1).tolist() == [4, 8, 2]  # <start> words <end>

    del text_keys["ln_final.weight"]
    text_keys["positional_embedding"] = text_keys["positional_embedding"][:50]
    save_file(text_keys, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as err:
        _openclip_encoder(tmp_path / "broken.safetensors")
    assert "missing keys ['ln_final.weight']" in str(err.value) and "positional_embedding" in str(err.value)


def test_memo_embedding_does_not_depend_on_the_batch_it_came_in(minilm):
    """Before: a caption was memoised from the batch it first came in, and a matmul rounds by its shape, so a resumed
    run (whose memo filled in other batches) drifted from the uninterrupted one in the last bits."""
    from ldm.conditioning.cache import CHUNK, CachedTextEncoder

    class BatchSensitive(torch.nn.Module):  # an encoder whose rounding depends on the batch size, as BLAS's does
        calls: list[int] = []

        def forward(self, prompts):
            self.calls.append(len(prompts))
            base = torch.tensor([[float(len(p))] for p in prompts]).expand(-1, 3)
            return {"context": (base + 1e-3 * len(prompts)).unsqueeze(1)}

    encoder = BatchSensitive()
    first, later = CachedTextEncoder(encoder), CachedTextEncoder(encoder)
    a = first(["red apple", "dog", "red heart", "dog"])["context"]
    b = later(["red heart"])["context"]
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], a[3])
    assert encoder.calls == [CHUNK, CHUNK]
    first([f"caption {i}" for i in range(CHUNK + 1)])
    assert encoder.calls[2:] == [CHUNK, CHUNK]
    # the real encoder: a caption's memoised embedding is bit-identical whatever its neighbours were
    x = CachedTextEncoder(minilm)(["red heart", "a dog face with a hat", "grinning face"])["context"][2]
    y = CachedTextEncoder(minilm)(["grinning face"] + [f"thing {i}" for i in range(CHUNK + 3)])["context"][0]
    assert torch.equal(x, y)


def test_cut_prompts_are_reported_once_and_counted(caplog):
    """A training run sees the same long captions every epoch: the first cut is named, later ones only counted."""
    encoder = build_text_encoder("hf", None, max_length=4)
    with caplog.at_level("WARNING", logger="ldm.conditioning.base"):
        encoder(["red apple", "a dog face with a hat"])
        encoder(["a dog face with a hat", "a grinning face with big eyes"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'a dog face with a hat'" in warnings[0] and "max_length=4" in warnings[0]
    assert encoder.prompts_cut == 3
