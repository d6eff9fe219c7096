"""Few-shot selection (DESIGN 1.1): which k training samples a run may see.

``first`` takes the first k ids in sorted order (the published protocol, independent of the
seed); ``random`` draws k distinct ids with ``numpy.random.default_rng(seed)``. The chosen ids
are returned sorted so stores built from them do not depend on the draw order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ParamsError

STRATEGIES = ("first", "random")


def select_shots(
    train_ids: Sequence[str], k: int, strategy: str, seed: int, category: str = "?"
) -> list[str]:
    ids = sorted(train_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("training ids must be unique")
    if k < 1:
        raise ParamsError(f"fewshot.shots: k must be >= 1 (got {k})")
    if k > len(ids):
        raise ParamsError(
            f"fewshot.shots: k={k} is larger than the training split of category "
            f"{category!r} ({len(ids)} samples)"
        )
    if strategy == "first":
        return ids[:k]
    if strategy == "random":
        picked = np.random.default_rng(seed).choice(len(ids), size=k, replace=False)
        return sorted(ids[int(i)] for i in picked)
    raise ParamsError(f"fewshot.strategy: unknown strategy {strategy!r} (expected first or random)")
