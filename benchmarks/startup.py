"""The fixed cost of a stage instance: interpreter start and imports, DVC, model loading, work.

    python benchmarks/startup.py                   # builds a demo project (one category, k = 1)
    python benchmarks/startup.py --keep DIR        # ... in DIR, kept (later: --project DIR)
    python benchmarks/startup.py --project DIR     # a finished project (`dvc repro` has run)
    python benchmarks/startup.py --stages score,augment --repeats 3 --json FILE

For one instance of every stage (the first of each stage in DVC's index) it measures,
``--repeats`` times (default 3; figures are medians):

(a) ``python -X importtime -c 'import stages.<module>'``: the import of the stage's module,
    and its top 10 importers by cumulative time (a third-party package summed over its
    outermost imports; a module of ours by itself, so ours that pull heavy packages show);
(b) the stage's command from the DVC file, run directly in the project with
    ``CMDS_AD_TIMINGS=1``, which makes ``stages/cli.py`` report (one line on stderr, outputs
    unchanged) the seconds of params validation, of the stage module's import, of ``run()``,
    the model loading that ``run()`` reports (``load_s``), and the process's age;
(c) ``dvc repro -f --single-item <instance>``, the same instance under DVC.

Columns (seconds): start + imports = (b)'s wall minus ``run()``: interpreter start, the
``cmds-ad`` entry point, params validation, the stage module's imports, exit (the import of
the stage module alone in brackets, as (b) measured it); model loading = ``load_s`` (the
diffusion pipelines' ``from_pretrained`` with the lazy imports of their classes, the backbone,
the mappers; stages that load no model report none); own work = ``run()`` minus model loading;
DVC = (c) - (b), taken as (c)'s wall minus the wall of its stage process (the hook's process
age, plus (b)'s exit), so that the stage's own variation does not enter it; total = their sum,
what the instance costs under ``dvc repro``.

With ``--warm`` every repeat also measures (b) and (c) through a warm server (``cmds-ad warm``,
stages/warm.py: the stage process forks from a server that has imported what the stages
import), in the same run, and prints both tables and the median fixed cost of a torch stage
instance (start + imports + model loading, and with DVC) without and with the server. Under
the server the process age is the forked child's, so the client's own start (about 0.1 s)
counts as DVC there.

(b) and (c) rewrite the instance's outputs with the same bytes (the stages are deterministic);
in a project of your own, commit first. Without ``--project`` a scratch project is made with
``tools.scratch_project.make_project`` (the demo preset, one category, k = 1) and finished
with ``dvc repro`` (a few minutes, printed), then measured. The load average is printed before
and after: the development machine is shared, so compare runs of one day.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.warm import SERVE, SERVER_ENV  # noqa: E402
from tools.scratch_project import REDUCED_DEMO, make_project, project_env  # noqa: E402

TIMINGS_PREFIX = "cmds-ad-timings "  # stages/cli.py's timing line
DEMO = {"fewshot.shots": [1]}
FIRST_PARTY = ("pipeline", "stages")
TORCH_STAGES = ("augment", "estimate_normals", "extract_features", "fit_mapper", "infer",
                "validation_streams")  # stage modules that import torch
BASELINES = {"python -c pass": [sys.executable, "-c", "pass"],
             "python -c 'import torch'": [sys.executable, "-c", "import torch"],
             "dvc --version": ["dvc", "--version"]}


@dataclass(frozen=True)
class Instance:
    stage: str  # e.g. "estimate_normals_generated"
    address: str  # what `dvc repro` takes, e.g. "upstream/dvc.yaml:prepare@disc"
    cmd: str
    wdir: Path
    module: str  # stages.<module>


def instances(project: Path, wanted: Sequence[str]) -> list[Instance]:
    """The first instance of every stage, in DVC's order, from both DVC files."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    found: dict[str, Instance] = {}
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            name = stage.name.split("@")[0]
            if not isinstance(stage, PipelineStage) or name in found:
                continue
            address = f"{os.path.relpath(stage.path, project)}:{stage.name}"
            words = shlex.split(stage.cmd)
            if words[0] != "cmds-ad":
                raise SystemExit(f"{address}: command {stage.cmd!r} is not cmds-ad")
            found[name] = Instance(name, address, stage.cmd, Path(stage.wdir),
                                   words[1].replace("-", "_"))
    unknown = sorted(set(wanted) - set(found))
    if unknown:
        raise SystemExit(f"--stages: no stage {unknown} in {project} (stages: {', '.join(found)})")
    return [found[name] for name in (wanted or found)]


def timed(args: Sequence[str] | str, cwd: Path, env: Mapping[str, str]) -> tuple[float, str]:
    """Wall seconds and output (stdout + stderr) of a command; a failure ends the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=dict(env), shell=isinstance(args, str),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{args} failed ({result.returncode}) in {cwd}:\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def hook_record(output: str, what: str) -> dict[str, Any]:
    """The stage process's timing line (the last one: DVC may print it among other output)."""
    lines = [line for line in output.splitlines() if line.startswith(TIMINGS_PREFIX)]
    if not lines:
        raise SystemExit(f"{what}: no '{TIMINGS_PREFIX.strip()}' line in its output (is "
                         "CMDS_AD_TIMINGS reaching stages/cli.py?)")
    return json.loads(lines[-1][len(TIMINGS_PREFIX):])


# ----------------------------------------------------------------------------- importtime
def parse_importtime(text: str) -> list[tuple[int, float, float, str]]:
    """``-X importtime`` lines as (depth, self s, cumulative s, module), in printed order
    (a module after the modules it imported)."""
    entries = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cumulative_us, name = line.split("|", 2)
        name = name[1:]  # one space after the bar, then two per level of nesting
        depth = (len(name) - len(name.lstrip(" "))) // 2
        self_us = head.split(":", 1)[1]
        entries.append((depth, int(self_us) / 1e6, int(cumulative_us) / 1e6, name.strip()))
    return entries


def with_packages(module: str) -> set[str]:
    """``a.b.c`` and the packages it is in: ``a.b``, ``a``."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def importer_key(module: str) -> str:
    """A module of ours by itself; a third-party module by its top-level package."""
    return module if module.split(".")[0] in FIRST_PARTY else module.split(".")[0]


def top_importers(entries: Sequence[tuple[int, float, float, str]], target: str,
                  n: int = 10) -> list[tuple[str, float]]:
    """Cumulative seconds per key, summed over its outermost imports (not those nested in an
    import of the same key); the target module and its packages left out."""
    parents = with_packages(target)
    totals: dict[str, float] = {}
    stack: list[tuple[int, str]] = []  # ancestors of the entry at hand
    for depth, _, cumulative, name in reversed(entries):  # parents before their children
        while stack and stack[-1][0] >= depth:
            stack.pop()
        key = importer_key(name)
        if key not in {k for _, k in stack} and name not in parents:
            totals[key] = totals.get(key, 0.0) + cumulative
        stack.append((depth, key))
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


def import_profile(module: str, env: Mapping[str, str]) -> tuple[float, list[tuple[str, float]]]:
    """(a): seconds to import stages.<module> (as importtime counts them) and its importers."""
    target = f"stages.{module}"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {target}"],
                            cwd=REPO, env=dict(env), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"import {target} failed:\n{result.stderr[-3000:]}")
    entries = parse_importtime(result.stderr)
    total = sum(c for d, _, c, name in entries if d == 0 and name in with_packages(target))
    return total, top_importers(entries, target)


# ------------------------------------------------------------------------------- measuring
def measure(inst: Instance, project: Path, env: Mapping[str, str],
            profile: bool = True) -> dict[str, Any]:
    """One repeat of (a) (unless not ``profile``), (b) and (c) for one instance, as the
    table's columns."""
    imports_s, importers = import_profile(inst.module, env) if profile else (0.0, [])
    direct_s, direct_out = timed(inst.cmd, inst.wdir, env)
    direct = hook_record(direct_out, inst.cmd)
    dvc_s, dvc_out = timed(["dvc", "repro", "-f", "--single-item", inst.address], project, env)
    if SERVER_ENV in env and "not using the warm server" in direct_out + dvc_out:
        raise SystemExit(f"{inst.address}: the warm server was not used (were sources "
                         f"changed during the run?):\n{direct_out[-2000:]}\n{dvc_out[-2000:]}")
    under_dvc = hook_record(dvc_out, f"dvc repro {inst.address}")
    if direct["process_s"] is not None and under_dvc["process_s"] is not None:
        exit_s = direct_s - direct["process_s"]
        dvc_cost = dvc_s - under_dvc["process_s"] - exit_s
    else:  # no process age (not Linux): the plain difference
        dvc_cost = dvc_s - direct_s
    return {
        "start_imports": direct_s - direct["run_s"], "stage_import": direct["import_s"],
        "params": direct["params_s"], "load": direct["load_s"],
        "work": direct["run_s"] - direct["load_s"], "dvc": dvc_cost, "direct": direct_s,
        "under_dvc": dvc_s, "importtime": imports_s, "importers": importers,
        "modules_imported_in_run": direct["modules_imported_in_run"],
    }


COLUMNS = ("start_imports", "stage_import", "params", "load", "work", "dvc", "direct",
           "under_dvc", "importtime", "modules_imported_in_run")


def medians(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The median of every column; the importers of the repeat with the median import time."""
    out: dict[str, Any] = {c: statistics.median(s[c] for s in samples) for c in COLUMNS}
    by_import = sorted(samples, key=lambda s: s["importtime"])
    out["importers"] = by_import[len(by_import) // 2]["importers"]
    out["total"] = out["start_imports"] + out["load"] + out["work"] + out["dvc"]
    return out


def baselines(env: Mapping[str, str], repeats: int) -> dict[str, float]:
    return {name: statistics.median(timed(args, REPO, env)[0] for _ in range(repeats))
            for name, args in BASELINES.items()}


# ------------------------------------------------------------------------------ reporting
def table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| stage (instance) | start + imports [import stages.<m>] | DVC | model loading "
             "| own work | total |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        label = f"{name} ({r['instance']})" if r["instance"] else name
        lines.append(f"| {label} | {r['start_imports']:.2f} "
                     f"[{r['stage_import']:.2f}] | {r['dvc']:.2f} | {r['load']:.2f} | "
                     f"{r['work']:.2f} | {r['total']:.2f} |")
    sums = {c: sum(r[c] for r in results.values())
            for c in ("start_imports", "dvc", "load", "work", "total")}
    lines.append(f"| **sum** | {sums['start_imports']:.2f} | {sums['dvc']:.2f} | "
                 f"{sums['load']:.2f} | {sums['work']:.2f} | {sums['total']:.2f} |")
    return lines


def importer_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = []
    for name, r in results.items():
        top = ", ".join(f"{key} {seconds:.2f}" for key, seconds in r["importers"])
        lines.append(f"- {name}: import stages.{r['module']} {r['importtime']:.2f} s "
                     f"(-X importtime); top: {top}")
    return lines


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------- main
def finished_project(dest: Path, reduced: bool, env: Mapping[str, str]) -> Path:
    """A scratch demo project (one category, k = 1), reproduced once."""
    overrides = {**(REDUCED_DEMO if reduced else {}), **DEMO}
    make_project(dest, overrides, categories=("disc",))
    print(f"project {dest}: dvc repro (building it) ...", flush=True)
    seconds, _ = timed(["dvc", "repro"], dest, env)
    print(f"  dvc repro {seconds:.1f} s", flush=True)
    return dest


@contextmanager
def warm_server(env: Mapping[str, str], project: Path) -> Iterator[dict[str, str]]:
    """The environment of a stage command through a warm server started with ``env`` (as
    `cmds-ad warm` starts one), after the server's imports (a first command waits for them)."""
    with tempfile.TemporaryDirectory(prefix="startup-warm-") as tmp:
        path = os.path.join(tmp, "server.sock")
        server = subprocess.Popen([sys.executable, "-P", "-c", SERVE, path], env=dict(env),
                                  start_new_session=True)
        try:
            while not os.path.exists(path) and server.poll() is None:
                time.sleep(0.05)
            warm = {**env, SERVER_ENV: path, "CMDS_AD_VERBOSE": "1"}
            seconds, out = timed(["cmds-ad", "validate-params"], project, warm)
            if "not using the warm server" in out:
                raise SystemExit(f"the warm server is not used: {out}")
            print(f"warm server ready after {seconds:.1f} s (its imports)", flush=True)
            yield warm
        finally:
            server.terminate()
            server.wait()


def fixed_cost(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The median fixed cost of the torch stages' instances, without and with DVC."""
    torch = [r for r in results.values() if r["module"] in TORCH_STAGES]
    if not torch:
        return "no torch stage measured"
    process = statistics.median(r["start_imports"] + r["load"] for r in torch)
    with_dvc = statistics.median(r["start_imports"] + r["load"] + r["dvc"] for r in torch)
    return (f"median fixed cost of a torch stage instance ({len(torch)} instances): start + "
            f"imports + model loading {process:.2f} s; with DVC {with_dvc:.2f} s")


def run(project: Path, wanted: Sequence[str], repeats: int, json_out: Path | None,
        warm: bool = False) -> None:
    env = {**project_env(), "CMDS_AD_TIMINGS": "1"}
    env.pop(SERVER_ENV, None)
    before = load_average()
    print(f"load average before: {before}", flush=True)
    base = baselines(env, repeats)
    chosen = instances(project, wanted)
    samples: dict[str, list[dict[str, Any]]] = {inst.stage: [] for inst in chosen}
    warm_samples: dict[str, list[dict[str, Any]]] = {inst.stage: [] for inst in chosen}
    with warm_server(env, project) if warm else nullcontext(None) as warm_env:
        for i in range(repeats):  # each repeat runs every stage once: load swings spread out
            for inst in chosen:
                samples[inst.stage].append(measure(inst, project, env))
                print(f"  #{i + 1} {inst.address}: direct {samples[inst.stage][-1]['direct']:.2f}"
                      f" s, dvc repro {samples[inst.stage][-1]['under_dvc']:.2f} s", flush=True)
                if warm_env is not None:
                    warm_samples[inst.stage].append(measure(inst, project, warm_env, False))
                    print(f"  #{i + 1} {inst.address} warm: direct "
                          f"{warm_samples[inst.stage][-1]['direct']:.2f} s, dvc repro "
                          f"{warm_samples[inst.stage][-1]['under_dvc']:.2f} s", flush=True)
    results = summarise(chosen, samples)
    after = load_average()
    lines = [f"Median of {repeats} runs per figure, seconds; load average {before} before, "
             f"{after} after.", "", "Baselines: " + ", ".join(
                 f"{k} {v:.2f} s" for k, v in base.items()), ""] + table(results)
    lines += ["", fixed_cost(results)]
    warm_results = summarise(chosen, warm_samples) if warm else {}
    if warm:
        lines += ["", "With the warm server (cmds-ad warm), same run:", ""]
        lines += table(warm_results) + ["", fixed_cost(warm_results)]
    lines += ["", "Top importers (cumulative seconds under -X importtime):"]
    print("\n".join(lines + importer_lines(results)))
    if json_out is not None:
        json_out.write_text(json.dumps({"load_average": [before, after], "baselines": base,
                                        "repeats": repeats, "stages": results,
                                        "warm": warm_results}, indent=1))


def summarise(chosen: Sequence[Instance],
              samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {inst.stage: {**medians(samples[inst.stage]), "module": inst.module,
                         "instance": inst.address.split("@")[1] if "@" in inst.address else "",
                         "address": inst.address} for inst in chosen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a finished project (dvc repro done)")
    parser.add_argument("--keep", type=Path, help="build the demo project here and keep it")
    parser.add_argument("--reduced", action="store_true",
                        help="the tests' reduced demo budgets for the built project")
    parser.add_argument("--stages", default="", help="comma-separated stage names (default all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--warm", action="store_true",
                        help="also measure through a warm server (cmds-ad warm), same run")
    args = parser.parse_args()
    wanted = [s for s in args.stages.split(",") if s]
    if args.project is not None:
        run(args.project.resolve(), wanted, args.repeats, args.json, args.warm)
        return 0
    env = project_env()
    if args.keep is not None:
        if args.keep.exists():
            parser.error(f"--keep {args.keep}: exists; give a new folder (or --project it)")
        run(finished_project(args.keep.resolve(), args.reduced, env), wanted, args.repeats,
            args.json, args.warm)
        return 0
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        run(finished_project(Path(tmp) / "project", args.reduced, env), wanted, args.repeats,
            args.json, args.warm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
