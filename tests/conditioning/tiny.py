"""Tiny random-weight text encoders for tests: a character-level CLIP tokenizer, CLIP configs, an OpenCLIP config."""

from __future__ import annotations

TINY_OPENCLIP = dict(
    embed_dim=16,
    vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "head_width": 32, "layers": 1},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
)


def tiny_clip_tokenizer(max_length: int | None = None, pad_token: str | None = None):
    """A byte-level CLIP tokenizer without merges (one token per character) and its two special tokens."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    options = {} if max_length is None else {"model_max_length": max_length}
    if pad_token is not None:  # SDXL's second tokenizer pads with "!"
        options["pad_token"] = pad_token
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], **options)


def tiny_clip_config(tokenizer, hidden_size: int = 32, layers: int = 3, positions: int = 16, **extra):
    """A CLIPTextConfig of a few layers for the tokenizer's vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=positions,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def tiny_t5_tokenizer():
    """A unigram T5 tokenizer over letters, digits and a few marks (pad 0, end-of-text 1, unknown 2, as T5's)."""
    import string

    from transformers import T5Tokenizer

    marks = list(string.ascii_letters + string.digits + " .,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in marks] + [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_config(tokenizer, d_model: int = 48, layers: int = 2):
    """A T5Config (T5-v1.1 style: gated GELU feed-forward) of a few layers for the tokenizer's vocabulary."""
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers,
                    num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
