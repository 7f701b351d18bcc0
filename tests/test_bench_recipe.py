"""bench_recipe's time-to-quality arithmetic: when a recipe's curve first reaches the peer's final value."""

from __future__ import annotations

import pytest

from bench.bench_recipe import time_to_reach

CURVE = [{"seconds": 60.0, "fid": 300.0, "class_acc": 0.05}, {"seconds": 120.0, "fid": 200.0, "class_acc": 0.25},
         {"seconds": 180.0, "fid": 150.0, "class_acc": 0.35}]


def test_reached_between_evaluations_is_interpolated():
    assert time_to_reach(CURVE, 250.0, "fid") == pytest.approx(90.0)  # lower is better: halfway from 300 to 200
    assert time_to_reach(CURVE, 0.30, "class_acc") == pytest.approx(150.0)  # higher is better


def test_reached_at_the_first_evaluation_or_never():
    assert time_to_reach(CURVE, 400.0, "fid") == 60.0
    assert time_to_reach(CURVE, 100.0, "fid") is None
    assert time_to_reach(CURVE, 0.5, "class_acc") is None
