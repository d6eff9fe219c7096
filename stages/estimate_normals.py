"""Stage ``estimate_normals``: Marigold normals of real images (per category) or of the
generated images of one (category, k, seed).

Reads  ``artifacts/prepare/<cat>/{train,test}.zarr`` (``rgb``), or with ``shots``/``seed``
       ``artifacts/augment/<cat>/k<k>-s<seed>/generated.zarr``.
Writes ``artifacts/normals/<cat>/{train,test}.zarr``, or
       ``artifacts/normals_generated/<cat>/k<k>-s<seed>.zarr``:
       ``normals`` (N, S, S, 3) float16, unit normals in the real-normal frame encoded (n + 1) / 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import StoreWriter, atomic_dir, open_store, provenance
from pipeline.device import inference_dtype, pick_device
from pipeline.errors import InputError, ParamsError
from pipeline.models.diffusion import ModelClock, demo_threads, load_marigold, model_info
from pipeline.normals_estimation import predict_normals, sample_seed
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


def _write_normals(pipe: Any, source_info: dict, store: Any, out: Path, params: Params,
                   clock: ModelClock, label: str) -> int:
    p = params.estimate_normals
    size = params.data.size
    ids: list[str] = list(store.attrs["ids"])
    attrs = {k: store.attrs[k] for k in _CARRIED_ATTRS if k in store.attrs}
    attrs.update(
        provenance(
            "estimate_normals", section_dict(p), model=source_info, input=str(store.path),
            precision=str(pipe.dtype).replace("torch.", ""), frame="real-normal frame (x flipped)",
        )
    )
    batches = range(0, len(ids), p.batch_size)
    with StoreWriter(out, attrs=attrs) as writer:
        writer.create("normals", n=len(ids), sample_shape=(size, size, 3), dtype="float16")
        for start in track(batches, f"Marigold normals {label}", total=len(batches)):
            stop = min(start + p.batch_size, len(ids))
            rgb = store["rgb"][start:stop]
            encoded = predict_normals(
                pipe, rgb, [sample_seed(p.seed, i) for i in ids[start:stop]],
                steps=p.steps, ensemble=p.ensemble,
                processing_resolution=p.processing_resolution, out_size=size, clock=clock,
            )
            writer.append("normals", encoded)
    return len(ids)


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
        count = 0
        if shots is None:
            with atomic_dir(layout.normals(category)) as tmp:
                for split, store in inputs.items():
                    count += _write_normals(pipe, model_info(source), store, tmp / f"{split}.zarr",
                                            params, clock, f"{category}/{split}")
        else:
            assert seed is not None
            count = _write_normals(pipe, model_info(source), inputs["generated"],
                                   layout.normals_generated(category, shots, seed), params, clock,
                                   f"{category}/{layout.run_key(shots, seed)}")
    return {"images": float(count), "model_s": clock.seconds, "load_s": load_s,
            "total_s": time.perf_counter() - started}
