"""The preset pairs: `paper` (the published code) and `strict` (the corrected protocol).

The README's protocol table promises that the two pairs differ in exactly four keys and that
the MVTec and Eyecandies presets of one protocol differ only in what the dataset needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.params import load_params, section_dict

REPO = Path(__file__).resolve().parents[1]

# The keys where `strict` replaces the published choice (README, "Protocols").
STRICT_KEYS = {
    "augment.train_on": ("train_split", "shots"),
    "estimate_normals.flip_x": (False, True),
    "infer.distance": ("concatenated", "layerwise"),
    "evaluate.headline_aupro": ("thr99", "exact"),
}
# What the Eyecandies presets change beside the dataset itself (OFFICIAL items 4 and 14).
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
    assert _differences(paper, strict) == STRICT_KEYS


@pytest.mark.parametrize("protocol", ["paper", "strict"])
def test_eyecandies_preset_differs_only_in_the_dataset(protocol):
    mvtec = _flat(REPO / "presets" / f"{protocol}.yaml")
    eyecandies = _flat(REPO / "presets" / f"{protocol}-eyecandies.yaml")
    assert set(_differences(mvtec, eyecandies)) == EYECANDIES_KEYS


def test_readme_protocol_table_names_every_official_item_and_strict_key():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Protocols", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)
    assert [int(r) for r in rows] == list(range(1, 15))
    for key in STRICT_KEYS:
        assert f"**`{key}:" in section, key
