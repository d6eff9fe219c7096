"""Few-shot selection: first-k, seeded random draws, and k larger than the split."""

from __future__ import annotations

import pytest

from pipeline.data.fewshot import select_shots
from pipeline.errors import ParamsError
from stages.prepare import choose_shots

IDS = [f"good/{i:03d}" for i in range(20)]


def test_first_takes_sorted_prefix_regardless_of_order_and_seed():
    shuffled = IDS[7:] + IDS[:7]
    assert select_shots(shuffled, 3, "first", seed=0) == ["good/000", "good/001", "good/002"]
    assert select_shots(shuffled, 3, "first", seed=5) == ["good/000", "good/001", "good/002"]


def test_random_is_seeded_distinct_and_varies_with_seed():
    a = select_shots(IDS, 4, "random", seed=1)
    assert a == select_shots(list(reversed(IDS)), 4, "random", seed=1)  # input order irrelevant
    assert len(set(a)) == 4 and set(a) <= set(IDS) and a == sorted(a)
    draws = {tuple(select_shots(IDS, 4, "random", seed=s)) for s in range(6)}
    assert len(draws) > 1
    assert select_shots(IDS, 20, "random", seed=3) == IDS


def test_k_larger_than_split_names_key_category_and_size():
    with pytest.raises(ParamsError) as err:
        select_shots(IDS[:3], 4, "first", seed=0, category="disc")
    msg = str(err.value)
    assert "fewshot.shots" in msg and "'disc'" in msg and "3 samples" in msg and "k=4" in msg


def test_unknown_strategy_is_a_params_error():
    with pytest.raises(ParamsError, match="fewshot.strategy"):
        select_shots(IDS, 2, "best", seed=0)


def test_choose_shots_keys_every_k_and_seed():
    shots = choose_shots(IDS, [1, 2], [0, 1], "random", "disc")
    assert sorted(shots) == ["k1-s0", "k1-s1", "k2-s0", "k2-s1"]
    assert all(len(v) == int(k[1]) for k, v in shots.items())
    assert shots["k2-s1"] == select_shots(IDS, 2, "random", seed=1)
