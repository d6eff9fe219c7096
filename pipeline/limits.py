"""Sizes and counts that would exhaust this machine's memory, refused with the parameters.

Each rule estimates the bytes that one stage must hold at once for a parameter's value: the
arrays it cannot avoid (measured or counted from the code; models, libraries and caches come
on top, so an estimate is a lower bound). A value whose estimate exceeds the memory available
now is refused before any stage runs, with the largest value that would fit. The estimates are
generous to valid settings: the paper presets need a few hundred MiB by these rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.outputs import human

if TYPE_CHECKING:
    from pipeline.params import Params

# prepare, per sample at data.size S: bytes per output pixel (tracemalloc peaks of preprocess +
# real normals, 224 to 896 px: 270-300 for the windowed PCA of `grid`, 87-760 for `published`,
# whose full-resolution work does not grow with S).
PREPARE_BYTES_PER_PIXEL = {"grid": 256, "published": 32}
# evaluate: one approximate PRO curve of T thresholds peaks at 46-49 bytes per threshold
# (10^7 thresholds: 466 MiB); the stage computes up to three at once (the configured maps and
# two fusion variants).
AUPRO_BYTES_PER_THRESHOLD = 48 * 3
# More thresholds than this add nothing: the approximation converges to the exact AUPRO, which
# is always computed and reported beside it.
MAX_AUPRO_THRESHOLDS = 1_000_000
# augment: one img2img call returns its n images at the generation resolution as float32,
# clipped and rounded into a float32 copy and a uint8 one: 27 bytes per pixel and image.
GENERATED_BYTES_PER_PIXEL = 27


@dataclass(frozen=True)
class Rule:
    """``key``'s values, the bytes a value needs (the other keys as given) and who holds them."""

    key: str
    values: Callable[[Params], list[int]]
    need: Callable[[Params, int], int]
    holder: str


def _normals_res(p: Params) -> int:
    res = p.estimate_normals.processing_resolution
    return p.data.size if not res else res  # 0: the input (null: the model's, at least this)


RULES = (
    Rule("data.size", lambda p: [p.data.size],
         lambda p, s: s * s * PREPARE_BYTES_PER_PIXEL[p.data.normals], "prepare, per sample"),
    Rule("evaluate.aupro_thresholds", lambda p: list(p.evaluate.aupro_thresholds),
         lambda p, t: t * AUPRO_BYTES_PER_THRESHOLD, "evaluate"),
    Rule("augment.n_per_shot", lambda p: [p.augment.n_per_shot],
         lambda p, n: n * p.augment.resolution ** 2 * 3 * GENERATED_BYTES_PER_PIXEL,
         "augment, one generation call"),
    Rule("augment.resolution", lambda p: [p.augment.resolution],
         lambda p, r: max(p.augment.n_per_shot, 1) * r * r * 3 * GENERATED_BYTES_PER_PIXEL,
         "augment, one generation call"),
    # the decoded normals of a batch times the ensemble, float32, and the blended copy
    Rule("estimate_normals.batch_size", lambda p: [p.estimate_normals.batch_size],
         lambda p, b: b * p.estimate_normals.ensemble * _normals_res(p) ** 2 * 3 * 4 * 2,
         "estimate_normals, one batch"),
    Rule("estimate_normals.ensemble", lambda p: [p.estimate_normals.ensemble],
         lambda p, e: p.estimate_normals.batch_size * e * _normals_res(p) ** 2 * 3 * 4 * 2,
         "estimate_normals, one batch"),
    Rule("estimate_normals.processing_resolution",
         lambda p: [p.estimate_normals.processing_resolution or 0],
         lambda p, r: p.estimate_normals.batch_size * p.estimate_normals.ensemble * r * r * 24,
         "estimate_normals, one batch"),
    # RGB and normal images of a batch and their noisy copies, float32
    Rule("extract_features.batch_size", lambda p: [p.extract_features.batch_size],
         lambda p, b: b * (1 + p.extract_features.noisy_copies) * p.data.size ** 2 * 3 * 4 * 2,
         "extract_features, one batch"),
    # three layers of at least one channel for each of the four mappers' source, target and
    # prediction, float32, at fit_mapper.resolution
    Rule("fit_mapper.resolution", lambda p: [p.fit_mapper.resolution],
         lambda p, r: max(p.fit_mapper.batch_size, p.infer.batch_size) * r * r * 3 * 4 * 3 * 4,
         "fit_mapper and infer, one batch"),
    Rule("fit_mapper.batch_size", lambda p: [p.fit_mapper.batch_size],
         lambda p, b: b * p.fit_mapper.resolution ** 2 * 3 * 4 * 3 * 4, "fit_mapper, one batch"),
    Rule("infer.batch_size", lambda p: [p.infer.batch_size],
         lambda p, b: b * p.fit_mapper.resolution ** 2 * 3 * 4 * 3 * 4, "infer, one batch"),
    # the four stream maps of a batch in float64 (smoothing) and their fused copies
    Rule("score.batch_size", lambda p: [p.score.batch_size],
         lambda p, b: b * p.data.size ** 2 * 4 * 8 * 2, "score, one batch"),
)


def available_memory() -> int:
    """Bytes of memory available now: the system's, or the cgroup's (a container or a SLURM
    job) where that is less."""
    import psutil

    free = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return free


def _largest_fitting(rule: Rule, params: Params, value: int, budget: int) -> int:
    """The largest value <= ``value`` whose estimate fits ``budget`` (0 if none)."""
    lo, hi = 0, value
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rule.need(params, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def memory_problems(params: Params, budget: int | None = None) -> list[str]:
    """Threshold counts above the sane maximum, else the first value whose memory estimate
    exceeds ``budget`` (default: the memory available now), as messages."""
    problems = [
        f"evaluate.aupro_thresholds: {t} is above {MAX_AUPRO_THRESHOLDS}, the most allowed "
        f"(the approximation converges to the exact AUPRO, which is always reported; {t} "
        f"thresholds would need about {human(t * AUPRO_BYTES_PER_THRESHOLD)} of memory)"
        for t in params.evaluate.aupro_thresholds if t > MAX_AUPRO_THRESHOLDS
    ]
    if problems:
        return problems
    budget = available_memory() if budget is None else budget
    for rule in RULES:  # sizes before the batch sizes they multiply: the first is the cause
        for value in rule.values(params):
            need = rule.need(params, value)
            if need > budget:
                fits = _largest_fitting(rule, params, value, budget)
                return [f"{rule.key}: {value} needs at least {human(need)} of memory "
                        f"({rule.holder}); {human(budget)} is available here, so at most "
                        f"{fits} fits (with the other keys as they are)"]
    return []
