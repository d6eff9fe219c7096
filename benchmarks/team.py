"""Team sharing and experiments on the reduced demo (``disc``, k = 1, REDUCED_DEMO budgets, the
demo's 10 train and 24 test images) in a clone of this repository: the figures of README
"Common tasks".

    python benchmarks/team.py              # sharing and a queued grid
    python benchmarks/team.py --data-ways  # also: one queued experiment with the data made by
                                           # the demo_data stage, at an absolute data.root,
                                           # and tracked with `dvc add`

Prints the first `dvc repro` (stage instances, seconds), `dvc push --run-cache`, a teammate's
`dvc pull` + no-op `dvc repro` in a fresh clone, `dvc repro --pull` in another fresh clone (its
exit status), one queued grid of three lambdas (`cmds-ad sweep ... --jobs J`) and the
`dvc exp show --only-changed` table of its experiments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tools.scratch_project import (
    REDUCED_DEMO,
    make_project,
    project_env,
    sh,
    stages_run,
    write_params,
)

TABLE = ["dvc", "exp", "show", "--only-changed", "--drop", r"(?!Experiment|k[0-9]|score\.)"]


def timed(args: list[str], cwd: Path, check: bool = True) -> tuple[float, str, int]:
    start = time.perf_counter()
    done = sh(args, cwd, check=check)
    return time.perf_counter() - start, done.stdout + done.stderr, done.returncode


def sharing(project: Path, tmp: Path, jobs: int) -> None:
    seconds, out, _ = timed(["dvc", "repro"], project)
    print(f"first dvc repro:                      {seconds:7.1f} s ({len(stages_run(out))} "
          "stage instances, the demo data's included)")
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-q", "-m", "run"], project)
    sh(["dvc", "remote", "add", "-d", "team", str(tmp / "remote")], project)
    sh(["git", "commit", "-q", "-am", "remote"], project)
    seconds, _, _ = timed(["dvc", "push", "--run-cache"], project)
    print(f"dvc push --run-cache:                 {seconds:7.1f} s")

    mate = tmp / "teammate"
    sh(["git", "clone", "-q", str(project), str(mate)], tmp)
    pull, _, _ = timed(["dvc", "pull"], mate)
    noop, out, _ = timed(["dvc", "repro"], mate)
    assert not stages_run(out), out
    print(f"teammate: dvc pull + no-op dvc repro: {pull + noop:7.1f} s "
          f"(pull {pull:.1f} s, repro {noop:.1f} s, nothing ran)")
    other = tmp / "other"
    sh(["git", "clone", "-q", str(project), str(other)], tmp)
    seconds, out, rc = timed(["dvc", "repro", "--pull"], other, check=False)
    print(f"fresh clone: dvc repro --pull:        {seconds:7.1f} s (exit {rc}, "
          f"{len(stages_run(out))} stage instances ran)")

    grid = "score.lambda_1=0.05,0.15,0.2"
    seconds, out, rc = timed(["cmds-ad", "sweep", "-S", grid, "--jobs", str(jobs)], project,
                             check=False)
    print(f"queued grid of three ({grid}, --jobs {jobs}): {seconds:.1f} s (exit {rc})")
    print("$ " + " ".join(TABLE[:5]) + f" '{TABLE[5]}'")
    print(sh(TABLE, project).stdout)


def one_queued(project: Path, value: float) -> float:
    seconds, out, rc = timed(["cmds-ad", "sweep", "-S", f"score.lambda_1={value}"], project,
                             check=False)
    assert rc == 0, out[-3000:]
    return seconds


def data_ways(project: Path, tmp: Path) -> None:
    """One queued lambda experiment with the data made by the stage, at an absolute data.root,
    and tracked by `dvc add` (each after a `dvc repro` of the change, committed)."""
    print(f"one queued experiment, data by the demo_data stage: {one_queued(project, 0.3):.1f} s")

    external = tmp / "datasets" / "demo"
    shutil.copytree(project / "data/demo", external)  # the same bytes outside the project
    write_params(project, {"data.root": str(external), "demo_data.categories": []})
    sh(["dvc", "repro"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-q", "-m", "absolute data.root"], project)
    status, _, _ = timed(["dvc", "status"], project)
    size = sum(p.stat().st_size for p in external.rglob("*") if p.is_file()) / 2**20
    print(f"absolute data.root ({size:.1f} MiB outside the project): dvc status {status:.2f} s; "
          f"one queued experiment {one_queued(project, 0.35):.1f} s")

    shutil.copytree(external, project / "data/mvtec")
    added, _, _ = timed(["dvc", "add", "data/mvtec"], project)
    write_params(project, {"data.root": "data/mvtec"})
    sh(["dvc", "repro"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-q", "-m", "dvc add"], project)
    print(f"dvc add data/mvtec: {added:.1f} s; one queued experiment "
          f"{one_queued(project, 0.4):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="queue workers for the grid")
    parser.add_argument("--data-ways", action="store_true")
    args = parser.parse_args()
    os.environ.update(project_env())
    print(f"reduced demo: disc, k = 1; {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        project = make_project(tmp / "cmds-ad", REDUCED_DEMO, make_data=False)
        sharing(project, tmp, args.jobs)
        if args.data_ways:
            data_ways(project, tmp)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
