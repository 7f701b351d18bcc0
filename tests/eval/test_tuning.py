"""Sampling settings are chosen on a tuning set that never shares a prompt (or an image) with the scored prompts, by
a rule that keeps the best alignment the interval resolves and then the lowest FID."""

from __future__ import annotations

import pytest

from ldm.eval.realset import read_split, split_pool
from ldm.eval.tuning import choose, tuning_indices


def test_tuning_prompts_are_disjoint_from_the_scored_ones(protocol_shards):
    pool = read_split(str(protocol_shards), "train", 32, progress=False)
    split = split_pool(len(pool), 48, 48, seed=0)
    tune = tuning_indices(pool.captions, split.floor, split.rest, 40)
    assert len(tune) == 40
    scored = {pool.captions[i] for i in split.floor}
    assert not scored & {pool.captions[i] for i in tune}  # no scored prompt is tuned on
    assert not set(tune) & (set(split.floor) | set(split.reference))  # nor a scored or reference image
    # the emoji data has both styles of a caption: some of the rest share a caption with F and are left out
    assert any(pool.captions[i] in scored for i in split.rest)
    assert tune == [i for i in split.rest if pool.captions[i] not in scored][:40]  # in the seeded order


ROWS = [
    {"name": "a", "fid": 150.0, "class_acc": 0.40, "class_acc_hi": 0.43},
    {"name": "b", "fid": 120.0, "class_acc": 0.38, "class_acc_hi": 0.41},  # alignment tied with a: lower FID wins
    {"name": "c", "fid": 90.0, "class_acc": 0.20, "class_acc_hi": 0.23},  # best FID, alignment clearly worse
]


def test_choice_keeps_the_best_alignment_then_the_lowest_fid():
    assert choose(ROWS)["name"] == "b"
    assert choose(ROWS[:1])["name"] == "a"
    assert choose([{k: v for k, v in r.items() if not k.startswith("class")} for r in ROWS])["name"] == "c"
    with pytest.raises(ValueError, match="no evaluated settings"):
        choose([])


def test_the_tuning_evaluator_never_shares_a_prompt_an_image_or_a_seed_with_the_scored_one(protocol_shards,
                                                                                          tiny_inception, tmp_path):
    """prepare_evaluator(prompt_set="tuning"): prompts that are no scored prompt, real images that are in neither the
    floor nor the reference set, seeds of their own, its own floor against the same reference set; cached."""
    from ldm.eval import prepare_evaluator
    from ldm.eval.tuning import TUNING_SEED_OFFSET

    settings = dict(image_size=32, num_images=24, reference_images=24, inception=tiny_inception, classifier=False,
                    bootstrap=5, batch_size=8, progress=False, cache_dir=tmp_path / "cache")
    scored = prepare_evaluator(str(protocol_shards), **settings)
    tuning = prepare_evaluator(str(protocol_shards), **settings, prompt_set="tuning")
    assert tuning.num_images == 24 and not set(tuning.prompts) & set(scored.prompts)
    assert not set(tuning.floor.keys) & (set(scored.floor.keys) | set(scored.reference.keys))
    assert tuning.reference.keys == scored.reference.keys
    assert tuning.seeds == [TUNING_SEED_OFFSET + i for i in range(24)] and not set(tuning.seeds) & set(scored.seeds)
    assert tuning.floor_scores != scored.floor_scores and tuning.floor_scores["fid"] > 0
    assert (tuning.folder / "tuning.safetensors").is_file()  # cached: a second build reads it
    again = prepare_evaluator(str(protocol_shards), **settings, prompt_set="tuning")
    assert again.prompts == tuning.prompts and again.floor_scores == tuning.floor_scores
    with pytest.raises(ValueError, match="prompt_set"):
        prepare_evaluator(str(protocol_shards), **settings, prompt_set="test")
