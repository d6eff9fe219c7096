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


# ---- refused before work (issue 22) ----------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("fewshot.shots", [1.0], "fewshot.shots.0: Input should be a valid integer (got 1.0)"),
    ("fewshot.shots", [True], "fewshot.shots.0: Input should be a valid integer (got True)"),
    ("data.size", 224.0, "data.size: Input should be a valid integer"),
    ("data.clean_xyz", 1, "data.clean_xyz: Input should be a valid boolean (got 1)"),
    ("score.lambda_1", True, "score.lambda_1: Input should be a valid number"),
    ("score.lambda_1", "0.5", "score.lambda_1: Input should be a valid number (got '0.5')"),
    ("fewshot.seeds", [-1], "fewshot.seeds.0: Input should be greater than or equal to 0"),
    ("data.categories", ["../../data/demo/disc"], "data.categories: '../../data/demo/disc' is not "
                                                  "a plain name"),
    ("data.categories", ["/etc"], "'/etc' is not a plain name"),
    ("data.categories", ["a/b"], "'a/b' is not a plain name"),
    ("data.categories", [".."], "'..' is not a plain name"),
    ("data.categories", ["disc@1"], "'disc@1' is not a plain name"),
    ("score.box_sizes", [4, 4], "score.box_sizes: box sizes must be odd and positive"),
    ("score.box_sizes_large", [5, -1], "score.box_sizes_large: box sizes must be odd"),
    ("fit_mapper.lr_min", 1.0, "fit_mapper.lr_min: 1.0 is above fit_mapper.lr=0.001"),
    ("augment.strength", 0.01, "augment.strength: 0.01 x augment.inference_steps 10 leaves no "
                               "denoising step"),
    ("augment.prompt", "a {thing}", "augment.prompt: bad template 'a {thing}'"),
    ("augment.placeholder_token", "two words", "augment.placeholder_token: 'two words' must be "
                                               "one word"),
    ("extract_features.layers", [7, 4, 11], "extract_features.layers: must be three increasing"),
    ("evaluate.aupro_thresholds", [100000000], "evaluate.aupro_thresholds: 100000000 is above "
                                               "1000000, the most allowed"),
])
def test_refused_before_work(key, value, fragment):
    raw = _demo_raw()
    section, leaf = key.split(".")
    raw[section][leaf] = value
    message = str(pytest.raises(ParamsError, parse_params, raw).value)
    assert fragment in message and "\n" not in message, message


def test_values_in_messages_are_cut_short():
    raw = _demo_raw()
    raw["evaluate"]["limits"] = ["x" * 10_000]
    message = str(pytest.raises(ParamsError, parse_params, raw).value)
    assert "xxx..." in message and len(message) < 200, message


@pytest.mark.parametrize(("key", "value", "fits"), [
    ("data.size", 100000, "data.size: 100000 needs at least 2.3 TiB of memory (prepare, per "
                          "sample); 1.0 GiB is available here, so at most 2048 fits"),
    ("augment.n_per_shot", 1000000, "augment.n_per_shot: 1000000 needs at least 309.0 GiB"),
    ("fit_mapper.resolution", 50000, "fit_mapper.resolution: 50000 needs at least"),
    ("score.batch_size", 100000, "score.batch_size: 100000 needs at least"),
])
def test_sizes_that_cannot_fit_in_memory_are_refused_with_what_fits(monkeypatch, key, value,
                                                                      fits):
    import pipeline.limits as limits

    monkeypatch.setattr(limits, "available_memory", lambda: 2**30)
    raw = _demo_raw()
    section, leaf = key.split(".")
    raw[section][leaf] = value
    message = str(pytest.raises(ParamsError, parse_params, raw).value)
    assert fits in message and "\n" not in message, message
    parse_params(_demo_raw())  # the demo fits in 1 GiB


def test_the_paper_presets_need_little_memory_by_the_estimates():
    import pipeline.limits as limits

    for preset in sorted((REPO / "presets").glob("*.yaml")):
        params = load_params(preset)
        assert limits.memory_problems(params, budget=2**30) == [], preset


def test_checkpoint_folder_must_hold_checkpoints_or_be_the_placeholder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _demo_raw()
    raw["data"]["root"] = "data/demo"

    def check(folder: str, mappers: str = "train") -> str:
        seeds = raw["fewshot"]["seeds"]  # the graph's route follows mappers
        raw["fit_mapper"].update(checkpoints=folder, mappers=mappers,
                                 trained_seeds=seeds if mappers == "train" else [],
                                 released_seeds=seeds if mappers == "official" else [])
        if mappers == "official":  # the released checkpoints' feature setup
            raw.update(models={"backbone": "vit_base_patch8_224.dino"},
                       estimate_normals={"flip_x": False}, infer={"distance": "concatenated"},
                       extract_features={"layers": [4, 7, 11]})
            raw["fit_mapper"]["resolution"] = 224
        try:
            parse_params(raw)
        except ParamsError as err:
            return str(err)
        return "accepted"

    assert "'.' is the project folder" in check(".")
    assert "'..' is the project folder or one that holds it" in check("..")
    (tmp_path / "notes.txt").write_text("x")
    assert "is a file" in check("notes.txt")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    assert "holds no released checkpoints" in check("docs")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "README.md").write_text("placeholder")
    assert check("checkpoints") == "accepted"
    assert check("missing") == "accepted"  # DVC names a missing dependency
    assert "'missing' not found" in check("missing", "official")
    assert "holds no released checkpoints" in check("checkpoints", "official")
    (tmp_path / "checkpoints" / "checkpoints_dual_2dto3d_bagel_1shot").mkdir()
    assert check("checkpoints", "official") == "accepted"


def test_yaml_anchors_and_aliases_are_refused_at_once(tmp_path):
    import time

    lines = ['data:\n  categories: [disc]\n', 'a: &a ["lol", "lol", "lol", "lol", "lol"]\n']
    for level in "bcdefghij":  # 5^9 = 2 million strings when expanded
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{chr(ord(level) - 1)}"] * 5) + "]\n")
    path = tmp_path / "params.yaml"
    path.write_text("".join(lines))
    start = time.perf_counter()
    message = str(pytest.raises(ParamsError, load_params, path).value)
    assert time.perf_counter() - start < 1.0
    assert "line 3, column 4: YAML anchor &a is not allowed" in message and "\n" not in message


def test_exponent_floats_are_numbers_as_in_yaml_1_2(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  categories: [disc]\naugment:\n  lr: 1e-3\nfit_mapper:\n  lr: 2E-4\n")
    params = load_params(path)
    assert params.augment.lr == 0.001 and params.fit_mapper.lr == 0.0002


def test_renamed_textual_inversion_keys_say_where_they_went():
    raw = _demo_raw()
    del raw["augment"]["textual_inversion"]
    raw["augment"].update(textual_inversion_steps=1000, continue_inversion_lr=1e-4)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert "augment.textual_inversion_steps: now augment.textual_inversion.steps" in lines[0]
    assert "augment.continue_inversion_lr: now augment.textual_inversion.continue_lr" in lines[1]


def test_textual_inversion_section_checks_its_keys():
    raw = _demo_raw()
    raw["augment"]["textual_inversion"]["accumulation"] = 0
    with pytest.raises(ParamsError, match=r"augment\.textual_inversion\.accumulation"):
        parse_params(raw)
    raw = _demo_raw()
    raw["augment"]["textual_inversion"]["norm"] = 0.4
    with pytest.raises(ParamsError, match=r"augment\.textual_inversion\.norm: unknown key"):
        parse_params(raw)


def test_route_seed_lists_follow_mappers():
    """The DVC graph's routes (fit_mapper.trained_seeds / released_seeds) must follow
    fit_mapper.mappers and fewshot.seeds; the message gives the values to set."""
    raw = _demo_raw()
    raw["fewshot"]["seeds"] = [0, 1]
    with pytest.raises(ParamsError, match=r"fit_mapper\.trained_seeds: \[0\] does not follow.*"
                       r"set fit_mapper\.trained_seeds=\[0, 1\] fit_mapper\.released_seeds=\[\]"):
        parse_params(raw)
    raw["fit_mapper"]["trained_seeds"] = [0, 1]
    assert parse_params(raw).fit_mapper.trained_seeds == [0, 1]
    del raw["fit_mapper"]["trained_seeds"], raw["fit_mapper"]["released_seeds"]
    assert parse_params(raw).fit_mapper.trained_seeds is None  # without the keys: derived
    raw["fit_mapper"]["released_seeds"] = [0, 1]
    with pytest.raises(ParamsError, match=r"fit_mapper\.released_seeds: \[0, 1\] does not"):
        parse_params(raw)
