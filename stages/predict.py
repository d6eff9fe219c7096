"""``cmds-ad predict``: score new samples with a trained model, without DVC.

The model is a (category, k, seed) of this project's pipeline outputs (``--model
disc/k1-s0``: the mappers of ``fit_mapper``, the thresholds of ``thresholds`` and params.yaml)
or an exported bundle (``--bundle DIR``, :mod:`pipeline.bundle`). The samples go through
:class:`pipeline.prediction.Predictor`; ``--out`` is written atomically (nothing of a failed
run is left) and holds::

    predictions.csv         sample, image_score, label (1: above the image threshold),
                            image_threshold, pixel_threshold, anomalous_pixels, seconds
    maps/<sample>.tiff      the anomaly map (map_roc, the map the pixel threshold applies to)
                            at the input's resolution, float32
    masks/<sample>.png      the binary mask: map above the pixel threshold (255)
    overlays/<sample>.png   the map over the RGB image, colour scale [0, 2 x pixel threshold],
                            with the ground-truth contour where a gt mask was given

``<sample>`` is the sample id with ``/`` as ``_`` (``crack/003`` -> ``crack_003``).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from pipeline import report as R
from pipeline.artifacts import atomic_dir
from pipeline.bundle import TrainedModel
from pipeline.errors import InputError, ParamsError
from pipeline.outputs import mark
from pipeline.params import load_params
from pipeline.predict_input import check_sizes, find_samples
from pipeline.thresholds import read_thresholds
from stages import layout

if TYPE_CHECKING:  # torch: imported once the arguments are checked (a refusal is quick)
    from pipeline.prediction import SampleResult

COMMAND = "predict"
MODEL_NAME = re.compile(r"^(?P<category>[^/]+)/k(?P<shots>\d+)-s(?P<seed>\d+)$")
COLUMNS = ("sample", "image_score", "label", "image_threshold", "pixel_threshold",
           "anomalous_pixels", "seconds")
OVERLAY_RANGE = 2.0  # the overlay's colour scale ends at this multiple of the pixel threshold


def project_model(name: str, params_path: Path = Path("params.yaml")) -> TrainedModel:
    """``CATEGORY/kK-sS`` of this project's pipeline outputs."""
    match = MODEL_NAME.match(name)
    if match is None:
        raise ParamsError(f"--model: {name!r} is not CATEGORY/kK-sS (e.g. disc/k1-s0)")
    category, shots, seed = match["category"], int(match["shots"]), int(match["seed"])
    params = load_params(params_path)
    mapper_dir = layout.mappers(category, shots, seed)
    if not (mapper_dir / "config.json").is_file():
        raise InputError(f"{mapper_dir}: no trained model {name} here (run `dvc repro`, or "
                         "`dvc pull` a teammate's outputs; --model names a category/kK-sS of "
                         "params.yaml)")
    return TrainedModel(params, category, mapper_dir,
                        read_thresholds(layout.thresholds(category, shots, seed)))


def _sample_files(out: Path, result: SampleResult, thresholds: tuple[float, float]) -> dict:
    """Write one sample's map, mask and overlay; its row of predictions.csv."""
    from pipeline.prediction import to_input_resolution

    image_t, pixel_t = thresholds
    raw = result.raw
    height, width = raw.rgb.shape[:2]
    full = to_input_resolution(result.scored.map_roc, height, width)
    mask = full > pixel_t
    name = R.safe_name(result.ref.id)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, full.astype(np.float32))
    R.write_bytes(out / "maps" / f"{name}.tiff", buffer.getvalue())
    R.write_bytes(out / "masks" / f"{name}.png", R.png_bytes(mask.astype(np.uint8) * 255))
    R.write_bytes(out / "overlays" / f"{name}.png",
                  R.png_bytes(R.overlay(raw.rgb, full, raw.gt, OVERLAY_RANGE * pixel_t)))
    return {"sample": result.ref.id, "image_score": f"{result.image_score:.6g}",
            "label": int(result.image_score > image_t), "image_threshold": f"{image_t:.6g}",
            "pixel_threshold": f"{pixel_t:.6g}", "anomalous_pixels": int(mask.sum()),
            "seconds": f"{result.seconds:.3f}"}


def run(model: TrainedModel, input_path: Path, out: Path) -> dict[str, float]:
    """Predict every sample under ``input_path`` into ``out``; returns seconds per step."""
    refs = find_samples(input_path)
    check_sizes(refs)
    from pipeline.prediction import Predictor  # torch: once the input is checked

    predictor = Predictor.load(model.params, model.category, model.mapper_dir)
    with atomic_dir(out) as tmp:
        mark(tmp, COMMAND)
        rows = [_sample_files(tmp, result, model.thresholds)
                for result in predictor.predict(refs, f"predict {model.category}")]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        R.write_bytes(tmp / "predictions.csv", text.getvalue().encode())
    return {**predictor.seconds, "samples": float(len(refs))}
