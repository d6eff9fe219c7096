"""``cmds-ad sweep-lambda``: the paper's sensitivity plot of the estimated-stream weight, drawn
from DVC experiments.

One queued experiment per value v (``-S score.lambda_1=v -S score.lambda_2=v``), run by
``cmds-ad sweep`` (DVC's queue; upstream stages come from the cache, so only validate_params,
score, evaluate and report run); each experiment's ``results/summary.json`` (the report's mean
over categories per k) gives one row per k of a CSV and a point of the plot. The workspace is
not touched; the experiments stay in ``dvc exp show`` like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.artifacts import atomic_dir, atomic_write_bytes, atomic_write_text
from pipeline.errors import InputError
from pipeline.outputs import mark
from pipeline.params import load_params
from pipeline.progress import info
from pipeline.report import metric_columns
from stages import layout
from experiments.sweep import Experiment, sweep


def summary_rows(values: Sequence[float], runs: Sequence[Experiment]) -> list[tuple[float, int, dict]]:
    """(lambda, k, the summary metrics of k) for each experiment and k, in the order run."""
    rows = []
    for value, run in zip(values, runs):
        summary = run.metrics.get(layout.summary_metrics().as_posix())
        if not summary:
            raise InputError(f"experiment {run.name}: no {layout.summary_metrics()} in its metrics")
        for key, metrics in summary.items():
            rows.append((value, int(key.removeprefix("k")), metrics))
    return rows


def run_sweep(values: Sequence[float], params_path: Path, out_dir: Path, jobs: int = 1) -> Path:
    params = load_params(params_path)
    e = params.evaluate
    columns = [c.title for c in metric_columns(e.limits, e.aupro_thresholds, e.headline_thresholds())]
    sets = [[f"score.lambda_1={v!r}", f"score.lambda_2={v!r}"] for v in values]
    runs = list(sweep(sets, jobs).values())
    rows = summary_rows(values, runs)

    lines = ["lambda,k," + ",".join(columns)]
    lines += [f"{v},{k}," + ",".join("" if m.get(c) is None else f"{m[c]:.4f}" for c in columns)
              for v, k, m in rows]
    with atomic_dir(out_dir) as tmp:  # one folder of this command's (cmds-ad sweep-lambda)
        atomic_write_text(tmp / "sensitivity.csv", "\n".join(lines) + "\n")
        # the headline AUPRO at the largest limit is the table's first AUPRO column
        atomic_write_bytes(tmp / "sensitivity.png", _plot(rows, columns[2]))
        mark(tmp, "sweep-lambda")
    info(f"wrote {out_dir / 'sensitivity.csv'} and {out_dir / 'sensitivity.png'} "
         f"(experiments {', '.join(r.name for r in runs)})")
    return out_dir / "sensitivity.csv"


def _plot(rows: list[tuple[float, int, dict]], aupro: str) -> bytes:
    """I-AUROC and the headline AUPRO (``aupro``: its column title) against lambda, in %."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("I-AUROC", aupro)):
        for k in sorted({k for _, k, _ in rows}):
            points = [(v, m.get(metric)) for v, kk, m in rows if kk == k]
            ys = [float("nan") if y is None else y for _, y in points]  # undefined: a gap
            ax.plot([v for v, _ in points], ys, marker="o", label=f"k = {k}")
        ax.set_xlabel("estimated-stream weight (lambda_1 = lambda_2)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    return buf.getvalue()
