"""Pipeline costs: full `dvc repro`, re-score after a fusion-weight change, no-op repro.

Runs in a clone of this repository (tools/scratch_project.py; the working copy is untouched);
the full `dvc repro` includes the demo_data stage, as `make demo` does.

    python benchmarks/dvc_pipeline.py            # the full demo (3 categories, k = 1, 2, 4)
    python benchmarks/dvc_pipeline.py --quick    # one category, k = 1
    python benchmarks/dvc_pipeline.py --noop-in PROJECT   # only the no-op figures, in a
                                                 # project that has run (median of 5)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tools.scratch_project import make_project, sh, stages_run, write_params


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = sh(args, cwd).stdout
    return time.perf_counter() - start, out


def one_stage_noop(root: Path) -> float:
    """No-op `dvc repro` of a one-stage project: DVC's start-up plus opening a repo."""
    root.mkdir()
    sh(["git", "init", "-q", "-b", "main"], root)
    sh(["dvc", "init", "-q"], root)
    (root / "dvc.yaml").write_text("stages:\n  one:\n    cmd: echo done > out.txt\n"
                                   "    outs:\n      - out.txt\n")
    sh(["dvc", "repro"], root)
    return timed(["dvc", "repro"], root)[0]


def noop_figures(project: Path, repeats: int = 5) -> None:
    """No-op `dvc repro` beside DVC's start-up, in a project whose pipeline has run."""
    noops, versions = [], []
    for _ in range(repeats):
        seconds, out = timed(["dvc", "repro"], project)
        assert not stages_run(out), out
        noops.append(seconds)
        versions.append(timed(["dvc", "--version"], project)[0])
    n_stages = len(sh(["dvc", "stage", "list", "--all", "--name-only"], project).stdout.split())
    print(f"no-op dvc repro:                {statistics.median(noops):8.2f} s  "
          f"({n_stages} stage instances, median of {repeats})")
    print(f"dvc --version (DVC start-up):   {statistics.median(versions):8.2f} s  "
          f"(median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one category, k = 1")
    parser.add_argument("--noop-in", type=Path, help="only time no-op repro in this project")
    args = parser.parse_args()
    if args.noop_in is not None:
        noop_figures(args.noop_in)
        return
    categories = ("disc",) if args.quick else ("disc", "dome", "slab")
    overrides = {"fewshot.shots": [1]} if args.quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "p", overrides, categories=categories,
                               make_data=False)
        full, out = timed(["dvc", "repro"], project)
        n_full = len(stages_run(out))
        # Two fusion-weight changes (new values each time, so DVC's run cache cannot restore
        # them); the machine is shared, so one timing alone is noisy.
        rescores = []
        for value in (0.2, 0.3):
            write_params(project, {"score.lambda_1": value, "score.lambda_2": value})
            seconds, out = timed(["dvc", "repro"], project)
            rescores.append(seconds)
            rescored = sorted(stages_run(out))
        rescore = sum(rescores) / len(rescores)
        noop, out = timed(["dvc", "repro"], project)
        assert not stages_run(out), out
        version, _ = timed(["dvc", "--version"], project)
        minimal = one_stage_noop(Path(tmp) / "minimal")
        n_stages = len(sh(["dvc", "stage", "list", "--all", "--name-only"], project).stdout.split())
        print(f"categories: {', '.join(categories)}")
        print(f"full dvc repro:                 {full:8.1f} s  ({n_full} stage instances)")
        print(f"re-score after lambda change:   {rescore:8.1f} s  (mean of "
              f"{', '.join(f'{r:.1f}' for r in rescores)} s; {len(rescored)} instances: "
              f"{', '.join(sorted({s.split('@')[0] for s in rescored}))})")
        print(f"re-score / full:                {100 * rescore / full:8.1f} %")
        print(f"no-op dvc repro:                {noop:8.2f} s  ({n_stages} stage instances)")
        print(f"no-op dvc repro, 1-stage repo:  {minimal:8.2f} s")
        print(f"dvc --version (DVC start-up):   {version:8.2f} s")
        print(f"no-op cost per stage instance:  {(noop - minimal) / max(n_stages - 1, 1):8.3f} s")


if __name__ == "__main__":
    main()
