"""Stage ``estimate_normals``: Marigold normals of real images (per category) or of the
generated images of one (category, k, seed).

Reads  ``artifacts/prepare/<cat>/{train,test}.zarr`` (``ids``; ``rgb`` with
       ``estimate_normals.input: prepared``), or with ``shots``/``seed``
       ``artifacts/augment/<cat>/k<k>-s<seed>/generated.zarr`` (``rgb``, or ``rgb_full`` with
       ``input: original``). With ``input: original`` the real images are read from the dataset
       (``data.dataset``, ``data.root``) and padded to a square with zeros, as prepare pads.
Writes ``artifacts/normals/<cat>/{train,test}.zarr``, or
       ``artifacts/normals_generated/<cat>/k<k>-s<seed>.zarr``:
       ``normals`` (N, S, S, 3) float16, normals encoded (n + 1) / 2, in the real-normal frame
       (``flip_x: true``) or Marigold's (``false``); see ``pipeline/normals_estimation.py``.

The model runs on the main thread; helper threads read the next batch and write the stores
meanwhile (see ``_write_normals``), so reading and writing add little to the model's time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.artifacts import StoreWriter, atomic_dir, open_store, provenance
from pipeline.background import BackgroundWriter, ReadAhead
from pipeline.data import list_samples, read_rgb
from pipeline.data.preprocess import RGB_PAD_VALUE, pad_square
from pipeline.device import inference_dtype, pick_device
from pipeline.errors import InputError, ParamsError
from pipeline.models.diffusion import (
    ModelClock,
    demo_threads,
    load_marigold,
    model_info,
)
from pipeline.normals_estimation import (
    PRECISION_DTYPES,
    MarigoldRun,
    finish_normals,
    image_seeds,
    marigold_prediction,
    model_input,
    resolve_resolution,
)
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from stages import layout

# Sample metadata carried over from the input store so readers can align the two.
_CARRIED_ATTRS = ("ids", "labels", "defect_types", "category", "dataset", "source_ids")
def _check_images(store: Any, name: str, side: int | None, why: str) -> int:
    """``store[name]`` must be (N, R, R, 3) uint8 with one image per id (R = ``side`` if
    given); returns R."""
    if name not in store:
        raise InputError(f"{store.path}: no array {name!r} ({why})")
    images, n = store[name], len(store.ids)
    shape = tuple(images.shape)
    square = images.ndim == 4 and shape[1] == shape[2] and shape[3] == 3
    if images.dtype.name != "uint8" or not square or (side is not None and shape[1] != side):
        want = f"(N, {side}, {side}, 3)" if side is not None else "(N, R, R, 3)"
        raise InputError(f"{store.path}: {name!r} must be {want} uint8 ({why}), got "
                         f"{shape} {images.dtype}")
    if shape[0] != n:
        raise InputError(f"{store.path}: {name!r} has {shape[0]} images but {n} ids")
    return int(shape[1])


@dataclass(frozen=True)
class _Source:
    """Where the RGB of one output store comes from: its input store (ids and attributes),
    the side of each (square) image, and a reader of images ``start:stop``."""

    store: Any
    sides: list[int]
    read: Callable[[int, int], np.ndarray]
    described: str  # for provenance


def _store_source(store: Any, name: str, side: int | None, why: str) -> _Source:
    r = _check_images(store, name, side, why)
    array = store[name]  # opened once, not per batch
    return _Source(store, [r] * len(store.ids), lambda a, b: array[a:b],
                   f"{store.path}:{name}")


def _dataset_source(store: Any, params: Params, category: str, split: str) -> _Source:
    """The original RGB of the store's samples, read from the dataset and padded square."""
    data = params.data
    refs = {r.id: r for r in list_samples(data.dataset, data.root, category, split)}
    ids = store.ids
    missing = [i for i in ids if i not in refs]
    if missing:
        raise InputError(
            f"{data.root}/{category}: sample {missing[0]!r} of {store.path} is not in the "
            f"dataset's {split} split (data.root or data.dataset changed since prepare?)"
        )
    paths = [refs[i].rgb for i in ids]
    sides = []
    for path in paths:  # the header only: batches hold images of one size
        try:
            with Image.open(path) as image:
                sides.append(max(image.size))
        except OSError as err:
            raise InputError(f"{path}: cannot read rgb image ({err})") from None

    def read(start: int, stop: int) -> np.ndarray:
        return np.stack([pad_square(read_rgb(p), RGB_PAD_VALUE) for p in paths[start:stop]])

    return _Source(store, sides, read, f"{data.root}/{category}/{split} (rgb, padded square)")


@dataclass(frozen=True)
class _Batch:
    """One model call: images ``start:stop`` of source ``source``, all ``side`` x ``side``."""

    source: int
    ids: list[str]
    start: int
    stop: int
    side: int


def _plan(sources: list[_Source], batch_size: int) -> list[_Batch]:
    plan = []
    for index, source in enumerate(sources):
        ids: list[str] = list(source.store.ids)
        start = 0
        while start < len(ids):
            stop = start + 1
            while (stop < len(ids) and stop - start < batch_size
                   and source.sides[stop] == source.sides[start]):
                stop += 1
            plan.append(_Batch(index, ids, start, stop, source.sides[start]))
            start = stop
    return plan


def _batch_reader(sources: list[_Source], plan: list[_Batch]) -> Callable[[int], torch.Tensor]:
    """The model input of planned batch ``step`` (run on the read-ahead thread)."""
    def read(step: int) -> torch.Tensor:
        batch = plan[step]
        rgb = sources[batch.source].read(batch.start, batch.stop)
        if rgb.shape[1:3] != (batch.side, batch.side):  # a file changed since planning
            raise InputError(f"{sources[batch.source].described}: image "
                             f"{batch.ids[batch.start]!r} changed size while being read")
        return model_input(rgb)

    return read


class _Outputs:
    """The normals stores being written. Every method but :meth:`abort` runs on the helper
    thread, in submission order, so opening, finishing (resize, encode), appending and
    closing stores all overlap model calls.
    """

    def __init__(self, outs: list[Path], attrs: list[dict], counts: list[int], size: int,
                 run: MarigoldRun) -> None:
        self._specs = list(zip(outs, attrs, counts))
        self._size = size
        self._run = run
        self._open: dict[int, StoreWriter] = {}

    def open(self) -> None:
        for index, (out, attrs, n) in enumerate(self._specs):
            writer = StoreWriter(out, attrs=attrs).__enter__()
            self._open[index] = writer
            writer.create("normals", n=n, sample_shape=(self._size, self._size, 3),
                          dtype="float16")
            if n == 0:
                self._close(index)

    def write(self, index: int, prediction: torch.Tensor, side: int, last: bool) -> None:
        self._open[index].append(
            "normals", finish_normals(prediction, side, self._size, self._run))
        if last:
            self._close(index)

    def _close(self, index: int) -> None:
        self._open.pop(index).__exit__(None, None, None)  # completes it: renamed into place

    def abort(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """ExitStack exit callback: remove the temporary stores a failed run left open."""
        while self._open:
            self._open.popitem()[1].__exit__(exc_type, exc, tb)


def _normals_attrs(source: _Source, source_info: dict, params: Params, precision: str,
                   run: MarigoldRun) -> dict:
    store = source.store
    attrs = {k: store.attrs[k] for k in _CARRIED_ATTRS if k in store.attrs}
    frame = ("real-normal frame (Marigold's x flipped)" if run.flip_x
             else "Marigold's frame (x right, y up, z to the viewer)")
    attrs.update(
        provenance(
            "estimate_normals", section_dict(params.estimate_normals), model=source_info,
            input=source.described, precision=precision, frame=frame,
            processing_resolution=run.processing_resolution,
        )
    )
    return attrs


def _write_normals(pipe: Any, source_info: dict, sources: list[_Source], outs: list[Path],
                   params: Params, run: MarigoldRun, clock: ModelClock, label: str) -> None:
    """Estimate the normals of ``sources`` batch by batch and write them to ``outs``.

    The model runs on this thread. Helper threads (``pipeline.background``) read the next
    batch and write the stores (:class:`_Outputs`) while the model works; at most one batch
    is read ahead and one prediction waits to be written, so memory stays flat. (Call this
    with the torch thread count already set: a thread takes it on its first torch operation.)
    """
    p = params.estimate_normals
    precision = str(pipe.dtype).replace("torch.", "")
    outputs = _Outputs(
        outs, [_normals_attrs(source, source_info, params, precision, run) for source in sources],
        [len(source.store.ids) for source in sources], params.data.size, run,
    )
    plan = _plan(sources, p.batch_size)
    with ExitStack() as stack:
        stack.push(outputs.abort)  # runs after the helper threads have stopped (LIFO)
        batches = stack.enter_context(ReadAhead(_batch_reader(sources, plan), len(plan)))
        writer = stack.enter_context(BackgroundWriter(max_pending=1))
        writer.submit(outputs.open)
        for batch, images in track(zip(plan, batches), f"Marigold normals {label}",
                                   total=len(plan)):
            seeds = image_seeds(p.seed, batch.ids[batch.start : batch.stop], p.seeding)
            prediction = marigold_prediction(pipe, images, seeds, run, clock=clock)
            writer.submit(outputs.write, batch.source, prediction, batch.side,
                          batch.stop == len(batch.ids))


def _sources(params: Params, category: str, shots: int | None,
             seed: int | None) -> dict[str, _Source]:
    """Every input, opened and checked (before the model loads, so bad input fails fast)."""
    original = params.estimate_normals.input == "original"
    size = params.data.size
    if shots is None:
        stores = {split: open_store(layout.prepared(category) / f"{split}.zarr")
                  for split in ("train", "test")}
        if original:
            return {split: _dataset_source(store, params, category, split)
                    for split, store in stores.items()}
        why = f"data.size={size}"
        return {split: _store_source(store, "rgb", size, why) for split, store in stores.items()}
    assert seed is not None
    store = open_store(layout.augmented(category, shots, seed) / "generated.zarr")
    if original:
        # The generation-resolution images augment writes next to `rgb`.
        why = "the generated images at augment.resolution, read with estimate_normals.input: original"
        return {"generated": _store_source(store, "rgb_full", None, why)}
    return {"generated": _store_source(store, "rgb", size, f"data.size={size}")}


def run(params: Params, category: str, shots: int | None = None,
        seed: int | None = None) -> dict[str, float]:
    """Write the estimated normals; returns timing figures (used by the benchmark)."""
    started = time.perf_counter()
    if shots is None and seed is not None:
        raise InputError("estimate_normals: --seed needs --shots (the generated images of a k)")
    if shots is not None and seed is None:
        seed = 0
    inputs = _sources(params, category, shots, seed)
    # Largest store first: the final shard write of the last store is the one write that no
    # model call hides.
    splits = sorted(inputs, key=lambda split: -len(inputs[split].store.ids))
    sources = [inputs[split] for split in splits]

    p = params.estimate_normals
    device = pick_device()
    dtype = inference_dtype(device) if p.precision == "auto" else PRECISION_DTYPES[p.precision]
    loading = time.perf_counter()
    pipe, source = load_marigold(params.models.normals, params.models.cache_dir, device, dtype)
    load_s = time.perf_counter() - loading
    marigold = MarigoldRun.of(p, resolve_resolution(pipe, p.processing_resolution, source.spec))
    info(f"estimate_normals {category}: Marigold {source.spec} ({source.kind}) on {device}, "
         f"{p.input} input, processing resolution {marigold.processing_resolution or 'input'}, "
         f"{p.steps} steps, ensemble {p.ensemble}")
    clock = ModelClock(device)
    with demo_threads(device, source):
        if shots is None:
            with atomic_dir(layout.normals(category)) as tmp:
                _write_normals(pipe, model_info(source), sources,
                               [tmp / f"{split}.zarr" for split in splits], params, marigold,
                               clock, category)
        else:
            assert seed is not None
            _write_normals(pipe, model_info(source), sources,
                           [layout.normals_generated(category, shots, seed)], params, marigold,
                           clock, f"{category}/{layout.run_key(shots, seed)}")
    return {"images": float(sum(len(s.store.ids) for s in sources)),
            "model_s": clock.seconds, "load_s": load_s, "total_s": time.perf_counter() - started}
