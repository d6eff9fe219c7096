"""Metrics (DESIGN 1.7): official fixture values, properties, bad input, the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from pipeline.errors import InputError
from pipeline.metrics import aupro_key, auroc, evaluate, evaluate_maps
from stages.cli import app
from tests.failures import assert_clean_failure
from tools.scratch_project import sh

LIMITS = (0.3, 0.1, 0.05, 0.01)
FIXTURE_NAMES = (
    "blobs_64_seed0", "blobs_112_seed1", "blobs_224_seed6", "constant_maps",
    "perfect_maps", "single_pixel_defects", "ties_64_seed2",
)


def blobs(n: int = 8, size: int = 24, seed: int = 0, quantise: float | None = None):
    """Random maps, every other image with one or two square defects scoring higher."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size))
    gt = np.zeros((n, size, size), dtype=np.uint8)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 5, 2)
            h, w = rng.integers(1, 5, 2)
            gt[i, y:y + h, x:x + w] = 1
        maps[i] += 0.5 * gt[i] * rng.random()
    if quantise:
        maps = np.round(maps / quantise) * quantise
    return maps, gt, labels


def brute_force_curve(maps, gt):
    """Literal definition: every distinct score is a threshold; FPR and PRO from masks."""
    regions = []
    for i in range(len(maps)):
        lab, count = ndimage.label(gt[i] > 0, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, count + 1)]
    neg = maps[gt == 0]
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = float((neg >= t).mean())
        pro = float(np.mean([(maps[i][m] >= t).mean() for i, m in regions]))
        pts.append((fpr, pro))
    pts.append((1.0, 1.0))
    return np.array(pts).T


def brute_force_aupro(maps, gt, limit):
    x, y = brute_force_curve(maps, gt)
    # trapezoid to the limit with the value at the limit interpolated
    ins = int(np.searchsorted(x, limit, side="right"))
    area = sum(0.5 * (y[j] + y[j + 1]) * (x[j + 1] - x[j]) for j in range(ins - 1))
    if ins < len(x) and x[ins - 1] < limit:
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        area += 0.5 * (y[ins - 1] + y_at) * (limit - x[ins - 1])
    return area / limit


# ----------------------------------------------------------------------- official values


FIXTURE_SUFFIX = {"": None, "_thresholds99": 99, "_thresholds100": 100}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_match_official_values(metric_fixtures: Path, name: str) -> None:
    """One call gives the exact AUPRO and both approximations, each matching the official
    value (fixture key ``aupro@L_thresholdsT`` is our ``aupro@L_thrT``)."""
    data = np.load(metric_fixtures / f"{name}.npz")
    expected = json.loads((metric_fixtures / f"{name}.json").read_text())
    got = evaluate_maps(data["anomaly_maps"], data["gt"], data["labels"],
                        aupro_thresholds=(99, 100))
    assert got["undefined"] == {} and got["aupro_thresholds"] == [99, 100]
    checked = 0
    for key, value in expected.items():
        if not isinstance(value, (float, int)) or key == "shape":
            continue
        if key.startswith("aupro@"):
            limit, _, variant = key[len("aupro@"):].partition("_")
            ours = got[aupro_key(float(limit), FIXTURE_SUFFIX[f"_{variant}" if variant else ""])]
        else:  # i_auroc, i_auroc_sklearn, p_auroc
            ours = got[key.removesuffix("_sklearn")]
        assert ours == pytest.approx(value, abs=1e-4), f"{name} {key}"
        checked += 1
    assert checked == 3 + 3 * len(LIMITS)  # the AUROCs, AUPRO exact / thr99 / thr100
    # nothing more than asked for: exact plus the two approximations at each limit
    assert sorted(k for k in got if k.startswith("aupro@")) == sorted(
        aupro_key(x, t) for x in LIMITS for t in (None, 99, 100))


def test_default_is_exact_and_published_approximation(metric_fixtures: Path) -> None:
    data = np.load(metric_fixtures / "blobs_64_seed0.npz")
    expected = json.loads((metric_fixtures / "blobs_64_seed0.json").read_text())
    got = evaluate_maps(data["anomaly_maps"], data["gt"], data["labels"])
    assert got["aupro_thresholds"] == [99]
    for limit in LIMITS:
        assert got[aupro_key(limit)] == pytest.approx(expected[f"aupro@{limit}"], abs=1e-4)
        assert got[aupro_key(limit, 99)] == pytest.approx(
            expected[f"aupro@{limit}_thresholds99"], abs=1e-4)
        assert aupro_key(limit, 100) not in got
    # the two differ where the fixture says they do (1%: 0.259 exact, 0.179 approximated)
    assert got["aupro@0.01"] - got["aupro@0.01_thr99"] > 0.05
    exact_only = evaluate_maps(data["anomaly_maps"], data["gt"], data["labels"],
                               aupro_thresholds=())
    assert exact_only["aupro_thresholds"] == [] and "aupro@0.3_thr99" not in exact_only
    assert exact_only["aupro@0.3"] == got["aupro@0.3"]


def test_threshold_counts_are_validated() -> None:
    maps, gt, labels = blobs(n=4, size=8)
    with pytest.raises(InputError, match="list of threshold counts"):
        evaluate_maps(maps, gt, labels, aupro_thresholds=99)  # the old single choice
    with pytest.raises(InputError, match="integer >= 2"):
        evaluate_maps(maps, gt, labels, aupro_thresholds=(99, 1))
    got = evaluate_maps(maps, gt, labels, aupro_thresholds=(100, 99, 100))
    assert got["aupro_thresholds"] == [100, 99]


def test_every_fixture_is_tested(metric_fixtures: Path) -> None:
    assert {p.stem for p in metric_fixtures.glob("*.npz")} <= set(FIXTURE_NAMES)


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize("quantise", [None, 0.25])
def test_exact_aupro_equals_brute_force(quantise) -> None:
    maps, gt, labels = blobs(n=6, size=16, seed=3, quantise=quantise)
    got = evaluate_maps(maps, gt, labels)
    for limit in LIMITS + (1.0,):
        expected = brute_force_aupro(maps, gt, limit)
        assert evaluate_maps(maps, gt, labels, limits=[limit])[aupro_key(limit)] == \
            pytest.approx(expected, abs=1e-9)
        if limit in LIMITS:
            assert got[aupro_key(limit)] == pytest.approx(expected, abs=1e-9)


def test_sampled_pro_curve_follows_the_exact_curve() -> None:
    maps, gt, labels = blobs(n=6, size=16, seed=7, quantise=0.05)
    x, y = brute_force_curve(maps, gt)
    grid, sampled = evaluate(maps, gt, labels).pro.sample(0.3, 257)
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.3)
    for g, value in zip(grid[1:], sampled[1:]):
        ins = int(np.searchsorted(x, g, side="right"))
        expected = y[ins - 1] + (y[ins] - y[ins - 1]) * (g - x[ins - 1]) / (x[ins] - x[ins - 1])
        assert value == pytest.approx(expected, abs=1e-9)
    assert sampled[0] == pytest.approx(y[x == 0].max())


def test_approximation_matches_its_definition() -> None:
    maps, gt, labels = blobs(n=6, size=16, seed=4)
    neg = np.sort(maps[gt == 0])
    n = len(neg)
    for t in (99, 100, 7):
        p = np.floor(np.linspace(0, n - 1, t)).astype(int)
        lab = [ndimage.label(gt[i], structure=np.ones((3, 3))) for i in range(len(gt))]
        regions = [(i, l == r) for i, (l, c) in enumerate(lab) for r in range(1, c + 1)]
        pro = [np.mean([(maps[i][m] > neg[q]).mean() for i, m in regions]) for q in p]
        x = np.append(1 - (p + 1) / n, 1.0)
        y = np.append(pro, 1.0)
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        got = evaluate_maps(maps, gt, labels, aupro_thresholds=[t])
        for limit in LIMITS:
            ins = int(np.searchsorted(x, limit, side="right"))
            m = x <= limit
            area = np.sum(0.5 * (y[m][1:] + y[m][:-1]) * np.diff(x[m]))
            y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
            area += 0.5 * (y[ins - 1] + y_at) * (limit - x[ins - 1])
            assert got[aupro_key(limit, t)] == pytest.approx(area / limit, abs=1e-12)


def test_perfect_and_inverted_maps() -> None:
    _, gt, labels = blobs(n=8, size=20, seed=1)
    noise = np.random.default_rng(0).random(gt.shape) * 0.5
    perfect = np.where(gt > 0, 1.0, noise)  # every defect pixel above every other pixel
    res = evaluate_maps(perfect, gt, labels)
    assert res["i_auroc"] == 1.0 and res["p_auroc"] == 1.0
    assert all(res[aupro_key(x)] == pytest.approx(1.0, abs=1e-12) for x in LIMITS)
    inverted = evaluate_maps(-perfect, gt, labels, scores=-perfect.max(axis=(1, 2)))
    assert inverted["i_auroc"] == 0.0 and inverted["p_auroc"] == 0.0
    assert all(inverted[aupro_key(x)] == pytest.approx(0.0, abs=1e-12) for x in LIMITS)


def test_permuting_images_changes_nothing() -> None:
    maps, gt, labels = blobs(n=10, size=20, seed=2, quantise=0.1)
    perm = np.random.default_rng(0).permutation(10)
    a = evaluate_maps(maps, gt, labels, aupro_thresholds=[100])
    b = evaluate_maps(maps[perm], gt[perm], labels[perm], aupro_thresholds=[100])
    for key in ("i_auroc", "p_auroc", *(aupro_key(x, t) for x in LIMITS for t in (None, 100))):
        assert a[key] == pytest.approx(b[key], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(500) < 0.3
    s = rng.integers(0, 12, 500).astype(np.float64) + y * rng.integers(0, 3, 500)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    maps, gt, labels = blobs(n=6, size=16, seed=seed, quantise=0.2)
    res = evaluate_maps(maps, gt, labels)
    assert res["p_auroc"] == pytest.approx(roc_auc_score(gt.ravel(), maps.ravel()), abs=1e-12)
    assert res["i_auroc"] == pytest.approx(roc_auc_score(labels, maps.max(axis=(1, 2))), abs=1e-12)


def test_given_scores_and_roc_maps_are_used() -> None:
    maps, gt, labels = blobs(n=8, size=16, seed=5)
    flipped = np.where(labels == 1, 0.0, 1.0)
    assert evaluate_maps(maps, gt, labels, scores=flipped)["i_auroc"] == 0.0
    ev = evaluate(maps, gt, labels, roc_maps=-maps)
    assert ev.metrics["p_auroc"] == pytest.approx(1 - evaluate_maps(maps, gt, labels)["p_auroc"])


def test_eight_connectivity_defines_regions() -> None:
    # two diagonal pixels are ONE region under 8-connectivity (4-connectivity would give 3
    # regions and a PRO of 2/3 where 8-connectivity gives 0.75)
    gt = np.zeros((2, 8, 8), dtype=np.uint8)
    gt[1, 2, 2] = gt[1, 3, 3] = 1
    gt[1, 6, 6] = 1
    maps = np.zeros((2, 8, 8))
    maps[1, 2, 2] = maps[1, 6, 6] = 1.0
    res = evaluate(maps, gt, np.array([0, 1]))
    assert res.metrics["n_regions"] == 2
    # at the top threshold: region {(2,2),(3,3)} half found, region {(6,6)} found -> 0.75
    assert res.pro is not None and res.pro.sample(0.3, 4)[1][0] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- bad input


def test_shape_and_value_errors() -> None:
    maps, gt, labels = blobs(n=4, size=8)
    with pytest.raises(InputError, match="gt: shape"):
        evaluate_maps(maps, gt[:, :7], labels)
    with pytest.raises(InputError, match="labels: shape"):
        evaluate_maps(maps, gt, labels[:3])
    with pytest.raises(InputError, match="scores: shape"):
        evaluate_maps(maps, gt, labels, scores=np.zeros(5))
    bad = maps.copy()
    bad[2, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"NaN or infinite values in image\(s\) \[2\]"):
        evaluate_maps(bad, gt, labels)
    bad[2, 1, 1] = np.inf
    with pytest.raises(InputError, match="anomaly_maps"):
        evaluate_maps(bad, gt, labels)
    with pytest.raises(InputError, match="scores: NaN"):
        evaluate_maps(maps, gt, labels, scores=np.array([0.0, np.inf, 1.0, 2.0]))
    with pytest.raises(InputError, match="empty set"):
        evaluate_maps(maps[:0], gt[:0], labels[:0])
    with pytest.raises(InputError, match="0 \\(good\\) or 1"):
        evaluate_maps(maps, gt, labels * 2)


def test_label_disagreeing_with_gt_names_the_image() -> None:
    maps, gt, labels = blobs(n=6, size=8)
    labels = labels.copy()
    labels[3] = 0  # image 3 has a defect mask
    with pytest.raises(InputError, match=r"image\(s\) \[3\] labelled good"):
        evaluate_maps(maps, gt, labels)


def test_undefined_metrics_are_none_with_reasons() -> None:
    maps, gt, labels = blobs(n=6, size=8)
    good = labels == 0
    res = evaluate_maps(maps[good], gt[good], labels[good])
    assert res["i_auroc"] is None and "defective" in res["undefined"]["i_auroc"]
    assert res["p_auroc"] is None and "defect pixel" in res["undefined"]["p_auroc"]
    assert all(res[aupro_key(x, t)] is None for x in LIMITS for t in (None, 99))
    assert set(res["undefined"]) == {"i_auroc", "p_auroc",
                                     *(aupro_key(x, t) for x in LIMITS for t in (None, 99))}
    bad = ~good
    res = evaluate_maps(maps[bad], gt[bad], labels[bad])
    assert res["i_auroc"] is None and "good" in res["undefined"]["i_auroc"]
    assert res["p_auroc"] is not None and set(res["undefined"]) == {"i_auroc"}
    json.dumps(res)  # None becomes null


# ------------------------------------------------------------------------------ CLI


def test_metrics_command(tmp_path: Path, metric_fixtures: Path) -> None:
    runner = CliRunner()
    src = metric_fixtures / "blobs_64_seed0.npz"
    expected = json.loads((metric_fixtures / "blobs_64_seed0.json").read_text())
    out = runner.invoke(app, ["metrics", str(src)])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    # exact and the published approximation side by side, without asking
    assert got["aupro@0.3"] == pytest.approx(expected["aupro@0.3"], abs=1e-4)
    assert got["aupro@0.3_thr99"] == pytest.approx(expected["aupro@0.3_thresholds99"], abs=1e-4)
    assert got["p_auroc"] == pytest.approx(expected["p_auroc"], abs=1e-4)
    assert got["aupro_thresholds"] == [99] and "aupro@0.01_thr100" not in got
    out = runner.invoke(app, ["metrics", str(src), "--aupro-thresholds", "100"])
    got = json.loads(out.stdout)
    for limit in LIMITS:
        assert got[f"aupro@{limit}_thr100"] == pytest.approx(
            expected[f"aupro@{limit}_thresholds100"], abs=1e-4)
        assert got[f"aupro@{limit}_thr99"] == pytest.approx(
            expected[f"aupro@{limit}_thresholds99"], abs=1e-4)
        assert got[f"aupro@{limit}"] == pytest.approx(expected[f"aupro@{limit}"], abs=1e-4)
    assert got["aupro_thresholds"] == [99, 100]
    out = runner.invoke(app, ["metrics", str(src), "--aupro-thresholds", "1"])
    assert out.exit_code == 1 and "aupro_thresholds" in out.output

    # explicit image scores are used when present
    d = dict(np.load(src))
    d["scores"] = -d["anomaly_maps"].max(axis=(1, 2))
    np.savez(tmp_path / "with_scores.npz", **d)
    got = json.loads(runner.invoke(app, ["metrics", str(tmp_path / "with_scores.npz")]).stdout)
    assert got["i_auroc"] == pytest.approx(1 - expected["i_auroc"], abs=1e-9)


def test_metrics_command_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["metrics", str(tmp_path / "nope.npz")])
    assert out.exit_code == 1 and "nope.npz: file not found" in out.output
    np.savez(tmp_path / "partial.npz", anomaly_maps=np.zeros((2, 4, 4)), labels=np.array([0, 1]))
    out = runner.invoke(app, ["metrics", str(tmp_path / "partial.npz")])
    assert out.exit_code == 1 and "missing array(s) gt" in out.output
    (tmp_path / "junk.npz").write_text("not a zip")
    out = runner.invoke(app, ["metrics", str(tmp_path / "junk.npz")])
    assert out.exit_code == 1 and "junk.npz" in out.output
    maps, gt, labels = blobs(n=4, size=8)
    np.savez(tmp_path / "mismatch.npz", anomaly_maps=maps, gt=gt[:3], labels=labels)
    out = runner.invoke(app, ["metrics", str(tmp_path / "mismatch.npz")])
    assert out.exit_code == 1 and "mismatch.npz: gt: shape" in out.output


@pytest.mark.parametrize(("content", "names"), [
    (b"anomaly_maps,gt,labels\n1,2,3\n", ["maps.npz", "not an NPZ file"]),
    (b"\x93NUMPY\x01\x00v\x00", ["maps.npz", "a single .npy array"]),
    (b"", ["maps.npz", "not an NPZ file"]),
])
def test_metrics_command_refuses_a_file_that_is_not_npz(tmp_path, content, names):
    (tmp_path / "maps.npz").write_bytes(content)
    # the installed command, as a user runs it (moved here from the hostile-input suite)
    assert_clean_failure(sh(["cmds-ad", "metrics", "maps.npz"], tmp_path, check=False), *names)
