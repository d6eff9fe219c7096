"""params.yaml validation: every bad key or value is named in one message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def _demo_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_and_presets_are_valid(tmp_path, monkeypatch):
    params = load_params(REPO / "params.yaml")
    assert params.data.categories == ["disc", "dome", "slab"]
    assert all(params.fit_mapper.steps_for(k) > 0 for k in params.fewshot.shots)
    # Presets name real datasets that are not on this machine; the official category names
    # are enough for validation.
    for preset in sorted((REPO / "presets").glob("*.yaml")):
        p = load_params(preset)
        assert p.models.backbone.startswith("vit_base_patch8_224"), preset
        assert [p.fit_mapper.steps_for(k) for k in (1, 2, 4)] == [3000, 1500, 750]


def test_unknown_key_names_key_and_allowed(tmp_path):
    raw = _demo_raw()
    raw["score"]["lamda_1"] = 0.5
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "score.lamda_1" in message and "unknown key" in message
    assert "lambda_1" in message  # the allowed keys are listed


def test_unknown_section_is_named():
    raw = _demo_raw()
    raw["scoring"] = {}
    with pytest.raises(ParamsError, match="scoring: unknown key"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("score", "fusion", "prod", "'product', 'sum' or 'max'"),
        ("augment", "n_per_shot", -1, "augment.n_per_shot"),
        ("fewshot", "shots", [0], "fewshot.shots"),
        ("fewshot", "strategy", "last", "fewshot.strategy"),
        ("fit_mapper", "architecture", "transformer", "'cahfm' or 'mlp'"),
        ("evaluate", "limits", [0.3, 1.5], "evaluate.limits"),
        ("data", "dataset", "mvtec", "data.dataset"),
    ],
)
def test_invalid_values_name_the_key(section, key, value, fragment):
    raw = _demo_raw()
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert fragment in str(err.value)


def test_unknown_category_lists_allowed(tmp_path):
    raw = _demo_raw()
    raw["data"]["root"] = str(tmp_path)
    raw["data"]["categories"] = ["bagle"]
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "bagle" in str(err.value) and "bagel" in str(err.value)


def test_missing_step_count_for_k():
    raw = _demo_raw()
    raw["fewshot"]["shots"] = [1, 8]
    with pytest.raises(ParamsError, match="fit_mapper.steps: no step count for k=8"):
        parse_params(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("data.categories", ["disc", "dome", "disc"], "data.categories: 'disc' listed more than once"),
        ("fewshot.shots", [1, 2, 2], "fewshot.shots: 2 listed more than once"),
        ("fewshot.seeds", [0, 0], "fewshot.seeds: 0 listed more than once"),
        ("evaluate.limits", [0.3, 0.3], "evaluate.limits: 0.3 listed more than once"),
        ("fit_mapper.steps", {1: 0, 2: 200, 4: 200}, "fit_mapper.steps: the step count for k=1 must be >= 1 (got 0)"),
        ("fit_mapper.steps", {1: -5, 2: 200, 4: 200}, "(got -5)"),
        ("fit_mapper.steps", {1: 200, 2: 200}, "fit_mapper.steps: no step count for k=4"),
        ("score.lambda_1", float("nan"), "score.lambda_1: Input should be a finite number"),
    ],
)
def test_cross_section_checks_name_the_key(key, value, fragment):
    raw = _demo_raw()
    section, leaf = key.split(".")
    raw[section][leaf] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert fragment in str(err.value)


def test_several_problems_are_reported_together():
    raw = _demo_raw()
    raw["fewshot"]["shots"] = [1, 1]
    raw["fit_mapper"]["steps"] = {1: 0}
    message = str(pytest.raises(ParamsError, parse_params, raw).value)
    assert "fewshot.shots" in message and "fit_mapper.steps" in message
    assert all(line.startswith("params.yaml: ") for line in message.splitlines())


def test_key_given_twice_in_yaml_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + "\nscore:\n  lambda_1: 0.5\n")
    with pytest.raises(ParamsError, match="key 'score' given more than once"):
        load_params(path)
