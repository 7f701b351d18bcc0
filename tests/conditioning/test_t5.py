"""T5 encoder-only text encoding and the SD3 layout, with tiny random-weight models saved to folders: against
transformers' T5EncoderModel, diffusers' PixArtAlphaPipeline and StableDiffusion3Pipeline prompt encoding, one
denoising step of our DiT / MMDiT on our conditions against diffusers' transformer on the pipeline's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.conditioning import (
    CompositeTextEncoder,
    FrozenTextEncoder,
    T5TextEncoder,
    build_text_encoder,
    build_text_encoders,
    expand_cond,
    files_fingerprint,
    null_condition,
    sd3_text_encoders,
)
from ldm.models import DiT, MMDiT
from tests.conditioning.tiny import tiny_clip_config, tiny_clip_tokenizer, tiny_t5_config, tiny_t5_tokenizer

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: one thread is fastest on a shared CPU

PROMPTS = ["red apple", "a dog face with a hat", ""]  # lower case: PixArt's pipeline lower-cases prompts
T5_LENGTH, CLIP_LENGTH = 12, 16
T5_DIM, CLIP_DIMS, CLIP_POOLED = 96, (32, 48), (16, 24)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    """A random-weight T5 encoder and its tokenizer in one folder."""
    from transformers import T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("t5")
    T5EncoderModel(tiny_t5_config(tokenizer, T5_DIM)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_t5_encoder_matches_transformers_with_and_without_the_mask(t5_folder):
    from transformers import AutoTokenizer, T5EncoderModel

    masked = build_text_encoder("t5", str(t5_folder), max_length=T5_LENGTH, pooled=True)
    full = build_text_encoder("t5", str(t5_folder), max_length=T5_LENGTH, mask_padding=False)
    assert isinstance(masked, T5TextEncoder) and (masked.dim, masked.max_length) == (T5_DIM, T5_LENGTH)
    model, tokenizer = T5EncoderModel.from_pretrained(t5_folder).eval(), AutoTokenizer.from_pretrained(t5_folder)
    batch = tokenizer(PROMPTS, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected_masked = model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expected_full = model(batch["input_ids"]).last_hidden_state
    cond, cond_full = masked(PROMPTS), full(PROMPTS)
    assert cond["context"].shape == (3, T5_LENGTH, T5_DIM)
    assert torch.equal(cond["context_mask"], batch["attention_mask"].bool())
    assert cond["context_mask"].sum(1).tolist() == [9, T5_LENGTH, 1]  # '▁r e d ▁a p p l e </s>', cut, '</s>'
    torch.testing.assert_close(cond["context"], expected_masked, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond_full["context"], expected_full, atol=1e-6, rtol=0)
    assert cond_full["context_mask"].all()  # SD3 attends to every position
    real = cond["context_mask"][..., None]  # the masks differ even at real tokens: T5 attends to padding unmasked
    assert ((cond["context"] - cond_full["context"]).abs() * real).max() > 1e-3
    weights = cond["context_mask"][..., None].float()
    torch.testing.assert_close(cond["pooled"], (cond["context"] * weights).sum(1) / weights.sum(1))
    masked.train()
    assert not masked.training and not any(p.requires_grad for p in masked.parameters())
    with pytest.raises(FileNotFoundError, match="T5 encoder folder not found"):
        build_text_encoder("t5", str(t5_folder / "missing"))
    with pytest.raises(ValueError, match="needs a path"):
        build_text_encoder("t5")


def test_pixart_prompt_encoding_and_a_dit_step_match_diffusers(t5_folder, tmp_path):
    """PixArt-alpha: T5 under its mask, the empty prompt as the null condition, the DiT cross-attending under the
    mask: our sample step = diffusers' transformer on the pipeline's embeddings and masks."""
    from transformers import AutoTokenizer, T5EncoderModel

    torch.manual_seed(1)
    ours_dit = DiT(hidden_size=32, num_heads=4, num_layers=2, context_dim=T5_DIM, sample_size=8).eval()
    transformer = diffusers.PixArtTransformer2DModel(**ours_dit.to_diffusers_config()).eval()
    ours_dit.load_state_dict(transformer.state_dict())
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(t5_folder), vae=None,
                                         text_encoder=T5EncoderModel.from_pretrained(t5_folder).eval(),
                                         transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.save_pretrained(tmp_path)  # a pipeline folder: text_encoder/ and tokenizer/
    encoder = build_text_encoder("t5", str(tmp_path), max_length=T5_LENGTH)
    cond, null = encoder(PROMPTS), expand_cond(null_condition(encoder), 3)
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, negative_prompt="", device="cpu",
                                                                   max_sequence_length=T5_LENGTH)
    torch.testing.assert_close(cond["context"], embeds, atol=1e-6, rtol=0)
    assert torch.equal(cond["context_mask"], mask.bool())
    torch.testing.assert_close(null["context"], negative, atol=1e-6, rtol=0)
    assert torch.equal(null["context_mask"], negative_mask.bool())
    x, t = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        out = ours_dit(x, t, cond["context"], cond["context_mask"])
        ref = transformer(x, embeds, timestep=t, encoder_attention_mask=mask).sample
    assert (out - ref).abs().max() < 1e-5


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, t5_folder) -> tuple[Path, object]:
    """A random-weight StableDiffusion3Pipeline (CLIP-L, CLIP-G, T5, a tiny SD3 transformer) saved to a folder."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(CLIP_LENGTH), tiny_clip_tokenizer(CLIP_LENGTH, pad_token="!")
    torch.manual_seed(2)
    clip_l = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, CLIP_DIMS[0], projection_dim=CLIP_POOLED[0]))
    clip_g = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2, CLIP_DIMS[1], projection_dim=CLIP_POOLED[1]))
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_DIM, caption_projection_dim=32, pooled_projection_dim=sum(CLIP_POOLED),
        out_channels=4, pos_embed_max_size=12)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=clip_l.eval(), tokenizer=tokenizer, text_encoder_2=clip_g.eval(), tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel.from_pretrained(t5_folder).eval(),
        tokenizer_3=AutoTokenizer.from_pretrained(t5_folder))
    folder = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(folder)
    return folder, pipe


def test_sd3_encoders_and_an_mmdit_step_match_diffusers_pipeline(sd3_folder):
    folder, pipe = sd3_folder
    encoder = build_text_encoders(**sd3_text_encoders(folder, max_length=CLIP_LENGTH, t5_max_length=T5_LENGTH))
    assert (encoder.dim, encoder.pooled_dim, encoder.max_length) == (T5_DIM, sum(CLIP_POOLED), CLIP_LENGTH + T5_LENGTH)
    cond = encoder(PROMPTS)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device="cpu", negative_prompt="", max_sequence_length=T5_LENGTH)
    assert cond["context"].shape == embeds.shape == (3, CLIP_LENGTH + T5_LENGTH, T5_DIM) and cond["context_mask"].all()
    torch.testing.assert_close(cond["context"], embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond["pooled"], pooled, atol=1e-6, rtol=0)
    assert not cond["context"][:, :CLIP_LENGTH, sum(CLIP_DIMS):].any()  # CLIP features zero-padded to T5's width
    null = expand_cond(null_condition(encoder), 3)  # SD3's negative for "": the empty prompt's encoding
    torch.testing.assert_close(null["context"], negative, atol=1e-6, rtol=0)
    torch.testing.assert_close(null["pooled"], negative_pooled, atol=1e-6, rtol=0)

    mmdit = MMDiT.from_diffusers_config(dict(pipe.transformer.config)).eval()
    mmdit.load_state_dict(pipe.transformer.state_dict(), strict=True)
    x, t = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        out = mmdit(x, t, cond["context"], cond["context_mask"], pooled=cond["pooled"])
        ref = pipe.transformer(x, embeds, pooled, timestep=t).sample
    assert (out - ref).abs().max() < 1e-5


class _Fixed(FrozenTextEncoder):
    """A stand-in encoder: constant features of a width and length, a given mask, an optional pooled vector."""

    def __init__(self, dim: int, length: int, value: float, attended: int, pooled: int = 0):
        super().__init__()
        self.dim, self.max_length, self.value, self.attended = dim, length, value, attended
        self.pooled, self.pooled_dim = pooled > 0, pooled
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, prompts):
        b = len(prompts)
        cond = {"context": torch.full((b, self.max_length, self.dim), self.value),
                "context_mask": (torch.arange(self.max_length) < self.attended).expand(b, -1)}
        if self.pooled:
            cond["pooled"] = torch.full((b, self.pooled_dim), self.value)
        return cond


def test_composite_appends_tokens_pads_features_and_concatenates_pooled_vectors():
    first, second = _Fixed(3, 4, 1.0, 2, pooled=2), _Fixed(2, 4, 2.0, 3, pooled=1)
    tail = _Fixed(4, 3, 5.0, 1)  # narrower than the first group's 5 features: padded to the widest
    composite = CompositeTextEncoder([first, second], pooled_from=[1, 0], appended=[tail, _Fixed(6, 2, 7.0, 2)])
    assert (composite.dim, composite.max_length, composite.pooled_dim) == (6, 9, 3)
    cond = composite(["a", "b"])
    assert cond["context"].shape == (2, 9, 6)
    assert cond["context"][0, 0].tolist() == [1, 1, 1, 2, 2, 0]
    assert cond["context"][0, 4].tolist() == [5, 5, 5, 5, 0, 0] and cond["context"][0, 8].tolist() == [7] * 6
    assert cond["context_mask"][0].tolist() == [True, True, True, False, True, False, False, True, True]
    assert cond["pooled"][0].tolist() == [2.0, 1.0, 1.0]  # encoder 1's, then encoder 0's
    with pytest.raises(ValueError, match="empty list"):
        CompositeTextEncoder([first], pooled_from=[])
    with pytest.raises(ValueError, match="not an index of the 2 encoders"):
        CompositeTextEncoder([first, second], pooled_from=[0, 2])
    with pytest.raises(ValueError, match="encoder 0 .*pooled=True"):
        CompositeTextEncoder([_Fixed(3, 4, 1.0, 2), second], pooled_from=[0, 1])


def test_files_fingerprint_covers_appended_encoders(sd3_folder):
    folder, _ = sd3_folder
    args = sd3_text_encoders(folder, max_length=CLIP_LENGTH, t5_max_length=T5_LENGTH)
    with_t5 = files_fingerprint(args["specs"], "empty", args["pooled_from"], args["appended"])
    assert with_t5 != files_fingerprint(args["specs"], "empty", args["pooled_from"])
    longer = [{**args["appended"][0], "max_length": T5_LENGTH + 1}]
    assert with_t5 != files_fingerprint(args["specs"], "empty", args["pooled_from"], longer)
    (folder / "tokenizer_3" / "extra.txt").write_text("changed")  # a file of T5's tokenizer folder
    assert with_t5 != files_fingerprint(args["specs"], "empty", args["pooled_from"], args["appended"])


def test_the_config_sections_t5_and_sd3_build_these_encoders(t5_folder, sd3_folder):
    """``text_encoder: {kind: t5}`` and ``{kind: sd3}`` build what the library functions build (the same encodings),
    their fingerprints differ, and the sd3 section gives the pooled vector an MMDiT needs."""
    from ldm.assemble import build_text_encoder, text_fingerprint
    from ldm.config import ConfigError, TextEncoderConfig
    from ldm.conditioning import build_text_encoder as library_encoder

    t5 = TextEncoderConfig(kind="t5", path=str(t5_folder), max_length=T5_LENGTH)
    t5.check()
    ours, ref = build_text_encoder(t5)(PROMPTS), library_encoder("t5", str(t5_folder), T5_LENGTH)(PROMPTS)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    assert not t5.gives_pooled()

    folder, _ = sd3_folder
    sd3 = TextEncoderConfig(kind="sd3", path=str(folder), max_length=CLIP_LENGTH, t5_max_length=T5_LENGTH)
    sd3.check()
    ours = build_text_encoder(sd3)(PROMPTS)
    ref = build_text_encoders(**sd3_text_encoders(folder, max_length=CLIP_LENGTH, t5_max_length=T5_LENGTH))(PROMPTS)
    assert ours.keys() == ref.keys() == {"context", "context_mask", "pooled"}
    assert all(torch.equal(ours[k], ref[k]) for k in ours) and sd3.gives_pooled()
    assert len({text_fingerprint(t5), text_fingerprint(sd3)}) == 2
    with pytest.raises(ConfigError, match="text_encoder.path: required for kind 'sd3'"):
        TextEncoderConfig(kind="sd3").check()
    with pytest.raises(ConfigError, match="text_encoder.layer: not an option of kind 't5'"):
        TextEncoderConfig(kind="t5", path=str(t5_folder), layer="penultimate").check()
