"""Stage ``report``: summary tables over categories, k and seeds (DESIGN 1.7).

Reads   results/evaluate/<cat>/k<k>-s<seed>/{metrics,ablations}.json for every category in
        ``data.categories``, k in ``fewshot.shots`` and seed in ``fewshot.seeds``
Writes  results/summary/ (atomically):
        summary.md / summary.csv  per dataset and k: one row per category and the mean over
                                  categories, in %; with several seeds mean ± sample std
                                  (the mean row: mean over categories per seed, then over seeds)
        ablations.md / .csv       fusion variants (and the configured model), mean over
                                  categories per k
        summary.png               bars per category and k (I-AUROC, headline AUPRO at the
                                  first limit)
        thresholds.md / .csv      per category, k and seed, image and pixel: the threshold
                                  fitted on normal samples (the thresholds stage), precision,
                                  recall and F1 at it on the test set, and the test set's
                                  F1-optimal threshold with its F1 (F1*: a reference only,
                                  it looks at the test labels)
        results/summary.json      the mean rows of summary.csv as DVC metrics (per k, every
                                  column, in %): what `dvc exp show` compares
and prints the summary and thresholds tables to the terminal. AUPRO: the columns titled ``AUPRO@L%`` are the
headline computation (``evaluate.headline_aupro``: exact, or thr<T> = the published T-threshold
approximation); the others follow, titled ``AUPRO@L% exact`` / ``AUPRO@L% thr99``. The CSVs
hold every computation at every limit, the Markdown and terminal tables the others at the
largest and the smallest limit only (readable width). A metric undefined for any category
(null in metrics.json) makes the mean ``n/a`` rather than a mean over fewer categories.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

from pipeline import report as R
from pipeline.ablations import ABLATIONS
from pipeline.artifacts import atomic_dir, atomic_write_text, read_json
from pipeline.errors import InputError
from pipeline.params import Params
from stages import layout


DECISIONS_INTRO = (
    "# Decision thresholds: {}\n\n"
    "Per category, k and seed: the image and pixel thresholds fitted on normal samples the model "
    "was not trained on (`thresholds.normal_samples`: the validation split or leave-one-out over "
    "the shots; `artifacts/thresholds/`), with precision (P), recall (R) and F1 on the test set "
    "at them, in % (pixel: every pixel of the test set, `map_roc`). F1* and threshold* are the "
    "test set's F1-optimal threshold: a reference only, it looks at the test labels. n/a: "
    "undefined (no prediction above the threshold for P; no masks for the pixel row).")


def _load_json(path: Path) -> dict:
    data = read_json(path, "not found (run the evaluate stage for this category and k)")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _print_table(rows: list[R.Row], columns: list[R.Column]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CMDS-AD summary (%)")
    for heading in ("dataset", "k", "category", *(c.title for c in columns)):
        table.add_column(heading, justify="left" if heading in ("dataset", "category") else "right")
    for r in rows:
        style = "bold" if r.name == "mean" else None
        table.add_row(r.dataset, str(r.shots), r.name, *(c.text() for c in r.cells), style=style)
    Console(width=160).print(table)


def _print_decisions(rows: list[R.DecisionRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Thresholds from normal samples: P/R/F1 on the test set (F1*: the "
                        "test set's F1-optimal threshold, a reference)")
    for heading in R.DECISION_HEADINGS:
        table.add_column(heading, justify="left" if heading in ("category", "level") else "right")
    for cells in R.decision_table(rows):
        table.add_row(*cells)
    Console(width=160).print(table)


def _only(rows: list[R.Row], columns: list[R.Column], shown: list[R.Column]) -> list[R.Row]:
    """The rows with only the cells of the ``shown`` columns (a subset of ``columns``)."""
    index = [columns.index(c) for c in shown]
    return [replace(r, cells=tuple(r.cells[i] for i in index)) for r in rows]


Run = tuple[str, int, int]  # (category, k, seed)


def _read_evaluations(categories: list[str], shots: list[int], seeds: list[int],
                      columns: list[R.Column]) -> tuple[dict[Run, dict], dict[Run, dict]]:
    """Every evaluate instance's metrics.json and ablations.json, each with every column."""
    metrics: dict[Run, dict] = {}
    ablations: dict[Run, dict] = {}
    for run in itertools.product(categories, shots, seeds):
        folder = layout.evaluation(*run)
        metrics[run] = _load_json(folder / "metrics.json")
        ablations[run] = _load_json(folder / "ablations.json")
        missing = [c.key for c in columns if c.key not in metrics[run]]
        if missing:
            raise InputError(
                f"{folder / 'metrics.json'}: no value for {', '.join(missing)} "
                "(evaluate.limits or evaluate.aupro_thresholds changed? re-run the "
                "evaluate stage)"
            )
    return metrics, ablations


def run(params: Params) -> None:
    dataset = params.data.dataset
    categories = list(params.data.categories)
    shots = list(params.fewshot.shots)
    seeds = list(params.fewshot.seeds)
    p = params.evaluate
    headline = p.headline_thresholds()
    columns = R.metric_columns(p.limits, p.aupro_thresholds, headline)
    shown = R.table_columns(p.limits, p.aupro_thresholds, headline)

    metrics, ablations = _read_evaluations(categories, shots, seeds, columns)
    rows = R.summary_rows(metrics, dataset, categories, shots, seeds, columns)
    decisions = R.decision_rows(metrics)
    variants = [v for v in ABLATIONS if any(v in a for a in ablations.values())]
    abl_rows = R.ablation_rows(ablations, metrics, variants, dataset, categories, shots, seeds,
                               columns)
    seeds_text = ", ".join(map(str, seeds))
    intro = (
        f"# CMDS-AD results: {dataset}\n\n"
        f"Values in %, categories: {', '.join(categories)}; seeds: {seeds_text}"
        + (" (mean ± sample std over seeds)." if len(seeds) > 1 else ".")
        + " " + R.headline_note(p.aupro_thresholds, headline)
    )
    abl_intro = (
        f"# Fusion ablations: {dataset}\n\n"
        "Mean over categories, in %; `configured` is the model as scored (params `score`), "
        "the others re-fuse the stored stream maps: "
        + "; ".join(
            f"`{v}`: " + ", ".join(f"{k}={val}" for k, val in ABLATIONS[v].items())
            for v in variants
        ) + ". " + R.headline_note(p.aupro_thresholds, headline)
    )
    with atomic_dir(layout.summary()) as out:
        R.write_bytes(out / "summary.md",
                      R.rows_markdown(_only(rows, columns, shown), shown, "category",
                                      intro).encode())
        R.write_bytes(out / "summary.csv", R.rows_csv(rows, columns, "category").encode())
        R.write_bytes(out / "ablations.md",
                      R.rows_markdown(_only(abl_rows, columns, shown), shown, "variant",
                                      abl_intro).encode())
        R.write_bytes(out / "ablations.csv", R.rows_csv(abl_rows, columns, "variant").encode())
        R.write_bytes(out / "summary.png", R.summary_png(rows, columns, dataset, headline))
        R.write_bytes(out / "thresholds.md", R.decision_markdown(decisions, DECISIONS_INTRO
                                                                  .format(dataset)).encode())
        R.write_bytes(out / "thresholds.csv", R.decision_csv(decisions).encode())
    summary = json.dumps(R.mean_metrics(rows, columns), indent=2)
    atomic_write_text(layout.summary_metrics(), summary + "\n")
    _print_table(_only(rows, columns, shown), shown)
    _print_decisions(decisions)
