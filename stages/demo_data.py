"""Stage ``demo_data``: the embedded synthetic dataset, one category per stage instance.

    cmds-ad demo-data data/demo --category disc --n-train 10 --n-test 24 --seed 0

Writes ``data/demo/<category>`` (the MVTec 3D-AD layout; ``--layout folder``: the layout of
``data.dataset: folder``, depth images and intrinsics), atomically: built in a dot-named
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
from pipeline.data.demo import write_demo_category, write_demo_eyecandies
from pipeline.errors import InputError
from pipeline.outputs import check_out_folder, mark
from pipeline.params import data_root_of
from pipeline.progress import info

COMMAND = "demo-data"


def _above_data_root() -> tuple[str, Path | None]:
    """The demo data may be (in) the configured data root, never the folder above it."""
    root = data_root_of()
    return "the folder of the data root", None if root is None else root.parent


def write(out: Path, categories: Sequence[str], seed: int, n_train: int, n_test: int,
          eyecandies: Path | None = None, force: bool = False, layout: str = "mvtec3d") -> None:
    """Write each category to ``out/<category>`` (and one in the Eyecandies layout to
    ``eyecandies``), replacing only folders this command wrote, or any with ``force``; every
    folder is checked before anything is written."""
    protected = [_above_data_root()]
    for category in categories:
        check_out_folder(out / category, COMMAND, force, protected)
    if eyecandies is not None:
        check_out_folder(eyecandies, COMMAND, force, [*protected, ("the --out folder", out)])
        if out.resolve() in eyecandies.resolve().parents:
            raise InputError(f"--eyecandies {eyecandies}: inside the output folder {out}")
    for category in categories:
        with atomic_dir(out / category) as tmp:
            write_demo_category(tmp, category, seed=seed, n_train=n_train, n_test=n_test,
                                layout=layout)
            mark(tmp, COMMAND)
        info(f"wrote {out / category} ({n_train} train, {n_test} test images)")
    if eyecandies is not None:
        with atomic_dir(eyecandies) as tmp:
            write_demo_eyecandies(tmp, seed=seed)
            mark(tmp, COMMAND)
