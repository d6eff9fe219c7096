"""One stage instance in a worker's clone: the process that ``cmds-ad distribute`` starts.

    python -m scheduler.worker SPEC.json

SPEC names the clone, the instance's DVC address, the remote, and what its upstream instances
produced (their lock entries and their ``cache: false`` files, which no remote holds). The
process writes those into the clone, pulls the upstream outputs, runs ``dvc repro --pull
--single-item`` of the instance (DVC restores it from the run cache when the remote has it),
pushes the outputs and only then the run cache, and writes RESULT.json. It imports only DVC
and PyYAML: the stage code it runs is the clone's, through ``PYTHONPATH``.
"""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

LOCK_SCHEMA = "2.0"


def _die_with_parent() -> None:
    """SIGKILL this process when the Dask worker that started it dies (Linux), so a killed
    worker's attempt never reaches its push."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def read_lock(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not data:
        data = {"schema": LOCK_SCHEMA, "stages": {}}
    data.setdefault("stages", {})
    return data


def merge_lock_entries(root: Path, entries: list[dict]) -> None:
    """Write ``{"lockfile", "name", "entry"}`` records into the lock files under ``root``.
    ``entry`` is YAML text: a JSON round trip would turn integer keys (fit_mapper.steps)
    into strings, and DVC would see changed parameters."""
    by_file: dict[str, list[dict]] = {}
    for record in entries:
        by_file.setdefault(record["lockfile"], []).append(record)
    for lockfile, records in by_file.items():
        path = root / lockfile
        data = read_lock(path)
        for record in records:
            data["stages"][record["name"]] = yaml.safe_load(record["entry"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, path)


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write base64-encoded files (relative paths) under ``root``."""
    for rel, b64 in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(b64))


def read_files(root: Path, rels: list[str]) -> dict[str, str]:
    """The files at ``rels`` (files, or every file below a folder) as base64."""
    files: dict[str, str] = {}
    for rel in rels:
        path = root / rel
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in paths:
            if p.is_file():
                files[p.relative_to(root).as_posix()] = base64.b64encode(p.read_bytes()).decode()
    return files


class _StageLog(logging.Handler):
    """Prints DVC's messages and notes whether the stage ran or came from the run cache."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ran = False
        self.restored = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.ran |= message.startswith("Running stage")
        self.restored |= "is cached - skipping run" in message
        print(message, flush=True)


def push_run_cache(repo, addr: str, remote: str) -> None:
    """Push the instance's run-cache entries and, before them, the objects of its
    ``cache: false`` outputs, which `dvc push --run-cache` leaves behind (DVC 3.67): without
    them another machine cannot restore the instance (fit_mapper's loss CSV, evaluate's
    metrics) and would compute it again."""
    from dvc.stage.cache import _get_stage_hash

    (stage,) = repo.stage.collect(addr)
    key = _get_stage_hash(stage)
    folder = Path(repo.stage_cache._get_cache_dir(key))
    entries = [(key, value.name) for value in sorted(folder.iterdir())] if folder.is_dir() else []
    for _odb, objs in repo.stage_cache.get_used_objs(entries).items():
        repo.cloud.push(objs, remote=remote)
    repo.stage_cache.push(remote)


def _listen_to_dvc() -> _StageLog:
    """Capture DVC's log lines: they say whether the instance ran or came from a cache."""
    handler = _StageLog()
    dvc_logger = logging.getLogger("dvc")
    dvc_logger.addHandler(handler)
    dvc_logger.setLevel(logging.INFO)
    dvc_logger.propagate = False
    return handler


def _use_remote(clone: Path, spec: dict[str, Any]) -> None:
    """The clone's local DVC config: the shared remote, and the cache folder if one is given."""
    from dvc.repo import Repo

    repo = Repo(str(clone))
    with repo.config.edit("local") as conf:
        conf["remote"][spec["remote"]] = spec["remote_config"]
        conf["core"]["remote"] = spec["remote"]
        if spec.get("cache_dir"):
            conf["cache"]["dir"] = spec["cache_dir"]
    repo.close()


def _fetch_inputs(clone: Path, spec: dict[str, Any]) -> Any:
    """What the upstream instances produced: their lock entries (so DVC knows the hashes of this
    instance's inputs), their uncached outputs (metrics, plots: in no remote) and, pulled from
    the remote, their cached outputs. Returns the open DVC repo."""
    from dvc.repo import Repo

    merge_lock_entries(clone, [p["lock"] for p in spec["parents"] if p.get("lock")])
    for parent in spec["parents"]:
        write_files(clone, parent.get("uncached", {}))
    repo = Repo(str(clone))
    pulls = [p["addr"] for p in spec["parents"] if p.get("pull", True)]
    if pulls:
        repo.pull(targets=pulls, remote=spec["remote"], force=True)
    return repo


def _reproduce(repo: Any, clone: Path, spec: dict[str, Any]) -> None:
    # Stage commands import the clone's code (the commit's), not the worker's installation.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(clone)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    # this process runs DVC in-process: the stage's orphan check watches it as its dvc
    os.environ["CMDS_AD_DVC_PID"] = str(os.getpid())
    repo.reproduce(spec["addr"], single_item=True, pull=True)


def _push(repo: Any, spec: dict[str, Any]) -> None:
    # Outputs first, the run cache after: a worker killed in between leaves objects the
    # remote holds but no run-cache entry or lock that points at them.
    repo.push(targets=[spec["addr"]], remote=spec["remote"])
    push_run_cache(repo, spec["addr"], spec["remote"])


def main(spec_path: str) -> int:
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    clone = Path(spec["clone"])
    timings: dict[str, float] = {}
    handler = _listen_to_dvc()
    # 1. The clone, its remote and the instance's inputs (DVC resolves addresses against the
    # working directory).
    os.chdir(clone)
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    start = time.perf_counter()
    _use_remote(clone, spec)
    repo = _fetch_inputs(clone, spec)
    timings["pull_s"] = time.perf_counter() - start
    # 2. The instance itself.
    start = time.perf_counter()
    _reproduce(repo, clone, spec)
    timings["repro_s"] = time.perf_counter() - start
    # 3. Its outputs to the remote, if it computed them.
    start = time.perf_counter()
    if handler.ran:
        _push(repo, spec)
    timings["push_s"] = time.perf_counter() - start
    repo.close()
    # 4. The result the scheduler merges into the workspace.
    lock = read_lock(clone / spec["lockfile"])["stages"].get(spec["name"])
    if lock is None:
        print(f"error: {spec['lockfile']} has no entry {spec['name']} after the run", flush=True)
        return 1
    result = {
        "addr": spec["addr"],
        "lock": {"lockfile": spec["lockfile"], "name": spec["name"],
                 "entry": yaml.safe_dump(lock, sort_keys=False)},
        "uncached": read_files(clone, spec["uncached"]),
        "computed": handler.ran,
        "restored": handler.restored,
        **timings,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except Exception as err:  # noqa: BLE001 - one readable line for the orchestrator's log tail
        print(f"error: {type(err).__name__}: {err}", flush=True)
        sys.exit(1)
