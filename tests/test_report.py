"""The ``report`` stage on synthetic evaluate results (metrics.json / ablations.json)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.ablations import ABLATIONS
from pipeline.errors import InputError
from pipeline.params import parse_params
from stages import layout
from stages import report as stage

CATS = ("bagel", "carrot", "tire")
LIMITS = (0.3, 0.1, 0.05, 0.01)
# what evaluate writes by default: the exact AUPRO and the 99-threshold approximation
KEYS = ("i_auroc", "p_auroc", *(f"aupro@{x}{t}" for t in ("", "_thr99") for x in LIMITS))


def make_params(seeds=(0, 1), **evaluate_section):
    return parse_params({
        "data": {"categories": list(CATS)},
        "fewshot": {"shots": [1, 4], "seeds": list(seeds)},
        "evaluate": evaluate_section,
    })


def write_results(seeds=(0, 1), undefined: tuple | None = None) -> dict:
    """Random metric values per (category, k, seed); returns them for checking."""
    rng = np.random.default_rng(0)
    values = {}
    for cat in CATS:
        for k in (1, 4):
            for s in seeds:
                m = {key: float(rng.uniform(0.4, 1.0)) for key in KEYS}
                if undefined == (cat, k, s):
                    m["i_auroc"] = None
                    m["undefined"] = {"i_auroc": "no good image in the set"}
                values[(cat, k, s)] = m
                folder = layout.evaluation(cat, k, s)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "metrics.json").write_text(json.dumps(
                    {**m, "category": cat, "shots": k, "seed": s, "n_test": 10}))
                abl = {v: {key: float(rng.uniform(0.3, 1.0)) for key in KEYS} for v in ABLATIONS}
                values[(cat, k, s, "abl")] = abl
                (folder / "ablations.json").write_text(json.dumps(abl))
    return values


def rows_by_name(text: str) -> dict[tuple[str, str], dict]:
    return {(r["k"], r.get("category") or r.get("variant")): r
            for r in csv.DictReader(io.StringIO(text))}


def test_report_tables(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    values = write_results()
    stage.run(make_params())
    out = layout.summary()
    assert sorted(p.name for p in out.iterdir()) == [
        "ablations.csv", "ablations.md", "summary.csv", "summary.md", "summary.png",
        "thresholds.csv", "thresholds.md"]

    rows = rows_by_name((out / "summary.csv").read_text())
    assert len(rows) == 2 * (len(CATS) + 1)
    # the mean row: mean over categories per seed, then mean and sample std over seeds
    per_seed = [np.mean([values[(c, 4, s)]["aupro@0.3"] for c in CATS]) * 100 for s in (0, 1)]
    mean = rows[("4", "mean")]
    assert float(mean["AUPRO@30%"]) == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert float(mean["AUPRO@30% std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-4)
    assert mean["n_seeds"] == "2" and mean["dataset"] == "mvtec3d"
    cat = rows[("1", "carrot")]
    vals = [values[("carrot", 1, s)]["i_auroc"] * 100 for s in (0, 1)]
    assert float(cat["I-AUROC"]) == pytest.approx(np.mean(vals), abs=1e-4)
    assert float(cat["AUPRO@1%"]) == pytest.approx(
        np.mean([values[("carrot", 1, s)]["aupro@0.01"] * 100 for s in (0, 1)]), abs=1e-4)

    md = (out / "summary.md").read_text()
    assert "## mvtec3d k=1" in md and "## mvtec3d k=4" in md and "±" in md
    # headline (exact by default) at every limit, the approximation at 30% and 1% only
    assert ("| category | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@10% | AUPRO@5% | AUPRO@1% "
            "| AUPRO@30% thr99 | AUPRO@1% thr99 |") in md
    assert "`evaluate.headline_aupro: exact`" in md and "the `thr99` columns are" in md
    # the CSV holds every computation at every limit
    assert float(cat["AUPRO@5% thr99"]) == pytest.approx(
        np.mean([values[("carrot", 1, s)]["aupro@0.05_thr99"] * 100 for s in (0, 1)]), abs=1e-4)
    assert f"{np.mean(per_seed):.1f} ± {np.std(per_seed, ddof=1):.1f}" in md

    abl = rows_by_name((out / "ablations.csv").read_text())
    assert set(n for _, n in abl) == {"configured", *ABLATIONS}
    per_seed = [np.mean([values[(c, 1, s, "abl")]["sum"]["p_auroc"] for c in CATS]) * 100
                for s in (0, 1)]
    assert float(abl[("1", "sum")]["P-AUROC"]) == pytest.approx(np.mean(per_seed), abs=1e-4)
    configured = [np.mean([values[(c, 1, s)]["p_auroc"] for c in CATS]) * 100 for s in (0, 1)]
    assert float(abl[("1", "configured")]["P-AUROC"]) == pytest.approx(np.mean(configured),
                                                                       abs=1e-4)
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "CMDS-AD summary" in printed and "carrot" in printed and "mean" in printed
    assert "AUPRO@30% thr99" in printed and "AUPRO@5% thr99" not in printed

    # the DVC metrics file: the mean rows of summary.csv, every column, per k
    summary = json.loads(layout.summary_metrics().read_text())
    assert sorted(summary) == ["k1", "k4"]
    for k in ("1", "4"):
        for title, value in summary[f"k{k}"].items():
            assert value == pytest.approx(float(rows[(k, "mean")][title]), abs=1e-4), title
    assert "AUPRO@30%" in summary["k4"] and "AUPRO@1% thr99 std" in summary["k4"]


def _decision(threshold, precision, recall, f1) -> dict:
    return {"threshold": threshold, "precision": precision, "recall": recall, "f1": f1,
            "tp": 1, "fp": 2, "fn": 3}


def test_thresholds_table(tmp_path: Path, monkeypatch, capsys) -> None:
    """thresholds.md / .csv and the terminal: per (category, k, seed) and level the fitted
    threshold with P/R/F1 and the test-reference F1*, from metrics.json."""
    monkeypatch.chdir(tmp_path)
    write_results(seeds=(0,))
    entries = {"at_threshold": {"image": _decision(0.512345, 0.75, 0.5, 0.6), "pixel": None},
               "test_reference_f1_optimal": {"image": _decision(0.25, 0.8, 1.0, 0.888889),
                                             "pixel": None}}
    path = layout.evaluation("carrot", 4, 0) / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))
    stage.run(make_params(seeds=(0,)))
    md = (layout.summary() / "thresholds.md").read_text()
    assert ("| category | k | seed | level | threshold | P % | R % | F1 % | F1* % | threshold* |"
            in md)
    assert "| carrot | 4 | 0 | image | 0.5123 | 75.0 | 50.0 | 60.0 | 88.9 | 0.25 |" in md
    assert "| carrot | 4 | 0 | pixel | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    assert md.count("| image |") == md.count("| pixel |") == len(CATS) * 2
    assert "a reference only, it looks at the test labels" in md
    rows = list(csv.DictReader(io.StringIO((layout.summary() / "thresholds.csv").read_text())))
    (image,) = [r for r in rows if (r["category"], r["k"], r["level"]) == ("carrot", "4", "image")]
    assert float(image["threshold"]) == 0.512345 and float(image["f1"]) == 0.6
    assert float(image["test_reference_threshold"]) == 0.25
    printed = capsys.readouterr().out
    assert "Thresholds from normal samples" in printed and "0.5123" in printed


def test_published_headline_leads_the_tables(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    values = write_results()
    stage.run(make_params(headline_aupro="thr99"))
    out = layout.summary()
    rows = rows_by_name((out / "summary.csv").read_text())
    cat = rows[("4", "bagel")]
    for limit, title in zip(LIMITS, ("30%", "10%", "5%", "1%")):
        thr99 = np.mean([values[("bagel", 4, s)][f"aupro@{limit}_thr99"] * 100 for s in (0, 1)])
        exact = np.mean([values[("bagel", 4, s)][f"aupro@{limit}"] * 100 for s in (0, 1)])
        assert float(cat[f"AUPRO@{title}"]) == pytest.approx(thr99, abs=1e-4)
        assert float(cat[f"AUPRO@{title} exact"]) == pytest.approx(exact, abs=1e-4)
    md = (out / "summary.md").read_text()
    assert "| AUPRO@1% | AUPRO@30% exact | AUPRO@1% exact |" in md
    assert "the `exact` columns are the exact AUPRO" in md
    assert "`evaluate.headline_aupro: thr99`" in md
    abl = (out / "ablations.md").read_text()
    assert "| AUPRO@30% exact |" in abl
    abl_rows = rows_by_name((out / "ablations.csv").read_text())
    per_seed = [np.mean([values[(c, 1, s, "abl")]["max"]["aupro@0.01_thr99"] for c in CATS]) * 100
                for s in (0, 1)]
    assert float(abl_rows[("1", "max")]["AUPRO@1%"]) == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert "AUPRO@30% exact" in capsys.readouterr().out


def test_report_without_the_asked_approximation_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_results()
    with pytest.raises(InputError, match=r"no value for aupro@0.3_thr100.*aupro_thresholds"):
        stage.run(make_params(aupro_thresholds=[99, 100]))
    assert not layout.summary().exists()


def test_report_single_seed_and_undefined(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_results(seeds=(0,), undefined=("tire", 1, 0))
    stage.run(make_params(seeds=(0,)))
    md = (layout.summary() / "summary.md").read_text()
    assert "±" not in md
    rows = rows_by_name((layout.summary() / "summary.csv").read_text())
    assert rows[("1", "tire")]["I-AUROC"] == "" and rows[("1", "mean")]["I-AUROC"] == ""
    assert rows[("4", "mean")]["I-AUROC"] != "" and rows[("1", "mean")]["I-AUROC std"] == ""
    assert "n/a" in md
    summary = json.loads(layout.summary_metrics().read_text())
    assert summary["k1"]["I-AUROC"] is None and summary["k4"]["I-AUROC"] is not None
    assert not [key for key in summary["k1"] if key.endswith(" std")]  # one seed: no std


def test_report_is_deterministic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_results()
    stage.run(make_params())
    first = {p.name: p.read_bytes() for p in layout.summary().iterdir()}
    stage.run(make_params())
    second = {p.name: p.read_bytes() for p in layout.summary().iterdir()}
    assert first == second


def test_report_missing_result_fails_without_output(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_results()
    (layout.evaluation("carrot", 4, 1) / "ablations.json").unlink()
    with pytest.raises(InputError, match="carrot/k4-s1/ablations.json: not found"):
        stage.run(make_params())
    assert not layout.summary().exists()
    (layout.evaluation("carrot", 4, 1) / "ablations.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        stage.run(make_params())
    assert not layout.summary().exists()
