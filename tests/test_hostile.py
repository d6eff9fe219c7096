"""The pipeline used as a hostile user would: bad params, bad data files, damaged stores, kills.

Every case must fail cleanly: a non-zero exit, one message that names the file or key, no Python
traceback, and nothing left behind (no artifact, no temporary). Every kill must be followed by a
`dvc repro` that completes with the same metrics.json as the uninterrupted run.

The module works on a copy of the session's reduced demo (tests/conftest.py: one category,
k = 1, a few steps, run once per session); each case restores what it changed, the kill cases
by re-running the killed stage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from tools.scratch_project import (
    copy_project,
    project_env,
    sh,
    stage_command,
    stages_run,
    write_params,
)
from tests.failures import assert_clean_failure, assert_one_line

pytestmark = pytest.mark.slow

KEY = "disc-1-0"
UPSTREAM = "upstream/dvc.yaml:"
METRICS = "results/evaluate/disc/k1-s0/metrics.json"
STREAMS = "artifacts/streams/disc/k1-s0.zarr"
SCORES = "artifacts/scores/disc/k1-s0.zarr"
TEST_STORE = "artifacts/prepare/disc/test.zarr"
FEATURES = "artifacts/features/disc/test.zarr"


@pytest.fixture(scope="module")
def project(reduced_demo, tmp_path_factory) -> Path:
    """The reduced demo, run and committed; a copy this module may change."""
    return copy_project(reduced_demo, tmp_path_factory.mktemp("hostile") / "project")


@pytest.fixture(scope="module")
def baseline(project) -> str:
    return (project / METRICS).read_text()


# ------------------------------------------------------------------------------ helpers

def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return sh(args, cwd, check=False)


def _ours(name: str) -> bool:
    """A temporary or lock file of the artifact code (pipeline/outputs.py)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name or name.endswith(".lock"))


def leftovers(root: Path, tops: tuple[str, ...] = ("artifacts", "results")) -> list[str]:
    """Temporaries and lock files of the artifact code (.tmp-, .old-, .lock) in the outputs."""
    found = []
    for top in tops:
        for path in (root / top).rglob("*") if (root / top).exists() else ():
            if _ours(path.name):
                found.append(str(path.relative_to(root)))
    return found


def digest(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def changed_stages(project: Path) -> set[str]:
    return set(json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}"))


# ------------------------------------------------------------------------------ params

def _set(dotted: str, value) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return edit


def _typo(section: str, key: str, wrong: str) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        raw[section][wrong] = raw[section].pop(key)
    return edit


PARAM_CASES = {
    "typo data key": (_typo("data", "plane_distance", "plane_distnace"),
                      ["data.plane_distnace", "unknown key", "plane_distance"]),
    "typo models key": (_typo("models", "backbone", "backbon"),
                        ["models.backbon", "unknown key", "backbone"]),
    "new section": (_set("scores", {"lambda_1": 0.2}), ["scores", "unknown key", "score"]),
    "zero steps": (_set("fit_mapper.steps", {1: 0}), ["fit_mapper.steps", "k=1", ">= 1"]),
    "negative steps": (_set("fit_mapper.steps", {1: -4}), ["fit_mapper.steps", "(got -4)"]),
    "steps missing for k": (_set("fit_mapper.steps", {2: 10}),
                            ["fit_mapper.steps", "no step count for k=1"]),
    "duplicate categories": (_set("data.categories", ["disc", "disc"]),
                             ["data.categories", "'disc' listed more than once"]),
    "duplicate shots": (_set("fewshot.shots", [1, 1]), ["fewshot.shots", "1 listed more than once"]),
    "duplicate seeds": (_set("fewshot.seeds", [0, 0]), ["fewshot.seeds"]),
    "duplicate limits": (_set("evaluate.limits", [0.3, 0.3]), ["evaluate.limits"]),
    "bad fusion": (_set("score.fusion", "mean"), ["score.fusion", "'product', 'sum' or 'max'"]),
    "nan weight": (_set("score.lambda_1", float("nan")), ["score.lambda_1", "finite"]),
    "string for int": (_set("data.size", "big"), ["data.size", "'big'"]),
    "unknown category": (_set("data.categories", ["disk"]), ["data.categories", "'disk'", "bagel"]),
    # issue 22: refused by the validator, before any stage
    "category is a path": (_set("data.categories", ["../../data/demo/disc"]),
                           ["data.categories", "'../../data/demo/disc' is not a plain name"]),
    "float shots": (_set("fewshot.shots", [1.0]),
                    ["fewshot.shots.0", "valid integer", "(got 1.0)"]),
    "bool shots": (_set("fewshot.shots", [True]),
                   ["fewshot.shots.0", "valid integer", "(got True)"]),
    "even box": (_set("score.box_sizes", [4, 4]), ["score.box_sizes", "odd and positive"]),
    "project as checkpoints": (_set("fit_mapper.checkpoints", "."),
                               ["fit_mapper.checkpoints", "'.' is the project folder"]),
    "lr_min above lr": (_set("fit_mapper.lr_min", 1.0), ["fit_mapper.lr_min", "above"]),
    "huge size": (_set("data.size", 100000),
                  ["data.size: 100000 needs at least", "is available here, so at most"]),
    "huge thresholds": (_set("evaluate.aupro_thresholds", [100000000]),
                        ["evaluate.aupro_thresholds: 100000000 is above 1000000"]),
    "huge n_per_shot": (_set("augment.n_per_shot", 1000000),
                        ["augment.n_per_shot: 1000000 needs at least", "so at most"]),
}


@pytest.fixture
def params_file(project):
    """Yield a function that edits the project's params.yaml; the file is restored after."""
    path = project / "params.yaml"
    original = path.read_text()

    def edit(change: Callable[[dict], None]) -> None:
        raw = yaml.safe_load(original)
        change(raw)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))

    yield edit
    path.write_text(original)


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_params_mistake_is_named(project, params_file, case):
    change, names = PARAM_CASES[case]
    params_file(change)
    before = digest(project / "artifacts/params.valid")
    start = time.perf_counter()
    result = run(["cmds-ad", "validate-params"], project)
    assert_one_line(result, "params.yaml", *names)
    assert time.perf_counter() - start < 30  # a process start; no value is expanded or run
    assert digest(project / "artifacts/params.valid") == before
    assert leftovers(project) == []


@pytest.mark.parametrize("case", ["typo data key", "new section", "duplicate categories",
                                  "zero steps", "float shots", "bool shots", "even box",
                                  "huge size", "huge thresholds", "huge n_per_shot"])
def test_params_mistake_stops_dvc_repro_before_any_stage(project, params_file, case):
    change, names = PARAM_CASES[case]
    params_file(change)
    result = run(["dvc", "repro"], project)
    assert_clean_failure(result, *names)
    assert stages_run(result.stdout) <= {"validate_params"}
    assert not (project / "artifacts/params.valid").exists()  # nothing downstream can run
    assert leftovers(project) == []


def test_valid_params_change_runs_validation_only_once(project, params_file):
    # restoring a valid file: the check re-runs, its output is the same bytes, nothing else runs
    params_file(lambda raw: None)
    result = run(["dvc", "repro"], project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stages_run(result.stdout) <= {"validate_params"}
    assert stages_run(sh(["dvc", "repro"], project).stdout) == set()


def _alias_bomb(levels: int = 9) -> str:
    """Nested YAML aliases: 9 levels of 9 stand for 387 million strings once expanded."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


ANCHOR = ["params.yaml", "YAML anchor &a is not allowed"]


@pytest.mark.parametrize(("text", "names", "with_dvc"), [
    ("data: [unclosed\n", ["params.yaml"], True),
    ("data:\n  categories: [disc]\ndata:\n  categories: [disc]\n", ["params.yaml", "data"], True),
    ("- just\n- a list\n", ["params.yaml"], True),
    ("ORIGINAL" + _alias_bomb(3), ANCHOR, True),
    # DVC loads params.yaml whole into its templating context before any stage runs and
    # expands the aliases itself (8.9 GB after 4 minutes): only our validator is tried here
    ("ORIGINAL" + _alias_bomb(9), ANCHOR, False),
])
def test_broken_yaml_is_named(project, text, names, with_dvc):
    path = project / "params.yaml"
    original = path.read_text()
    try:
        path.write_text(text.replace("ORIGINAL", original))
        start = time.perf_counter()
        assert_one_line(run(["cmds-ad", "validate-params"], project), *names)
        assert time.perf_counter() - start < 30
        if with_dvc:
            assert_clean_failure(run(["dvc", "repro"], project), *names)
    finally:
        path.write_text(original)
    assert leftovers(project) == []


# ------------------------------------------------------------------------------ data files

SAMPLE = "data/demo/disc/train/good"


def _write_tiff(path: Path, xyz: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, xyz)


def _sixteen_bit(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        size = img.size
    Image.fromarray(np.full(size[::-1], 1000, np.uint16)).save(path)  # a depth map, not RGB


def _flat_cloud(path: Path) -> None:
    import tifffile

    xyz = tifffile.imread(path).astype(np.float32)
    xyz[..., 2] = np.where(np.any(xyz != 0, axis=-1), 0.5, 0.0)  # every point on one plane
    _write_tiff(path, xyz)


def _copy(src: str, dst: str) -> Callable[[Path], None]:
    return lambda d: shutil.copy(d / SAMPLE / src, d / SAMPLE / dst)


def _defect_mask(d: Path) -> Path:
    return next((d / "data/demo/disc/test").glob("[!g]*/gt/000.png"))


def _fill_mask(path: Path, value: int) -> None:
    from PIL import Image

    mask = np.asarray(Image.open(path)).copy()
    mask[:] = 0
    mask[10:14, 10:14] = value
    Image.fromarray(mask).save(path)


DATA_CASES = {
    "text as png": (lambda d: (d / SAMPLE / "rgb/000.png").write_text("not an image"),
                    f"{SAMPLE}/rgb/000.png"),
    "truncated png": (lambda d: (d / SAMPLE / "rgb/000.png").write_bytes(
        (d / SAMPLE / "rgb/000.png").read_bytes()[:100]), f"{SAMPLE}/rgb/000.png"),
    "16-bit png": (lambda d: _sixteen_bit(d / SAMPLE / "rgb/000.png"), f"{SAMPLE}/rgb/000.png"),
    "text as tiff": (lambda d: (d / SAMPLE / "xyz/000.tiff").write_text("nope"),
                     f"{SAMPLE}/xyz/000.tiff"),
    "nan cloud": (lambda d: _write_tiff(d / SAMPLE / "xyz/000.tiff",
                                        np.full((64, 64, 3), np.nan, np.float32)),
                  f"{SAMPLE}/xyz/000.tiff"),
    "one-channel cloud": (lambda d: _write_tiff(d / SAMPLE / "xyz/000.tiff",
                                                np.ones((64, 64), np.float32)),
                          f"{SAMPLE}/xyz/000.tiff"),
    "float64 cloud": (lambda d: _write_tiff(d / SAMPLE / "xyz/000.tiff",
                                            np.ones((64, 64, 3), np.float64)),
                      f"{SAMPLE}/xyz/000.tiff"),
    "flat cloud": (lambda d: _flat_cloud(d / SAMPLE / "xyz/000.tiff"),
                   f"{SAMPLE}/xyz/000.tiff"),
    "missing cloud": (lambda d: (d / SAMPLE / "xyz/000.tiff").unlink(), "000"),
    "missing gt": (lambda d: next((d / "data/demo/disc/test").glob("[!g]*/gt/000.png")).unlink(),
                   "gt/000.png"),
    "missing dataset": (lambda d: shutil.rmtree(d / "data/demo"), "data/demo"),
    # issue 22: ambiguous or inconsistent inputs
    "tif beside tiff": (_copy("xyz/000.tiff", "xyz/000.tif"),
                        f"{SAMPLE}/xyz/000.tif and 000.tiff: two xyz point cloud files"),
    "two rgb files": (_copy("rgb/000.png", "rgb/000.PNG"),
                      f"{SAMPLE}/rgb/000.PNG and 000.png: two rgb image files"),
    "empty defect mask": (lambda d: _fill_mask(_defect_mask(d), 0),
                          "000.png: the mask of defective sample"),
    "good sample with defect pixels": (
        lambda d: _fill_mask(d / "data/demo/disc/test/good/gt/000.png", 255),
        "data/demo/disc/test/good/gt/000.png: the mask of good sample 'good/000' marks 16"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file_is_named_and_prepare_leaves_nothing(project, tmp_path, case):
    damage, name = DATA_CASES[case]
    work = tmp_path / "work"
    (work / "data/demo").mkdir(parents=True)
    shutil.copytree(project / "data/demo/disc", work / "data/demo/disc")
    shutil.copy(project / "params.yaml", work / "params.yaml")
    damage(work)
    before = digest(work / "data")
    result = run(["cmds-ad", "prepare", "disc"], work)
    assert_one_line(result, name)
    assert not (work / "artifacts").exists()  # not even an empty artifacts/prepare/
    assert digest(work / "data") == before


def test_empty_defect_masks_can_be_accepted(project, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(project / "data/demo/disc", work / "data/demo/disc")
    shutil.copy(project / "params.yaml", work / "params.yaml")
    _fill_mask(_defect_mask(work), 0)
    write_params(work, {"data.accept_empty_defect_masks": True})
    sh(["cmds-ad", "prepare", "disc"], work)
    assert (work / "artifacts/prepare/disc/test.zarr/zarr.json").is_file()


# ------------------------------------------------------------------------------ stored artifacts

def _shard(root: Path, store: str, array: str) -> Path:
    """The first shard file of an array (its key has one part per dimension)."""
    return min(p for p in (root / store / array / "c").rglob("*") if p.is_file())


def _delete(store: str, array: str) -> Callable[[Path], None]:
    return lambda root: _shard(root, store, array).unlink()


def _truncate(store: str, array: str, drop: int | None = None,
              keep: int = 0) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        shard = _shard(root, store, array)
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) - drop] if drop else data[:keep])
    return damage


def _truncate_file(rel: str, keep: int) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes((root / rel).read_bytes()[:keep])


def _flip(store: str, array: str, offset: int) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        shard = _shard(root, store, array)
        data = bytearray(shard.read_bytes())
        data[offset] ^= 0xFF
        shard.write_bytes(bytes(data))
    return damage


# case: (what is damaged (restored after), damage, the command that reads it, its output,
#        names the message must contain)
STORE_CASES = {
    "streams shard deleted": (STREAMS, _delete(STREAMS, "psi2d_real"), "score", SCORES,
                              [STREAMS, "'psi2d_real'", "bump/000", "dvc checkout"]),
    "streams shard emptied": (STREAMS, _truncate(STREAMS, "psi3d_est"), "score",
                              SCORES, [STREAMS, "'psi3d_est'", "truncated"]),
    "streams byte flipped": (STREAMS, _flip(STREAMS, "psi2d_est", 40), "score", SCORES,
                             [STREAMS, "'psi2d_est'", "checksum", "re-run the `infer` stage"]),
    "streams array json truncated": (STREAMS, _truncate_file(f"{STREAMS}/psi3d_real/zarr.json", 40),
                                     "score", SCORES, [STREAMS, "damaged", "dvc checkout"]),
    "streams group json truncated": (STREAMS, _truncate_file(f"{STREAMS}/zarr.json", 20), "score",
                                     SCORES, [STREAMS, "damaged"]),
    "gt shard deleted": (TEST_STORE, _delete(TEST_STORE, "gt"), "evaluate",
                         "results/evaluate/disc/k1-s0",
                         [TEST_STORE, "'gt'", "re-run the `prepare` stage"]),
    "gt shard truncated": (TEST_STORE, _truncate(TEST_STORE, "gt", drop=7), "evaluate",
                           "results/evaluate/disc/k1-s0", [TEST_STORE, "'gt'"]),
    "scores store deleted": (SCORES, lambda r: shutil.rmtree(r / SCORES), "evaluate",
                             "results/evaluate/disc/k1-s0", [SCORES, "not found"]),
    "scores shard flipped": (SCORES, _flip(SCORES, "map_pro", 30), "evaluate",
                             "results/evaluate/disc/k1-s0", [SCORES, "'map_pro'"]),
    "features shard deleted": (FEATURES, _delete(FEATURES, "rgb_0"), "infer", STREAMS,
                               [FEATURES, "'rgb_0'", "re-run the `extract_features` stage"]),
    "metrics json broken": (METRICS, lambda r: (r / METRICS).write_text("{\"i_auroc\": "),
                            "report", "results/summary", [METRICS, "not valid JSON"]),
    "shots json broken": ("artifacts/prepare/disc/shots.json",
                          lambda r: (r / "artifacts/prepare/disc/shots.json").write_text("[1,"),
                          "fit-mapper", "artifacts/mappers/disc/k1-s0",
                          ["artifacts/prepare/disc/shots.json", "JSON"]),
}
NEEDS_KEY = {"score", "evaluate", "infer", "fit-mapper"}


@pytest.mark.parametrize("case", sorted(STORE_CASES))
def test_damaged_artifact_is_named_and_nothing_is_written(project, tmp_path, case):
    target, damage, command, output, names = STORE_CASES[case]
    backup = tmp_path / "backup"
    src = project / target
    is_dir = src.is_dir()
    (shutil.copytree if is_dir else shutil.copy2)(src, backup)
    out_before = digest(project / output)
    try:
        damage(project)
        args = ["cmds-ad", command, *(["disc", "-k", "1"] if command in NEEDS_KEY else [])]
        assert_clean_failure(run(args, project), *names)
        assert digest(project / output) == out_before  # the old output is kept as it was
        assert leftovers(project) == []
    finally:
        if is_dir:
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(backup, src)
        else:
            shutil.copy2(backup, src)


def test_outputs_follow_the_umask(project):
    mask = os.umask(0)
    os.umask(mask)
    for path in (project / "artifacts").rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, (path, oct(mode))


# ------------------------------------------------------------------------------ faults

def _kill_when(project: Path, stage: str, ready: Callable[[], bool], whole_group: bool = True,
               timeout: float = 240) -> subprocess.Popen:
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=project, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, f"{stage} finished before the kill point"
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()  # only dvc: the stage process must follow
    proc.wait()
    return proc


def _appears(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: folder.is_dir() and any(folder.glob(pattern))


def _stage_processes(project: Path) -> list:
    """The project's stage processes: `cmds-ad <stage>`, and a warm server's child running
    one (its command line is the server's; tests/conftest.py session_server)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            line = p.info["cmdline"] or []
            warm_child = any("stages.warm import serve" in word for word in line)
            if (stage_command(line) or warm_child) and p.info["cwd"] == str(project):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _recover_and_compare(project: Path, baseline: str, stage: str) -> None:
    status = sh(["dvc", "status"], project).stdout
    assert stage in changed_stages(project), status
    # the next repro completes (it restores the stage from DVC's cache or re-runs it) and what
    # the killed writer left is dot-named: ignored by DVC, so nothing reports modified
    sh(["dvc", "repro"], project)
    assert changed_stages(project) == set()
    assert (project / METRICS).read_text() == baseline
    assert all(Path(p).name.startswith(".") for p in leftovers(project))
    # the next run of the stage removes the leftovers and writes the same bytes again
    sh(["dvc", "repro", "-f", "-s", stage], project)
    assert leftovers(project) == []
    assert changed_stages(project) == set()


KILL_CASES = {
    "prepare writing": (f"{UPSTREAM}prepare@disc", "artifacts/prepare", ".disc.tmp-*"),
    "infer writing": (f"{UPSTREAM}infer@{KEY}", "artifacts/streams/disc", ".k1-s0.zarr.tmp-*"),
    "score writing": (f"score@{KEY}", "artifacts/scores/disc", ".k1-s0.zarr.tmp-*"),
    "evaluate writing": (f"evaluate@{KEY}", "results/evaluate/disc", ".k1-s0.tmp-*"),
}


@pytest.mark.parametrize("case", sorted(KILL_CASES))
def test_kill_then_repro_gives_the_same_metrics(project, baseline, case):
    stage, folder, pattern = KILL_CASES[case]
    _kill_when(project, stage, _appears(project / folder, pattern))
    assert leftovers(project), "the kill came after the stage had finished writing"
    _recover_and_compare(project, baseline, stage)


def test_kill_at_stage_start_then_repro(project, baseline):
    stage = f"evaluate@{KEY}"
    _kill_when(project, stage, lambda: bool(_stage_processes(project)))
    _recover_and_compare(project, baseline, stage)


def test_stage_process_dies_with_dvc(project, baseline):
    stage = f"score@{KEY}"
    _kill_when(project, stage, lambda: bool(_stage_processes(project)), whole_group=False)
    # an orphan would finish the stage (a few seconds) and write the store DVC had removed
    deadline = time.time() + 8
    while time.time() < deadline:
        assert not (project / SCORES).exists(), "the stage kept running after dvc died"
        time.sleep(0.1)
    assert _stage_processes(project) == [], "the stage kept running after dvc died"
    _recover_and_compare(project, baseline, stage)


def test_interrupted_rename_leftover_is_ignored_and_removed(project, baseline):
    # what a kill between the two renames of a replace leaves: the previous output, dot-named
    old = project / "results/evaluate/disc/.k1-s0.old-4242"
    shutil.copytree(project / "results/evaluate/disc/k1-s0", old)
    tmp = project / "artifacts/scores/disc/.k1-s0.zarr.tmp-dead"
    tmp.mkdir()
    assert changed_stages(project) == set()  # .dvcignore hides both from DVC
    sh(["dvc", "repro", "-f", "-s", f"evaluate@{KEY}"], project)
    sh(["dvc", "repro", "-f", "-s", f"score@{KEY}"], project)
    assert leftovers(project) == []
    assert (project / METRICS).read_text() == baseline
    assert changed_stages(project) == set()


# ------------------------------------------------------------------------------ user files

PREPARE = "artifacts/prepare/disc"


def test_a_category_that_is_a_path_never_reaches_the_data(project, params_file):
    before = digest(project / "data/demo/disc")
    for name in ("../../data/demo/disc", "/tmp", "disc/../disc"):
        assert_one_line(run(["cmds-ad", "prepare", name], project),
                        f"category {name!r} is not a plain name")
    params_file(_set("data.categories", ["../../data/demo/disc"]))
    assert_one_line(run(["cmds-ad", "validate-params"], project), "data.categories")
    result = run(["dvc", "repro"], project)  # DVC's own graph check may speak first
    assert result.returncode != 0 and stages_run(result.stdout) <= {"validate_params"}
    assert digest(project / "data/demo/disc") == before
    assert leftovers(project, ("artifacts", "results", "data")) == []


OUT_CASES = {
    "import-official into a user's folder": (
        ["import-official", "release", "-c", "disc", "-k", "1", "-o", "mine"],
        ["mine: the folder holds files that `cmds-ad import-official` did not write (notes.txt)",
         "--force"]),
    "import-official into the project": (
        ["import-official", "release", "-c", "disc", "-k", "1", "-o", "."],
        [".: refused as an output folder: it is the current folder"]),
    "import-official into the data root": (
        ["import-official", "release", "-c", "disc", "-k", "1", "-o", "data/demo", "--force"],
        ["data/demo: refused as an output folder: it is the data root"]),
    "demo-data's Eyecandies into a user's folder": (
        ["demo-data", "new", "--category", "disc", "--eyecandies", "mine"],
        ["mine: the folder holds files"]),
    "demo-data's Eyecandies above the data root": (
        ["demo-data", "new", "--category", "disc", "--eyecandies", "data", "--force"],
        ["it is the folder of the data root"]),
    "demo-data's Eyecandies into the project's parent": (
        ["demo-data", "new", "--category", "disc", "--eyecandies", ".."],
        ["it holds the current folder"]),
    "demo-models into a user's folder": (["demo-models", "mine"], ["mine: the folder holds"]),
    "demo-models into the project": (["demo-models", ".", "--force"], ["the current folder"]),
    "sweep-lambda into a user's folder": (["sweep-lambda", "--out", "mine"],
                                          ["mine: the folder holds files"]),
    "sweep-lambda into the data root": (["sweep-lambda", "--out", "data/demo"],
                                        ["it is the data root"]),
}


@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_out_folders_never_replace_a_users_files(project, case):
    args, names = OUT_CASES[case]
    user = project / "mine"
    user.mkdir(exist_ok=True)
    (user / "notes.txt").write_text("the user's")
    data, tracked = digest(project / "data/demo"), sh(["git", "status", "--short"], project).stdout
    try:
        assert_one_line(run(["cmds-ad", *args], project), *names)
        assert (user / "notes.txt").read_text() == "the user's"
        assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
        assert digest(project / "data/demo") == data
        assert sh(["git", "status", "--short"], project).stdout == tracked
        assert [p.name for p in project.iterdir() if _ours(p.name)] == []
    finally:
        shutil.rmtree(user)


# ------------------------------------------------------------------------------ concurrent writers

def _start(args: list[str], project: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=project, env=project_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the point of the test: {proc.communicate()}"


def _writing(project: Path) -> Callable[[], bool]:
    return _appears(project / "artifacts/prepare", ".disc.tmp-*/.*.zarr.tmp-*")


def _stopped(pid: int) -> bool:
    """Every thread of the process is stopped (or the process is gone)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the thread has ended
        if state not in "tTZX":
            return False
    return True


@contextmanager
def _paused(project: Path) -> Iterator[None]:
    """Hold the stage processes of the project still (SIGSTOP) for the block: a writer stays
    mid-write however fast the machine is."""
    processes = _stage_processes(project)
    assert processes, "no stage process to hold"
    for p in processes:
        p.suspend()
    try:
        # SIGSTOP arrives asynchronously: a thread running on the other core could still
        # write a file while the test removes the folder
        deadline = time.time() + 30
        while not all(_stopped(p.pid) for p in processes):
            assert time.time() < deadline, "the stage processes did not stop"
            time.sleep(0.01)
        yield
    finally:
        for p in processes:
            p.resume()


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _complete_and_unchanged(project: Path, before: dict[str, bytes], baseline: str) -> None:
    assert digest(project / PREPARE) == before  # the complete output, the same bytes
    assert leftovers(project) == []
    assert changed_stages(project) == set()  # what dvc.lock records is what is there
    assert (project / METRICS).read_text() == baseline


@pytest.mark.parametrize("first", ["by hand", "dvc repro"])
def test_a_second_writer_of_an_output_fails_and_the_first_completes(project, baseline, first):
    """Both orders of a hand-run `cmds-ad prepare disc` and `dvc repro` of that instance."""
    before = digest(project / PREPARE)
    hand, dvc = ["cmds-ad", "prepare", "disc"], ["dvc", "repro", "-f", "-s", f"{UPSTREAM}prepare@disc"]
    writer = _start(hand if first == "by hand" else dvc, project)
    _until(_writing(project), writer)
    with _paused(project):  # the first writer holds the output, mid-write
        second = run(dvc if first == "by hand" else hand, project)
    assert_clean_failure(second, PREPARE, "another process is writing this output")
    if first == "dvc repro":  # the message names the holder: the stage process DVC started
        assert_one_line(second, "(process ", "cmds-ad prepare disc)")
    assert _finish(writer).returncode == 0
    # DVC removed the output before its run failed, and the hand-run put a complete one back:
    # the same bytes as dvc.lock records, nothing cached from the failed run
    _complete_and_unchanged(project, before, baseline)


@pytest.mark.parametrize("writer", ["by hand", "dvc repro"])
def test_a_temporary_removed_while_writing_is_never_renamed_or_cached(project, baseline, writer):
    """`cmds-ad prepare disc & sleep; rm -rf artifacts/prepare/.disc.tmp-*; wait`, and the same
    during `dvc repro`: the writer fails with one line, renames nothing, DVC caches nothing."""
    before = digest(project / PREPARE)
    args = ["cmds-ad", "prepare", "disc"] if writer == "by hand" else \
        ["dvc", "repro", "-f", "-s", f"{UPSTREAM}prepare@disc"]
    proc = _start(args, project)
    _until(_writing(project), proc)
    with _paused(project):
        for tmp in (project / "artifacts/prepare").glob(".disc.tmp-*"):
            shutil.rmtree(tmp)
    result = _finish(proc)
    names = [PREPARE, "removed", "by another process while this one wrote it"]
    if writer == "by hand":
        assert_one_line(result, *names)
        assert digest(project / PREPARE) == before  # the previous output as it was
    else:
        assert_clean_failure(result, *names)
        assert not (project / PREPARE).exists()  # DVC removed it; nothing incomplete came back
        sh(["dvc", "repro"], project)  # restored from DVC's cache: the complete output
    _complete_and_unchanged(project, before, baseline)


# ------------------------------------------------------------------------------ resources

def test_disk_full_while_a_stage_writes_is_one_line_and_keeps_the_old_store(project, tmp_path):
    folder = project / "artifacts/scores/disc"
    before = digest(folder)
    backup = tmp_path / "scores"
    shutil.copytree(folder, backup)
    size = sum(len(b) for b in before.values()) + 64 * 1024  # the old store and a little more
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        shutil.copytree(backup, folder, dirs_exist_ok=True)
        result = run(["cmds-ad", "score", "disc", "-k", "1"], project)
        assert_one_line(result, f"score disc k=1 seed=0: out of disk space writing {SCORES} "
                                "(No space left on device)", "uncompressed", "free on its disk",
                        "nothing was kept")
        assert digest(folder) == before and leftovers(project) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert digest(folder) == before


def test_out_of_memory_in_a_stage_is_one_line_and_leaves_nothing(project, params_file):
    """The estimate lets data.size 4096 through on a machine with a few GiB free; a process
    limited to 3 GiB of address space then runs out inside prepare."""
    import resource

    from pipeline.limits import available_memory

    if available_memory() < 6 * 2**30:
        pytest.skip("needs 6 GiB available, so that the validator lets data.size 4096 pass")
    params_file(_set("data.size", 4096))
    before = digest(project / PREPARE)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    result = subprocess.run(["cmds-ad", "prepare", "disc"], cwd=project, env=project_env(),
                            capture_output=True, text=True, preexec_fn=limit)
    assert_one_line(result, "prepare disc: out of memory (Unable to allocate",
                    f"writing {PREPARE}, nothing was kept")
    assert digest(project / PREPARE) == before and leftovers(project) == []
