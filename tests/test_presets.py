"""The preset pairs: `paper` (the published code) and `strict` (the corrected protocol).

The README's protocol table promises that the two pairs differ in exactly four keys and that
the MVTec and Eyecandies presets of one protocol differ only in what the dataset needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.params import load_params, section_dict
from tools.scratch_project import make_project, sh

REPO = Path(__file__).resolve().parents[1]

# The keys where `strict` replaces the published choice (docs/reproducing.md, "Protocols").
STRICT_KEYS = {
    "augment.train_on": ("train_split", "shots"),
    "estimate_normals.flip_x": (False, True),
    "infer.distance": ("concatenated", "layerwise"),
    "evaluate.headline_aupro": ("thr99", "exact"),
}
# Eyecandies only: strict writes the background 0, paper the published converter's point
# (OFFICIAL item 20).
EYECANDIES_STRICT_KEYS = {"data.eyecandies_background": ("published", "zero")}
# What the Eyecandies presets change beside the dataset itself (OFFICIAL items 4, 14, 20).
EYECANDIES_KEYS = {"data.dataset", "data.root", "data.categories", "data.clean_xyz",
                   "data.normals_plane_distance"}


def _flat(path: Path) -> dict:
    params = load_params(path)
    return {
        f"{name}.{key}": value
        for name in type(params).model_fields
        for key, value in section_dict(getattr(params, name)).items()
    }


def _differences(a: dict, b: dict) -> dict:
    return {key: (a[key], b[key]) for key in a if a[key] != b[key]}


@pytest.mark.parametrize("dataset", ["", "-eyecandies"])
def test_strict_differs_from_paper_in_the_four_protocol_keys(dataset):
    paper = _flat(REPO / "presets" / f"paper{dataset}.yaml")
    strict = _flat(REPO / "presets" / f"strict{dataset}.yaml")
    assert _differences(paper, strict) == {**STRICT_KEYS,
                                           **(EYECANDIES_STRICT_KEYS if dataset else {})}


@pytest.mark.parametrize("protocol", ["paper", "strict"])
def test_eyecandies_preset_differs_only_in_the_dataset(protocol):
    mvtec = _flat(REPO / "presets" / f"{protocol}.yaml")
    eyecandies = _flat(REPO / "presets" / f"{protocol}-eyecandies.yaml")
    assert set(_differences(mvtec, eyecandies)) == EYECANDIES_KEYS | (
        set(EYECANDIES_STRICT_KEYS) if protocol == "paper" else set())


def test_readme_protocol_table_names_every_official_item_and_strict_key():
    doc = (REPO / "docs" / "reproducing.md").read_text()  # the README's protocol table
    section = doc.split("## Protocols", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)
    assert [int(r) for r in rows] == list(range(1, 25))
    for key in {**STRICT_KEYS, **EYECANDIES_STRICT_KEYS}:
        assert f"**`{key}:" in section, key


PARAMS_FILES = ["params.yaml", *sorted(f"presets/{p.name}" for p in (REPO / "presets").glob("*.yaml"))]


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_file_is_written_as_dvc_set_param_writes_it(name, tmp_path):
    """`dvc exp run -S` rewrites the whole file with its own YAML writer (block lists, empty
    nulls, plain strings; a comment right after a block list is dropped): the shipped files are
    its fixed point, so an -S edit is a one-line diff. DVC's writer is called as `-S` calls it
    (dvc.utils.hydra.apply_overrides)."""
    import yaml
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    text = (REPO / name).read_text()
    path.write_text(text)
    value = yaml.safe_load(text)["score"]["lambda_1"]
    apply_overrides(str(path), [f"score.lambda_1={value!r}"])
    assert path.read_text() == text
    # a dict with integer keys is set as a dict, merged into the file's (Hydra refuses
    # `-S fit_mapper.steps.1=7`: its keys are strings)
    apply_overrides(str(path), ["score.lambda_1=0.375", "fit_mapper.steps={1: 7}"])
    changed = [b.strip() for a, b in zip(text.splitlines(), path.read_text().splitlines())
               if a != b]
    assert len(changed) == 2 and changed[0].startswith("steps: {1: 7, 2: "), changed
    assert changed[1] == "lambda_1: 0.375"
    assert len(path.read_text().splitlines()) == len(text.splitlines())


def _list_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += _list_keys(value, f"{dotted}.")
        elif isinstance(value, list):
            keys.append(dotted)
    return keys


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_every_list_can_be_set_with_set_param(name, tmp_path):
    """`-S key=[]` and `-S key=[...]` on every list: DVC's writer (ruamel) corrupts the file
    where a block list's key carries an end-of-line comment and the list becomes empty
    ("n_train: 10 n_test: 24" on one line), so the files put such comments on a line above."""
    import yaml
    from dvc.utils.hydra import apply_overrides

    text = (REPO / name).read_text()
    original = yaml.safe_load(text)
    path = tmp_path / "params.yaml"
    keys = _list_keys(original)
    for value in ([], [7, 8]):  # every list at once: a corrupted key shows in the whole file
        path.write_text(text)
        apply_overrides(str(path), [f"{key}={value}" for key in keys])
        expected = yaml.safe_load(text)
        for key in keys:
            section, leaf = key.rsplit(".", 1)
            node = expected
            for part in section.split("."):
                node = node[part]
            node[leaf] = value
        assert yaml.safe_load(path.read_text()) == expected, value


# no DVC run: a clone and DVC's stage list (moved here from the end-to-end test_team)
def test_real_dataset_presets_have_no_demo_data_instance(tmp_path):
    root = make_project(tmp_path / "cmds-ad", make_data=False)
    listed = sh(["dvc", "stage", "list", "--all", "--name-only"], root).stdout.split()
    assert "upstream/dvc.yaml:demo_data@disc" in listed
    (root / "params.yaml").write_text((root / "presets/paper.yaml").read_text())
    listed = sh(["dvc", "stage", "list", "--all", "--name-only"], root).stdout.split()
    assert "upstream/dvc.yaml:prepare@bagel" in listed
    assert not [s for s in listed if "demo_data" in s]
