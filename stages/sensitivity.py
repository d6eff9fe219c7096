"""Sensitivity of the estimated-stream weight: one DVC experiment per value.

Each value runs ``dvc exp run -S score.lambda_1=v -S score.lambda_2=v``; DVC restores every
upstream stage from its cache, so only ``score``, ``evaluate`` and ``report`` run. After each
experiment the mean metrics over categories are read from the evaluate outputs; the result is
a CSV and a plot (the paper's sensitivity figure).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_dir, atomic_write_bytes, atomic_write_text
from pipeline.errors import InputError
from pipeline.metrics import aupro_key
from pipeline.outputs import mark
from pipeline.params import Params, load_params
from pipeline.progress import info, track
from stages import layout

LIMITS = (0.3, 0.01)  # the AUPRO limits of the sweep


def metric_names(params: Params) -> tuple[str, ...]:
    """I- and P-AUROC, then AUPRO at each limit: exact and every approximation evaluate
    reports (``evaluate.aupro_thresholds``)."""
    counts = (None, *params.evaluate.aupro_thresholds)
    return ("i_auroc", "p_auroc", *(aupro_key(limit, t) for limit in LIMITS for t in counts))


def mean_metrics(params: Params) -> dict[int, dict[str, float]]:
    """Mean over categories and seeds of each metric, per k, from the evaluate outputs."""
    table: dict[int, dict[str, float]] = {}
    for k in params.fewshot.shots:
        rows = []
        for category in params.data.categories:
            for seed in params.fewshot.seeds:
                path = layout.evaluation(category, k, seed) / "metrics.json"
                if not path.is_file():
                    raise InputError(f"{path}: missing (did the experiment run?)")
                rows.append(json.loads(path.read_text()))
        table[k] = {
            m: float(np.mean([r[m] for r in rows if r.get(m) is not None] or [np.nan]))
            for m in metric_names(params)
        }
    return table


def run_sweep(values: Sequence[float], params_path: Path, out_dir: Path) -> Path:
    original = params_path.read_text()
    results: list[tuple[float, int, dict[str, float]]] = []
    params = load_params(params_path)
    names = metric_names(params)
    headline = aupro_key(LIMITS[0], params.evaluate.headline_thresholds())
    try:
        for value in track(values, "lambda sweep"):
            cmd = ["dvc", "exp", "run", "-S", f"score.lambda_1={value}",
                   "-S", f"score.lambda_2={value}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise InputError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
            for k, row in mean_metrics(load_params(params_path)).items():
                results.append((value, k, row))
    finally:
        params_path.write_text(original)  # leave the workspace's params as they were

    lines = ["lambda,k," + ",".join(names)]
    lines += [f"{v},{k}," + ",".join(f"{row[m]:.6f}" for m in names) for v, k, row in results]
    with atomic_dir(out_dir) as tmp:  # one folder of this command's (cmds-ad sweep-lambda)
        atomic_write_text(tmp / "sensitivity.csv", "\n".join(lines) + "\n")
        atomic_write_bytes(tmp / "sensitivity.png", _plot(results, headline))
        mark(tmp, "sweep-lambda")
    info(f"wrote {out_dir / 'sensitivity.csv'} and {out_dir / 'sensitivity.png'}")
    return out_dir / "sensitivity.csv"


def _plot(results: list[tuple[float, int, dict[str, float]]], aupro: str) -> bytes:
    """I-AUROC and the headline AUPRO@30% (``aupro``: its result key) against lambda."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    aupro_label = "AUPRO@30%" + aupro.partition("_")[2].replace("thr", " thr")
    for ax, metric, label in zip(axes, ("i_auroc", aupro), ("I-AUROC", aupro_label)):
        for k in sorted({k for _, k, _ in results}):
            xs = [v for v, kk, _ in results if kk == k]
            ys = [100 * row[metric] for _, kk, row in results if kk == k]
            ax.plot(xs, ys, marker="o", label=f"k = {k}")
        ax.set_xlabel("estimated-stream weight (lambda_1 = lambda_2)")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
