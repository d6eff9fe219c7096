"""The ``cmds-ad`` command line: one command per DVC stage plus tools.

Stage modules are imported lazily so ``cmds-ad --help`` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import CmdsAdError, InputError

app = typer.Typer(
    name="cmds-ad",
    help="CMDS-AD: few-shot RGB + 3D anomaly detection as a cached DVC pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameter file.")]
CategoryArg = Annotated[str, typer.Argument(help="Category, e.g. bagel.")]
ShotsOpt = Annotated[int, typer.Option("--shots", "-k", help="Number of shots k.")]
SeedOpt = Annotated[int, typer.Option("--seed", "-s", help="Few-shot seed.")]
MaybeShotsOpt = Annotated[
    Optional[int], typer.Option("--shots", "-k", help="Generated images of this k (else real).")
]
MaybeSeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="Few-shot seed.")]


_PARENT = os.getppid()  # read at import, the earliest point: the parent may die before the call


def _is_dvc(pid: int) -> bool:
    # a process that runs DVC through its Python API (the distribute worker) names itself
    if os.environ.get("CMDS_AD_DVC_PID") == str(pid):
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "dvc" for arg in argv)


def _parent_of(pid: int) -> int:
    try:  # field 4 of /proc/<pid>/stat, after the parenthesised command name
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _orphaned(reason: str) -> None:
    sys.stderr.write(f"error: {reason}; stopping this stage\n")
    os._exit(1)


def _watch(pid: int) -> None:
    import time

    while Path(f"/proc/{pid}").exists():
        time.sleep(0.5)
    _orphaned(f"the dvc process {pid} that started it has exited")


def _exit_with_parent() -> None:
    """Linux: die with the ``dvc`` running this stage, so no orphan keeps writing.

    The parent-death signal covers a direct parent (DVC runs ``$SHELL -c cmd``, which bash
    replaces by the command); a shell that stays in between is covered by a thread watching the
    dvc process. What a killed stage leaves is a dot-named temporary that DVC ignores and the
    next run of the stage removes. Elsewhere (macOS, Windows) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != _PARENT:  # the parent died before the call: nothing would signal us
        _orphaned("the process that started it has exited")
    if "DVC_STAGE" not in os.environ:  # run by hand, not by dvc
        return
    pid = os.getppid()
    for _ in range(3):  # the dvc process: the parent, or above a shell or two
        if _is_dvc(pid):
            break
        pid = _parent_of(pid)
    else:
        # dvc died before this process got here (it was re-parented) or is not an ancestor
        _orphaned("the dvc process that started it is gone")
    if pid != os.getppid():
        import threading

        threading.Thread(target=_watch, args=(pid,), daemon=True).start()


@app.callback()
def _start() -> None:
    _exit_with_parent()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def _run_stage(module: str, params_path: Path, **kwargs) -> None:
    """Validate params, then call ``stages.<module>.run``; user errors become one line."""
    from pipeline.params import load_params

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        params = load_params(params_path)
        importlib.import_module(f"stages.{module}").run(params, **kwargs)
    except CmdsAdError as err:
        _fail(str(err))


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Output folder (MVTec 3D-AD layout).")],
    category: Annotated[
        Optional[list[str]],
        typer.Option(help="Write only this category (repeat for more); default: all."),
    ] = None,
    n_train: Annotated[int, typer.Option(min=1, help="Training images per category.")] = 10,
    n_test: Annotated[int, typer.Option(min=2, help="Test images per category.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    eyecandies: Annotated[
        Optional[Path], typer.Option(help="Also write one category in the Eyecandies layout here.")
    ] = None,
) -> None:
    """Generate the embedded demo dataset (synthetic objects with 2D, 3D and mixed defects);
    the demo_data stage runs it once per category of `demo_data.categories`."""
    from pipeline.data.demo import CATEGORIES, write_demo_eyecandies
    from stages.demo_data import write

    unknown = [c for c in category or () if c not in CATEGORIES]
    if unknown:
        _fail(f"--category: unknown demo category {unknown[0]!r} (have {', '.join(CATEGORIES)})")
    try:
        write(out, category or list(CATEGORIES), seed=seed, n_train=n_train, n_test=n_test)
        if eyecandies is not None:
            write_demo_eyecandies(eyecandies, seed=seed)
    except CmdsAdError as err:
        _fail(str(err))


def _require_npz(file: Path) -> None:
    """An NPZ is a zip archive; anything else would reach numpy's misleading "pickled data"."""
    try:
        with open(file, "rb") as f:
            head = f.read(6)
    except OSError:
        return  # metrics_command names a missing or unreadable file
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        what = "a single .npy array" if head == b"\x93NUMPY" else "not a zip archive"
        raise InputError(f"{file}: not an NPZ file ({what}); write one with numpy.savez("
                         f"file, anomaly_maps=..., gt=..., labels=...)")


@app.command("metrics")
def metrics(
    file: Annotated[Path, typer.Argument(help="NPZ with anomaly_maps, gt, labels [, scores].")],
    aupro_thresholds: Annotated[
        Optional[list[int]],
        typer.Option(help="Also the approximation with N thresholds (aupro@L_thrN; repeatable). "
                          "The exact AUPRO and the published 99-threshold one are always given."),
    ] = None,
) -> None:
    """Compute I-AUROC, P-AUROC and AUPRO (exact and aupro@L_thr99) of anomaly maps stored in
    an NPZ file; print JSON."""
    from stages.evaluate import metrics_command

    try:
        _require_npz(file)
        metrics_command(file, aupro_thresholds or ())
    except CmdsAdError as err:
        _fail(str(err))


@app.command("prepare")
def prepare(category: CategoryArg, params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage: read, preprocess and store one category; choose and record the shots."""
    _run_stage("prepare", params, category=category)


@app.command("augment")
def augment(
    category: CategoryArg, shots: ShotsOpt, seed: SeedOpt = 0, params: ParamsOpt = Path("params.yaml")
) -> None:
    """Stage: fine-tune a LoRA on the shots and generate augmented images."""
    _run_stage("augment", params, category=category, shots=shots, seed=seed)


@app.command("estimate-normals")
def estimate_normals(
    category: CategoryArg,
    shots: MaybeShotsOpt = None,
    seed: MaybeSeedOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Stage: Marigold normals of real images (or, with --shots, of generated images)."""
    _run_stage("estimate_normals", params, category=category, shots=shots, seed=seed)


@app.command("extract-features")
def extract_features(
    category: CategoryArg,
    shots: MaybeShotsOpt = None,
    seed: MaybeSeedOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Stage: frozen-backbone features of RGB and normal images (or of generated images)."""
    _run_stage("extract_features", params, category=category, shots=shots, seed=seed)


@app.command("fit-mapper")
def fit_mapper(
    category: CategoryArg, shots: ShotsOpt, seed: SeedOpt = 0, params: ParamsOpt = Path("params.yaml")
) -> None:
    """Stage: train the four cross-modal feature mappers."""
    _run_stage("fit_mapper", params, category=category, shots=shots, seed=seed)


@app.command("infer")
def infer(
    category: CategoryArg, shots: ShotsOpt, seed: SeedOpt = 0, params: ParamsOpt = Path("params.yaml")
) -> None:
    """Stage: run the four mappers on the test set; store the raw stream maps."""
    _run_stage("infer", params, category=category, shots=shots, seed=seed)


@app.command("score")
def score(
    category: CategoryArg, shots: ShotsOpt, seed: SeedOpt = 0, params: ParamsOpt = Path("params.yaml")
) -> None:
    """Stage: fuse, mask, smooth and normalise the stream maps; image scores (no torch)."""
    _run_stage("score", params, category=category, shots=shots, seed=seed)


@app.command("evaluate")
def evaluate(
    category: CategoryArg, shots: ShotsOpt, seed: SeedOpt = 0, params: ParamsOpt = Path("params.yaml")
) -> None:
    """Stage: metrics, curves, heatmaps and fusion ablations of one category and k."""
    _run_stage("evaluate", params, category=category, shots=shots, seed=seed)


@app.command("report")
def report(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage: summary tables (mean over categories per k) and the overview figure."""
    _run_stage("report", params)


JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1,
                                      help="Experiments run at once (DVC queue workers).")]


@app.command("sweep")
def sweep(
    set_param: Annotated[list[str], typer.Option(
        "--set-param", "-S",
        help="As for `dvc exp run -S`: key=value, or key=v1,v2,... for one experiment per "
             "value (several such give their grid).")],
    jobs: JobsOpt = 1,
) -> None:
    """Queue DVC experiments (`dvc exp run --queue -S ...`), run the queue, and exit non-zero
    naming any experiment that failed; compare them with `dvc exp show`."""
    from stages.sweep import sweep as run

    try:
        done = run([set_param], jobs)
    except CmdsAdError as err:
        _fail(str(err))
    typer.echo(f"ran {len(done)} experiments: {', '.join(done)} (compare: dvc exp show)")


@app.command("sweep-lambda")
def sweep_lambda(
    values: Annotated[str, typer.Option(help="Comma-separated weights.")] = "0,0.05,0.1,0.2,0.5,1",
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results/sensitivity"),
    jobs: JobsOpt = 1,
) -> None:
    """Sensitivity of the estimated-stream weight: one queued DVC experiment per value
    (lambda_1 = lambda_2; only score/evaluate/report run), then a CSV and a plot."""
    from stages.sensitivity import run_sweep

    try:
        weights = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        _fail(f"--values: not a comma-separated list of numbers: {values!r}")
    try:
        run_sweep(weights, params, out, jobs)
    except CmdsAdError as err:
        _fail(str(err))


@app.command("import-official")
def import_official(
    ckpt_root: Annotated[Path, typer.Argument(help="Folder of the released archive (holds checkpoints/).")],
    category: Annotated[str, typer.Option("--category", "-c", help="Category, e.g. bagel.")],
    shots: ShotsOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Mapper folder to write.")],
    dataset: Annotated[str, typer.Option(help="mvtec3d or eyecandies (folder prefix).")] = "mvtec3d",
) -> None:
    """Convert the four official mapper checkpoints of one category and k into a mapper folder."""
    from pipeline.official import import_official as convert

    if dataset not in ("mvtec3d", "eyecandies"):
        _fail(f"--dataset: {dataset!r} is not one of mvtec3d, eyecandies")
    try:
        convert(ckpt_root, dataset, category, shots, out)
    except CmdsAdError as err:
        _fail(str(err))
    typer.echo(f"{out}: four mappers converted from {ckpt_root} ({category}, k={shots})")


@app.command("validate-params")
def validate_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage: validate the whole parameter file (every section and key) before any work."""
    _run_stage("validate_params", params)


@app.command("demo-models")
def demo_models(
    out: Annotated[Path, typer.Argument(help="Output folder (vae/, unet/, training.json).")],
    seed: Annotated[Optional[int], typer.Option(help="Training seed (default: shipped).")] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Rendered training pairs.")] = None,
    vae_steps: Annotated[Optional[int], typer.Option(help="VAE training steps.")] = None,
    unet_steps: Annotated[Optional[int], typer.Option(help="UNet training steps.")] = None,
) -> None:
    """Train the demo normals model (demo:tiny-marigold) on renders of the demo generator.

    With the defaults this reproduces pipeline/models/demo_weights/tiny-marigold (a few
    minutes on one CPU core); the shortened options are for trying things out.
    """
    import dataclasses
    import time

    import torch

    from pipeline.models.demo_training import TrainingConfig, train_demo_marigold

    changes = {k: v for k, v in dict(seed=seed, pairs=pairs, vae_steps=vae_steps,
                                     unet_steps=unet_steps).items() if v is not None}
    for key, value in changes.items():
        if key != "seed" and value < 1:
            _fail(f"--{key.replace('_', '-')}: must be at least 1, got {value}")
    cfg = dataclasses.replace(TrainingConfig(), **changes)
    # One thread: the layers are tiny, and the run is then deterministic on this machine.
    torch.set_num_threads(1)
    start = time.perf_counter()
    train_demo_marigold(out, cfg, log=typer.echo)
    typer.echo(f"{out}: demo normals model trained in {time.perf_counter() - start:.0f} s")


@app.command("distribute")
def distribute(
    targets: Annotated[
        Optional[list[str]],
        typer.Argument(help="Stage instances (DVC addresses, e.g. score@disc-1-0); default all."),
    ] = None,
    cluster: Annotated[
        str, typer.Option(help="local (processes here), slurm (dask-jobqueue) or tcp://HOST:PORT.")
    ] = "local",
    workers: Annotated[int, typer.Option(help="Local worker processes / SLURM jobs.")] = 2,
    remote: Annotated[
        Optional[str], typer.Option(help="DVC remote the workers share (default: the default).")
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per worker (local, slurm); 0: none.")] = 0,
    cores: Annotated[int, typer.Option(help="SLURM: cores per job.")] = 4,
    memory: Annotated[str, typer.Option(help="SLURM: memory per job.")] = "16GB",
    partition: Annotated[Optional[str], typer.Option(help="SLURM: partition (queue).")] = None,
    walltime: Annotated[str, typer.Option(help="SLURM: job walltime.")] = "04:00:00",
    scratch: Annotated[
        Optional[str], typer.Option(help="Folder on the workers for their clones.")
    ] = None,
    git_url: Annotated[
        Optional[str], typer.Option(help="Where workers clone from (default: this repository).")
    ] = None,
) -> None:
    """Run the out-of-date stage instances as Dask tasks, each in a worker's own clone."""
    from stages.distribute import ClusterOptions
    from stages.distribute import distribute as run_distributed

    options = ClusterOptions(cluster=cluster, workers=workers, gpus=gpus, cores=cores,
                             memory=memory, partition=partition, walltime=walltime,
                             scratch=scratch)
    try:
        outcome = run_distributed(Path.cwd(), options, targets or (), remote=remote,
                                  git_url=git_url)
    except CmdsAdError as err:
        _fail(str(err))
    if not outcome.ok:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
