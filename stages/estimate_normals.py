"""Stage ``estimate_normals``: Marigold normals of real images (per category) or of the
generated images of one (category, k, seed).

Reads  ``artifacts/prepare/<cat>/{train,test}.zarr`` (``rgb``), or with ``shots``/``seed``
       ``artifacts/augment/<cat>/k<k>-s<seed>/generated.zarr``.
Writes ``artifacts/normals/<cat>/{train,test}.zarr``, or
       ``artifacts/normals_generated/<cat>/k<k>-s<seed>.zarr``:
       ``normals`` (N, S, S, 3) float16, unit normals in the real-normal frame encoded (n + 1) / 2.

The model runs on the main thread; helper threads read the next batch and write the stores
meanwhile (see ``_write_normals``), so reading and writing add little to the model's time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import StoreWriter, atomic_dir, open_store, provenance
from pipeline.device import inference_dtype, pick_device
from pipeline.errors import InputError, ParamsError
from pipeline.models.diffusion import (
    ModelClock,
    demo_threads,
    load_marigold,
    model_info,
)
from pipeline.normals_estimation import (
    finish_normals,
    marigold_prediction,
    model_input,
    sample_seed,
)
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from stages import layout

# Sample metadata carried over from the input store so readers can align the two.
_CARRIED_ATTRS = ("ids", "labels", "defect_types", "category", "dataset", "source_ids")


def _check_rgb(store: Any, size: int) -> None:
    if "rgb" not in store:
        raise InputError(f"{store.path}: no array 'rgb'")
    if not isinstance(store.attrs.get("ids"), list):
        raise InputError(f"{store.path}: attribute 'ids' (the sample ids) is missing")
    rgb = store["rgb"]
    n = len(store.attrs["ids"])
    if rgb.dtype.name != "uint8" or rgb.ndim != 4 or tuple(rgb.shape[1:]) != (size, size, 3):
        raise InputError(
            f"{store.path}: 'rgb' must be (N, {size}, {size}, 3) uint8 (data.size={size}), "
            f"got {tuple(rgb.shape)} {rgb.dtype}"
        )
    if rgb.shape[0] != n:
        raise InputError(f"{store.path}: 'rgb' has {rgb.shape[0]} images but {n} ids")


@dataclass(frozen=True)
class _Batch:
    """One model call: images ``start:stop`` of input store ``store``."""

    store: int
    ids: list[str]
    start: int
    stop: int


def _plan(stores: list[Any], batch_size: int) -> list[_Batch]:
    plan = []
    for index, store in enumerate(stores):
        ids: list[str] = list(store.attrs["ids"])
        plan += [_Batch(index, ids, start, min(start + batch_size, len(ids)))
                 for start in range(0, len(ids), batch_size)]
    return plan


class _ReadAhead:
    """The model input of each planned batch, read and converted on a helper thread one batch
    ahead of its use, so each read overlaps the model call of the batch before it."""

    def __init__(self, pool: ThreadPoolExecutor, stores: list[Any], plan: list[_Batch]) -> None:
        self._pool = pool
        self._arrays = [store["rgb"] for store in stores]  # opened once, not per batch
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan)

    def _read(self, step: int) -> torch.Tensor:
        batch = self._plan[step]
        return model_input(self._arrays[batch.store][batch.start : batch.stop])

    def __iter__(self) -> Iterator[tuple[_Batch, torch.Tensor]]:
        upcoming = self._pool.submit(self._read, 0) if self._plan else None
        for step, batch in enumerate(self._plan):
            assert upcoming is not None
            images = upcoming.result()
            if step + 1 < len(self._plan):
                upcoming = self._pool.submit(self._read, step + 1)
            yield batch, images


class _Outputs:
    """The normals stores being written. Every method but :meth:`abort` runs on the helper
    thread, in submission order, so opening, finishing (resize, encode), appending and
    closing stores all overlap model calls.
    """

    def __init__(self, outs: list[Path], attrs: list[dict], counts: list[int], size: int) -> None:
        self._specs = list(zip(outs, attrs, counts))
        self._size = size
        self._open: dict[int, StoreWriter] = {}

    def open(self) -> None:
        for index, (out, attrs, n) in enumerate(self._specs):
            writer = StoreWriter(out, attrs=attrs).__enter__()
            self._open[index] = writer
            writer.create("normals", n=n, sample_shape=(self._size, self._size, 3),
                          dtype="float16")
            if n == 0:
                self._close(index)

    def write(self, index: int, prediction: torch.Tensor, last: bool) -> None:
        self._open[index].append("normals", finish_normals(prediction, self._size))
        if last:
            self._close(index)

    def _close(self, index: int) -> None:
        self._open.pop(index).__exit__(None, None, None)  # completes it: renamed into place

    def abort(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """ExitStack exit callback: remove the temporary stores a failed run left open."""
        while self._open:
            self._open.popitem()[1].__exit__(exc_type, exc, tb)


def _normals_attrs(store: Any, source_info: dict, params: Params, precision: str) -> dict:
    attrs = {k: store.attrs[k] for k in _CARRIED_ATTRS if k in store.attrs}
    attrs.update(
        provenance(
            "estimate_normals", section_dict(params.estimate_normals), model=source_info,
            input=str(store.path), precision=precision, frame="real-normal frame (x flipped)",
        )
    )
    return attrs


def _write_normals(pipe: Any, source_info: dict, stores: list[Any], outs: list[Path],
                   params: Params, clock: ModelClock, label: str) -> None:
    """Estimate the normals of ``stores`` batch by batch and write them to ``outs``.

    The model runs on this thread. Helper threads read the next batch (:class:`_ReadAhead`)
    and write the stores (:class:`_Outputs`) while the model works; at most one batch is read
    ahead and one prediction waits to be written, so memory stays flat. (Call this with the
    torch thread count already set: a thread takes it on its first torch operation.)
    """
    p = params.estimate_normals
    precision = str(pipe.dtype).replace("torch.", "")
    outputs = _Outputs(
        outs, [_normals_attrs(store, source_info, params, precision) for store in stores],
        [len(store.attrs["ids"]) for store in stores], params.data.size,
    )
    with ExitStack() as stack:
        stack.push(outputs.abort)  # runs after the helper threads have stopped (LIFO)
        reader, helper = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
        # After a failure, queued reads and writes are dropped rather than run.
        stack.callback(reader.shutdown, cancel_futures=True)
        stack.callback(helper.shutdown, cancel_futures=True)
        batches = _ReadAhead(reader, stores, _plan(stores, p.batch_size))
        pending: deque[Future[None]] = deque([helper.submit(outputs.open)])
        for batch, images in track(batches, f"Marigold normals {label}", total=len(batches)):
            prediction = marigold_prediction(
                pipe, images, [sample_seed(p.seed, i) for i in batch.ids[batch.start : batch.stop]],
                steps=p.steps, ensemble=p.ensemble,
                processing_resolution=p.processing_resolution, clock=clock,
            )
            last = batch.stop == len(batch.ids)
            pending.append(helper.submit(outputs.write, batch.store, prediction, last))
            while len(pending) > 1:
                pending.popleft().result()  # re-raises a failed write here
        while pending:
            pending.popleft().result()


def run(params: Params, category: str, shots: int | None = None,
        seed: int | None = None) -> dict[str, float]:
    """Write the estimated normals; returns timing figures (used by the benchmark)."""
    started = time.perf_counter()
    if shots is None and seed is not None:
        raise InputError("estimate_normals: --seed needs --shots (the generated images of a k)")
    if shots is not None and seed is None:
        seed = 0
    # Open (and check) every input before loading the model, so bad input fails in seconds.
    if shots is None:
        inputs = {split: open_store(layout.prepared(category) / f"{split}.zarr")
                  for split in ("train", "test")}
    else:
        assert seed is not None
        inputs = {"generated": open_store(layout.augmented(category, shots, seed) / "generated.zarr")}
    for store in inputs.values():
        _check_rgb(store, params.data.size)
    # Largest store first: the final shard write of the last store is the one write that no
    # model call hides.
    splits = sorted(inputs, key=lambda split: -len(inputs[split].attrs["ids"]))
    stores = [inputs[split] for split in splits]

    device = pick_device()
    loading = time.perf_counter()
    pipe, source = load_marigold(
        params.models.normals, params.models.cache_dir, device, inference_dtype(device)
    )
    load_s = time.perf_counter() - loading
    resolution = params.estimate_normals.processing_resolution
    if resolution % pipe.vae_scale_factor:
        raise ParamsError(
            f"estimate_normals.processing_resolution: {resolution} is not a multiple of the "
            f"VAE's scale factor {pipe.vae_scale_factor} ({source.spec}); 0 = input resolution"
        )
    info(f"estimate_normals {category}: Marigold {source.spec} ({source.kind}) on {device}, "
         f"{params.estimate_normals.steps} steps, ensemble {params.estimate_normals.ensemble}")
    clock = ModelClock(device)
    with demo_threads(device, source):
        if shots is None:
            with atomic_dir(layout.normals(category)) as tmp:
                _write_normals(pipe, model_info(source), stores,
                               [tmp / f"{split}.zarr" for split in splits], params, clock,
                               category)
        else:
            assert seed is not None
            _write_normals(pipe, model_info(source), stores,
                           [layout.normals_generated(category, shots, seed)], params, clock,
                           f"{category}/{layout.run_key(shots, seed)}")
    return {"images": float(sum(len(store.attrs["ids"]) for store in stores)),
            "model_s": clock.seconds, "load_s": load_s, "total_s": time.perf_counter() - started}
