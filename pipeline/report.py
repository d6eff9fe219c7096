"""Tables and figures of the evaluation (DESIGN 1.7): heatmap overlays, per-category overview,
summary tables over categories/k/seeds, and the summary figure.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend) and saved without the ``Software`` tag; overlays are composed in numpy and saved
with Pillow. Neither writes timestamps, so the same inputs give byte-identical PNGs.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline.metrics import aupro_key

CMAP = "jet"
# zlib level 3 encodes these figures about four times faster than Pillow's default 6, for
# files about 10% larger: every re-score writes a few PNGs per (category, k, seed).
PNG_COMPRESS_LEVEL = 3
CONTOUR_RGB = (255, 255, 255)
OVERLAY_ALPHA = 0.5

# --------------------------------------------------------------------------- overlays


def choose_examples(scores: np.ndarray, labels: np.ndarray, per_class: int) -> list[int]:
    """Deterministic choice of images to show: per class (good, then defective), images spread
    evenly over that class's score ranking, from the highest-scoring to the lowest-scoring
    (ties by index). With one image per class it is the highest-scoring one: for good images
    the worst false alarm, for defective ones the clearest detection."""
    chosen: list[int] = []
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        if per_class <= 0 or not len(idx):
            continue
        ranked = idx[np.lexsort((idx, -scores[idx]))]  # by score descending, then index
        take = min(per_class, len(ranked))
        positions = np.unique(np.round(np.linspace(0, len(ranked) - 1, take)).astype(int))
        chosen.extend(int(i) for i in ranked[positions])
    return chosen


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: in the mask with a 4-neighbour outside it."""
    m = np.asarray(mask) > 0
    padded = np.pad(m, 1, constant_values=False)
    interior = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    return m & ~interior


def overlay(rgb: np.ndarray, amap: np.ndarray, gt: np.ndarray, vmax: float) -> np.ndarray:
    """The anomaly map (colour map, fixed scale [0, vmax]) blended over the RGB image, with the
    ground-truth contour drawn on top. Returns (H, W, 3) uint8."""
    rgb = np.asarray(rgb, dtype=np.float32)
    norm = np.clip(np.asarray(amap, dtype=np.float64) / max(float(vmax), 1e-12), 0.0, 1.0)
    colour = colormaps[CMAP](norm)[..., :3] * 255.0
    out = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colour
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    out[contour(gt)] = CONTOUR_RGB
    return out


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def safe_name(sample_id: str) -> str:
    """A sample id as a file name: ``crack/003`` -> ``crack_003``."""
    return str(sample_id).replace("/", "_").replace("\\", "_")


def _figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None},
                pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buf.getvalue()


# ------------------------------------------------------------------- per-category figure


def overview_png(
    title: str,
    examples: Sequence[tuple[np.ndarray, str]],
    roc: tuple[np.ndarray, np.ndarray] | None,
    pro: tuple[np.ndarray, np.ndarray],
    pro_limit: float,
    scores: np.ndarray,
    labels: np.ndarray,
    metrics_text: str,
) -> bytes:
    """One figure a person reads at a glance: a row of overlays (caption under each), then
    the image ROC curve, the PRO curve up to ``pro_limit`` and the image-score histograms."""
    n_top = max(len(examples), 1)
    # Fixed margins, no layout engine: a constrained layout took a third of the evaluate
    # stage's own time, which every re-score pays once per (category, k, seed).
    fig = Figure(figsize=(max(1.9 * n_top, 11.0), 7.0))
    fig.suptitle(f"{title}\n{metrics_text}", fontsize=10, y=0.99)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.25))
    top_axes = np.atleast_1d(top.subplots(1, n_top))
    top.subplots_adjust(left=0.01, right=0.99, bottom=0.0, top=0.8, wspace=0.08)
    for j, ax in enumerate(top_axes):
        ax.axis("off")
        if j < len(examples):
            image, caption = examples[j]
            ax.imshow(image, interpolation="nearest")
            ax.set_title(caption, fontsize=7)
    ax_roc, ax_pro, ax_hist = bottom.subplots(1, 3)
    bottom.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.88, wspace=0.28)
    if roc is not None:
        ax_roc.plot(roc[0], roc[1], color="tab:blue")
    ax_roc.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
    ax_roc.set(xlabel="FPR (images)", ylabel="TPR", title="image ROC", xlim=(0, 1), ylim=(0, 1.02))
    if len(pro[0]):
        ax_pro.plot(pro[0], pro[1], color="tab:red")
    ax_pro.set(xlabel="FPR (pixels)", ylabel="PRO", title=f"PRO curve to FPR {pro_limit:g}",
               xlim=(0, pro_limit), ylim=(0, 1.02))
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
    for cls, name, colour in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        ax_hist.hist(scores[labels == cls], bins=bins, alpha=0.6, color=colour,
                     label=f"{name} ({int((labels == cls).sum())})")
    ax_hist.set(xlabel="image score", ylabel="images", title="image scores")
    ax_hist.legend(fontsize=7)
    return _figure_png(fig)


def curve_csv(header: tuple[str, str], x: np.ndarray, y: np.ndarray) -> str:
    lines = [",".join(header)]
    lines += [f"{a:.6g},{b:.6g}" for a, b in zip(np.asarray(x, float), np.asarray(y, float))]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ summary tables


@dataclass(frozen=True)
class Column:
    key: str  # key in metrics.json, e.g. "aupro@0.3" or "aupro@0.3_thr99"
    title: str  # table heading, e.g. "AUPRO@30%" or "AUPRO@30% thr99"


def _computation(thresholds: int | None) -> str:
    return "exact" if thresholds is None else f"thr{int(thresholds)}"


def _aupro_column(limit: float, thresholds: int | None, headline: bool) -> Column:
    title = f"AUPRO@{float(limit) * 100:g}%"
    return Column(aupro_key(limit, thresholds),
                  title if headline else f"{title} {_computation(thresholds)}")


def _others(thresholds: Sequence[int], headline: int | None) -> list[int | None]:
    """The AUPRO computations besides the headline: exact first, then the approximations."""
    return [t for t in (None, *thresholds) if t != headline]


def metric_columns(limits: Sequence[float], thresholds: Sequence[int] = (),
                   headline: int | None = None) -> list[Column]:
    """Every column: I-AUROC, P-AUROC, the headline AUPRO at each FPR limit (titled plainly,
    ``AUPRO@30%``), then each other AUPRO computation at each limit (``AUPRO@30% thr99``,
    ``AUPRO@30% exact``). ``headline`` is the headline's threshold count, None = exact."""
    cols = [Column("i_auroc", "I-AUROC"), Column("p_auroc", "P-AUROC")]
    cols += [_aupro_column(limit, headline, True) for limit in limits]
    for t in _others(thresholds, headline):
        cols += [_aupro_column(limit, t, False) for limit in limits]
    return cols


def table_columns(limits: Sequence[float], thresholds: Sequence[int] = (),
                  headline: int | None = None) -> list[Column]:
    """The columns a person reads (Markdown, terminal): the headline AUPRO at every limit,
    the other computations only at the largest and the smallest limit (the paper reports
    30% and 1%; the approximation departs most from the exact value at 1%)."""
    cols = [Column("i_auroc", "I-AUROC"), Column("p_auroc", "P-AUROC")]
    cols += [_aupro_column(limit, headline, True) for limit in limits]
    ends = list(dict.fromkeys((max(limits), min(limits))))
    for t in _others(thresholds, headline):
        cols += [_aupro_column(limit, t, False) for limit in ends]
    return cols


def headline_note(thresholds: Sequence[int], headline: int | None) -> str:
    """One sentence for a table's intro: what AUPRO@L% is and what the other columns are."""
    def name(t: int | None) -> str:
        if t is None:
            return "the exact AUPRO, every score a threshold"
        return f"the published code's {t}-threshold approximation"
    text = f"AUPRO@L% is {name(headline)} (`evaluate.headline_aupro: {_computation(headline)}`)"
    for t in _others(thresholds, headline):
        text += f"; the `{_computation(t)}` columns are {name(t)}"
    return text + "."


def metrics_text(metrics: Mapping, limits: Sequence[float], thresholds: Sequence[int]) -> str:
    """The metrics lines of a per-category figure, in %: the AUROCs and the exact AUPRO, then
    one line per approximation."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    def aupro(t: int | None) -> str:
        return f"AUPRO {_computation(t)} " + "  ".join(
            f"@{float(limit) * 100:g}% {pct(metrics.get(aupro_key(limit, t)))}" for limit in limits)

    lines = [f"I-AUROC {pct(metrics.get('i_auroc'))}   P-AUROC {pct(metrics.get('p_auroc'))}   "
             f"{aupro(None)}  (%)"]
    lines += [aupro(t) for t in thresholds]
    return "\n".join(lines)


@dataclass(frozen=True)
class Cell:
    """A value in percent with its standard deviation over seeds (None = undefined)."""

    mean: float | None
    std: float | None
    n: int  # number of values (seeds) behind it

    def text(self) -> str:
        if self.mean is None:
            return "n/a"
        if self.n > 1 and self.std is not None:
            return f"{self.mean:.1f} ± {self.std:.1f}"
        return f"{self.mean:.1f}"


def _cell(values: Sequence[float | None]) -> Cell:
    """Mean and sample standard deviation (ddof 1) in percent; undefined if any is None."""
    if not values or any(v is None for v in values):
        return Cell(None, None, len(values))
    arr = np.asarray(values, dtype=np.float64) * 100.0
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return Cell(float(arr.mean()), std, len(arr))


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(np.asarray(values, dtype=np.float64)))


@dataclass(frozen=True)
class Row:
    group: str  # e.g. "mvtec3d k=1"
    dataset: str
    shots: int
    name: str  # category, variant, or "mean"
    cells: tuple[Cell, ...]


def summary_rows(
    metrics: Mapping[tuple[str, int, int], Mapping],
    dataset: str,
    categories: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    columns: Sequence[Column],
) -> list[Row]:
    """Per k: one row per category (mean ± std over seeds) and a ``mean`` row: the mean over
    categories of each seed, then mean ± std of those over seeds. ``metrics`` maps
    (category, k, seed) to a metrics.json dict."""
    rows: list[Row] = []
    for k in shots:
        group = f"{dataset} k={k}"
        for cat in categories:
            cells = tuple(_cell([metrics[(cat, k, s)].get(c.key) for s in seeds]) for c in columns)
            rows.append(Row(group, dataset, k, cat, cells))
        cells = tuple(
            _cell([_mean_or_none([metrics[(cat, k, s)].get(c.key) for cat in categories])
                   for s in seeds])
            for c in columns
        )
        rows.append(Row(group, dataset, k, "mean", cells))
    return rows


def ablation_rows(
    ablations: Mapping[tuple[str, int, int], Mapping[str, Mapping]],
    metrics: Mapping[tuple[str, int, int], Mapping],
    variants: Sequence[str],
    dataset: str,
    categories: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    columns: Sequence[Column],
    configured_name: str = "configured",
) -> list[Row]:
    """Per k: the configured model (metrics.json) and each fusion variant, as the mean over
    categories (then mean ± std over seeds)."""
    rows: list[Row] = []
    for k in shots:
        group = f"{dataset} k={k}"

        def source(variant: str, cat: str, s: int) -> Mapping:
            if variant == configured_name:
                return metrics[(cat, k, s)]
            return ablations[(cat, k, s)].get(variant, {})

        for variant in (configured_name, *variants):
            cells = tuple(
                _cell([_mean_or_none([source(variant, cat, s).get(c.key) for cat in categories])
                       for s in seeds])
                for c in columns
            )
            rows.append(Row(group, dataset, k, variant, cells))
    return rows


def rows_markdown(rows: Sequence[Row], columns: Sequence[Column], first: str, intro: str) -> str:
    """Markdown: one table per group (dataset and k), values in %, mean rows in bold."""
    out = [intro.rstrip(), ""]
    groups = list(dict.fromkeys(r.group for r in rows))
    for group in groups:
        out += [f"## {group}", ""]
        out.append("| " + " | ".join([first, *(c.title for c in columns)]) + " |")
        out.append("|" + "---|" * (len(columns) + 1))
        for r in rows:
            if r.group != group:
                continue
            name = f"**{r.name}**" if r.name == "mean" else r.name
            vals = [f"**{c.text()}**" if r.name == "mean" else c.text() for c in r.cells]
            out.append("| " + " | ".join([name, *vals]) + " |")
        out.append("")
    return "\n".join(out)


def rows_csv(rows: Sequence[Row], columns: Sequence[Column], first: str) -> str:
    """CSV: dataset, k, name, n_seeds, each metric in % and its std over seeds."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["dataset", "k", first, "n_seeds"]
    for c in columns:
        header += [c.title, f"{c.title} std"]
    writer.writerow(header)

    def fmt(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    for r in rows:
        line = [r.dataset, str(r.shots), r.name, str(r.cells[0].n if r.cells else 0)]
        for cell in r.cells:
            line += [fmt(cell.mean), fmt(cell.std)]
        writer.writerow(line)
    return buf.getvalue()


def mean_metrics(rows: Sequence[Row], columns: Sequence[Column]) -> dict[str, dict]:
    """The ``mean`` rows as DVC metrics: ``{"k1": {"I-AUROC": 96.1, "AUPRO@30%": ...}}``, in %
    (4 decimals, as the CSV), with ``"<title> std"`` beside each value where several seeds
    give a standard deviation; None where a metric is undefined."""
    def num(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else round(v, 4)

    out: dict[str, dict] = {}
    for r in rows:
        if r.name != "mean":
            continue
        entry = out.setdefault(f"k{r.shots}", {})
        for c, cell in zip(columns, r.cells):
            entry[c.title] = num(cell.mean)
            if cell.n > 1:
                entry[f"{c.title} std"] = num(cell.std)
    return out


def summary_png(rows: Sequence[Row], columns: Sequence[Column], dataset: str,
                headline: int | None = None) -> bytes:
    """Grouped bars: per category (and the mean), one bar per k, for I-AUROC and the first
    AUPRO column (the headline at the largest limit); error bars are the std over seeds."""
    shown = [columns[0]] + [c for c in columns if c.key.startswith("aupro@")][:1]
    names = list(dict.fromkeys(r.name for r in rows))
    shots = sorted({r.shots for r in rows})
    fig = Figure(figsize=(max(6.0, 0.9 * len(names) * max(len(shots), 1) / 2 + 4), 4.0 * len(shown)))
    width = 0.8 / max(len(shots), 1)
    for a, col in enumerate(shown):
        ax = fig.add_subplot(len(shown), 1, a + 1)
        ci = list(columns).index(col)
        for j, k in enumerate(shots):
            by_name = {r.name: r.cells[ci] for r in rows if r.shots == k}
            means = [by_name[n].mean if n in by_name and by_name[n].mean is not None else 0.0
                     for n in names]
            errs = [by_name[n].std if n in by_name and by_name[n].std is not None else 0.0
                    for n in names]
            x = np.arange(len(names)) + (j - (len(shots) - 1) / 2) * width
            ax.bar(x, means, width=width, yerr=errs, label=f"k={k}", capsize=2)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{col.title} (%)")
        ax.set_ylim(0, 105)
        aupro = col.key.startswith("aupro@")
        name = f"{col.title} ({_computation(headline)})" if aupro else col.title
        ax.set_title(f"{dataset}: {name}")
        ax.legend(fontsize=8, ncols=len(shots))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def write_bytes(path: Path, data: bytes) -> None:
    """Plain write, for files inside a directory that ``atomic_dir`` moves into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------- decision thresholds

DECISION_FIELDS = ("threshold", "precision", "recall", "f1")
DECISION_HEADINGS = ("category", "k", "seed", "level", "threshold", "P %", "R %", "F1 %",
                     "F1* %", "threshold*")


@dataclass(frozen=True)
class DecisionRow:
    """One (category, k, seed) and level (image or pixel): the fitted threshold with precision,
    recall and F1 on the test set, and the test set's F1-optimal threshold (F1*, a reference
    that looks at the test labels). None where undefined (no masks: no pixel entries)."""

    category: str
    shots: int
    seed: int
    level: str
    at_threshold: tuple[float | None, ...]  # DECISION_FIELDS
    reference: tuple[float | None, ...]  # DECISION_FIELDS of the F1-optimal threshold


def decision_rows(metrics: Mapping[tuple[str, int, int], Mapping]) -> list[DecisionRow]:
    """The rows of metrics.json's ``at_threshold`` and ``test_reference_f1_optimal``, image
    then pixel, in the order of ``metrics``."""
    def values(entry: Mapping | None) -> tuple[float | None, ...]:
        return tuple(None if not entry else entry.get(f) for f in DECISION_FIELDS)

    rows = []
    for (category, k, seed), m in metrics.items():
        at, ref = m.get("at_threshold") or {}, m.get("test_reference_f1_optimal") or {}
        rows += [DecisionRow(category, k, seed, level, values(at.get(level)),
                             values(ref.get(level))) for level in ("image", "pixel")]
    return rows


def _decision_cells(row: DecisionRow) -> list[str]:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    (t, p, r, f1), (t_ref, _, _, f1_ref) = row.at_threshold, row.reference
    return [row.category, str(row.shots), str(row.seed), row.level, num(t), pct(p), pct(r),
            pct(f1), pct(f1_ref), num(t_ref)]


def decision_table(rows: Sequence[DecisionRow]) -> list[list[str]]:
    """The cells of the thresholds table as shown (thresholds to 4 digits, P/R/F1 in %)."""
    return [_decision_cells(r) for r in rows]


def decision_markdown(rows: Sequence[DecisionRow], intro: str) -> str:
    out = [intro.rstrip(), "", "| " + " | ".join(DECISION_HEADINGS) + " |",
           "|" + "---|" * len(DECISION_HEADINGS)]
    out += ["| " + " | ".join(cells) + " |" for cells in decision_table(rows)]
    return "\n".join(out) + "\n"


def decision_csv(rows: Sequence[DecisionRow]) -> str:
    """Every value unrounded (P/R/F1 as fractions), empty where undefined."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["category", "k", "seed", "level", *DECISION_FIELDS,
                     *(f"test_reference_{f}" for f in DECISION_FIELDS)])
    for r in rows:
        writer.writerow([r.category, r.shots, r.seed, r.level,
                         *("" if v is None else repr(float(v))
                           for v in (*r.at_threshold, *r.reference))])
    return buf.getvalue()
