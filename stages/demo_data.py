"""Stage ``demo_data``: the embedded synthetic dataset, one category per stage instance.

    cmds-ad demo-data data/demo --category disc --n-train 10 --n-test 24 --seed 0

Writes ``data/demo/<category>`` (the MVTec 3D-AD layout), atomically: built in a dot-named
temporary sibling (ignored by DVC) and renamed into place. The generator is deterministic, so
the output's hash is the same on every machine and DVC restores it from its cache like any
other output (in a teammate's clone, in the temporary workspaces of queued experiments).
``upstream/dvc.yaml`` runs one instance per entry of ``demo_data.categories``; the presets for
real datasets list none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.artifacts import atomic_dir
from pipeline.data.demo import write_demo_category
from pipeline.progress import info


def write(out: Path, categories: Sequence[str], seed: int, n_train: int, n_test: int) -> None:
    """Write each category to ``out/<category>``; an existing folder is replaced whole."""
    for category in categories:
        with atomic_dir(out / category) as tmp:
            write_demo_category(tmp, category, seed=seed, n_train=n_train, n_test=n_test)
        info(f"wrote {out / category} ({n_train} train, {n_test} test images)")
