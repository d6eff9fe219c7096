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

from pipeline.errors import CmdsAdError

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
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    eyecandies: Annotated[
        Optional[Path], typer.Option(help="Also write one category in the Eyecandies layout here.")
    ] = None,
) -> None:
    """Generate the embedded demo dataset (synthetic objects with 2D, 3D and mixed defects)."""
    from pipeline.data.demo import write_demo_dataset, write_demo_eyecandies

    try:
        write_demo_dataset(out, seed=seed)
        if eyecandies is not None:
            write_demo_eyecandies(eyecandies, seed=seed)
    except CmdsAdError as err:
        _fail(str(err))


@app.command("metrics")
def metrics(
    file: Annotated[Path, typer.Argument(help="NPZ with anomaly_maps, gt, labels [, scores].")],
    aupro_thresholds: Annotated[
        Optional[int], typer.Option(help="Published approximation with N thresholds (99/100).")
    ] = None,
) -> None:
    """Compute I-AUROC, P-AUROC and AUPRO of anomaly maps stored in an NPZ file; print JSON."""
    from stages.evaluate import metrics_command

    try:
        metrics_command(file, aupro_thresholds)
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


@app.command("sweep-lambda")
def sweep_lambda(
    values: Annotated[str, typer.Option(help="Comma-separated weights.")] = "0,0.05,0.1,0.2,0.5,1",
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results/sensitivity"),
) -> None:
    """Sweep the estimated-stream weight with `dvc exp run` (only score/evaluate re-run); plot."""
    from stages.sensitivity import run_sweep

    try:
        weights = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        _fail(f"--values: not a comma-separated list of numbers: {values!r}")
    try:
        run_sweep(weights, params, out)
    except CmdsAdError as err:
        _fail(str(err))


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
