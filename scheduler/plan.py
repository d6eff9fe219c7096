"""Which DVC stage instances ``cmds-ad distribute`` runs: DVC's graph of the targets and their
upstream, what ``dvc status`` reports changed plus everything downstream of it, the remote the
workers exchange outputs through, and the records of up-to-date upstream instances."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scheduler.settings import SETTINGS_FILE, DistributeError

# stage names (before "@") whose commands run a model: one GPU each where the cluster has GPUs
MODEL_STAGES = frozenset({
    "augment", "estimate_normals", "estimate_normals_generated", "extract_features",
    "extract_features_generated", "fit_mapper", "infer", "validation_streams",
})


@dataclass(frozen=True)
class Instance:
    addr: str                 # DVC address, e.g. upstream/dvc.yaml:fit_mapper@disc-1-0
    name: str                 # its key in the lock file, e.g. fit_mapper@disc-1-0
    lockfile: str             # its lock file, relative to the repository root
    pipeline: bool            # False for a .dvc file (a data source: pulled, never run)
    parents: tuple[str, ...]  # addresses of the instances that produce its dependencies
    uncached: tuple[str, ...] # its `cache: false` outputs (metrics, plots), relative paths
    model: bool               # runs a model: asks for a GPU where there are GPUs

    @property
    def stage(self) -> str:
        return self.name.split("@", 1)[0]


@dataclass
class Plan:
    root: Path
    commit: str
    instances: dict[str, Instance]
    to_run: list[str]            # in dependency order
    output_paths: list[str] = field(default_factory=list)



def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise DistributeError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result.stdout


def _rel(root: Path, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def plan(root: Path, targets: Sequence[str] = ()) -> Plan:
    """The instances of ``targets`` (default: all) with their upstream, and those to run:
    what ``dvc status`` reports changed plus everything downstream of it."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    root = root.resolve()
    commit = _git(root, "rev-parse", "HEAD").strip()
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        if targets:
            selected = set()
            for target in targets:
                try:
                    stages = repo.stage.collect(target, with_deps=True)
                except Exception as err:  # noqa: BLE001 - DVC's own message names the target
                    raise DistributeError(f"unknown target {target!r}: {err}") from None
                selected.update(stages)
        else:
            selected = set(graph.nodes)
        # the upstream of the selection is needed too (dvc repro would run it)
        for stage in list(selected):
            selected.update(nx.descendants(graph, stage))
        sub = graph.subgraph(selected)
        instances: dict[str, Instance] = {}
        outputs: list[str] = []
        for stage in sub.nodes:
            pipeline = isinstance(stage, PipelineStage)
            lockfile = (Path(stage.dvcfile.relpath).parent / "dvc.lock").as_posix() if pipeline else ""
            instances[stage.addressing] = Instance(
                addr=stage.addressing,
                name=stage.name if pipeline else stage.addressing,
                lockfile=lockfile,
                pipeline=pipeline,
                parents=tuple(sorted(p.addressing for p in sub.successors(stage))),
                uncached=tuple(sorted(_rel(root, o.fs_path) for o in stage.outs if not o.use_cache)),
                model=pipeline and stage.name.split("@", 1)[0] in MODEL_STAGES,
            )
            outputs += [_rel(root, o.fs_path) for o in stage.outs]
        status = repo.status(targets=[s.addressing for s in sub.nodes]) if sub.nodes else {}
        changed = {s for s in sub.nodes if s.addressing in status and isinstance(s, PipelineStage)}
        to_run = set(changed)
        for stage in changed:
            to_run.update(nx.ancestors(sub, stage))  # ancestors = downstream here
        order = [s.addressing for s in nx.topological_sort(sub.reverse()) if s in to_run]
        # data sources (.dvc files) that are not up to date cannot be run by anyone
        missing = [s.addressing for s in sub.nodes
                   if s.addressing in status and not isinstance(s, PipelineStage)]
        if missing:
            raise DistributeError(
                f"{', '.join(missing)}: data not in the workspace; `dvc pull` or `dvc add` first"
            )
    return Plan(root, commit, instances, order, sorted(set(outputs)))


def check_clean(root: Path, output_paths: Sequence[str]) -> None:
    """Workers run the commit: refuse uncommitted changes other than DVC's own files."""
    lines = _git(root, "status", "--porcelain", "--untracked-files=all").splitlines()
    dirty = []
    for line in lines:
        path = line[3:].split(" -> ")[-1].strip('"')
        name = Path(path).name
        # DVC's own files, and the settings no worker reads
        if name in ("dvc.lock", ".gitignore") or path.startswith(".dvc/") or \
                path == SETTINGS_FILE:
            continue
        if any(path == out or path.startswith(out.rstrip("/") + "/") for out in output_paths):
            continue
        dirty.append(path)
    if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise DistributeError(
            f"uncommitted changes ({shown}): the workers run commit {_git(root, 'rev-parse', '--short', 'HEAD').strip()}, "
            "not your working copy; commit (or stash) them first"
        )


def resolve_remote(root: Path, name: str | None) -> tuple[str, dict]:
    """The remote's name and its configuration, with a local path made absolute."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remotes = repo.config["remote"]
        name = name or repo.config["core"].get("remote")
        if not name:
            raise DistributeError(
                "no DVC remote configured: workers exchange results through one; "
                "`dvc remote add -d NAME URL` (a path or URL every worker can reach) "
                "or pass --remote NAME"
            )
        if name not in remotes:
            raise DistributeError(
                f"DVC remote {name!r} is not configured (known: {', '.join(remotes) or 'none'})"
            )
        config = {k: v for k, v in dict(remotes[name]).items() if v is not None}
    url = str(config["url"])
    if "://" not in url and not os.path.isabs(url):
        config["url"] = str((root / ".dvc" / url).resolve())
    return name, {k: (str(v) if not isinstance(v, (bool, int, float)) else v)
                  for k, v in config.items()}


def local_record(root: Path, inst: Instance) -> dict:
    """What an up-to-date local instance gives its downstream tasks (as a task would)."""
    from scheduler.worker import read_files, read_lock

    record = {"addr": inst.addr, "pull": True}
    if inst.pipeline:
        entry = read_lock(root / inst.lockfile)["stages"].get(inst.name)
        record["lock"] = {"lockfile": inst.lockfile, "name": inst.name,
                          "entry": yaml.safe_dump(entry, sort_keys=False)}
        record["uncached"] = read_files(root, list(inst.uncached))
    return record
