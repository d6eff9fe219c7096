"""``cmds-ad sweep``: DVC's queued experiments, with an exit status that says whether they ran.

    cmds-ad sweep -S 'score.lambda_1=0.05,0.1,0.2' --jobs 2

is ``dvc exp run --queue -S ...`` (DVC expands a comma list into one experiment per value, and
several such ``-S`` into their grid), then ``dvc exp run --run-all --jobs N`` (DVC's workers
run every queued experiment in a temporary workspace, upstream stages restored from the cache),
then a look at ``dvc exp show --json``: the command exits non-zero naming every experiment it
queued that failed. ``dvc exp run --run-all`` and ``dvc queue start`` exit 0 whatever happened
to the experiments (DVC 3.67). Everything else is DVC's: the experiments, their metrics and
their comparison (``dvc exp show``) are DVC experiments like any other.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import InputError
from pipeline.progress import info

QUEUED = re.compile(r"^Queued experiment '([^']+)' for future execution\.$", re.MULTILINE)


class SweepFailed(InputError):
    """Experiments of the sweep failed (the message names them)."""


@dataclass(frozen=True)
class Experiment:
    name: str
    params: dict   # params.yaml as the experiment ran it
    metrics: dict  # metrics file path -> its data


def _dvc(args: Sequence[str], capture: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", *args], capture_output=capture, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "")[-2000:] if capture else ""
        raise InputError(f"`dvc {' '.join(args)}` failed ({done.returncode}) {tail}".rstrip())
    return done


def queue(overrides: Sequence[str]) -> list[str]:
    """Queue one ``dvc exp run`` with these ``-S`` overrides (a grid where values are comma
    lists); the names DVC gave the queued experiments."""
    args = ["exp", "run", "--queue"]
    for override in overrides:
        args += ["-S", override]
    out = _dvc(args).stdout
    names = QUEUED.findall(out)
    if not names:
        raise InputError(f"`dvc {' '.join(args)}` queued nothing that it named:\n{out[-2000:]}")
    for name in names:
        info(f"queued {name}")
    return names


def experiments() -> dict[str, Experiment]:
    """The experiments of the workspace's commit that ran, by name (``dvc exp show --json``);
    a failed one is left out."""
    rows = json.loads(_dvc(["exp", "show", "--json"]).stdout or "[]")
    found: dict[str, Experiment] = {}
    for baseline in rows:
        for exp in baseline.get("experiments") or ():
            for rev in exp.get("revs") or ():
                data = rev.get("data") or {}
                if rev.get("error") or not rev.get("name") or not data:
                    continue
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
                found[rev["name"]] = Experiment(rev["name"], params, metrics)
    return found


def run_queued(names: Sequence[str], jobs: int) -> dict[str, Experiment]:
    """Run the queue (``dvc exp run --run-all``, DVC's output on the terminal) and return the
    experiments ``names``; raise SweepFailed naming those that did not run to the end."""
    _dvc(["exp", "run", "--run-all", "--jobs", str(jobs)], capture=False)
    done = experiments()
    failed = [name for name in names if name not in done]
    if failed:
        raise SweepFailed(
            f"{len(failed)} of {len(names)} experiments failed: {', '.join(failed)} "
            f"(their logs: dvc queue logs {failed[0]}; drop them: dvc queue remove --failed)"
        )
    return {name: done[name] for name in names}


def sweep(override_sets: Sequence[Sequence[str]], jobs: int = 1) -> dict[str, Experiment]:
    """Queue one ``dvc exp run -S ...`` per set of overrides, run the queue with ``jobs``
    workers, and return the experiments by name (SweepFailed if any failed)."""
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1 (got {jobs})")
    names = [name for overrides in override_sets for name in queue(overrides)]
    return run_queued(names, jobs)
