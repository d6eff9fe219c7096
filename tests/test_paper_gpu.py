"""benchmarks/paper_gpu.py: the smoke run on the CPU, and the extrapolation's arithmetic.

The smoke run is the script a GPU session will run, at tiny sizes: every part and option must
run and report, so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "paper_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("paper_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pg = _module()


@pytest.mark.slow
def test_smoke_runs_every_part_and_option(tmp_path: Path) -> None:
    # A subprocess, as a user runs it (about 40 s: tiny models, one thread).
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads((tmp_path / "paper_gpu.json").read_text())
    rows = payload["rows"]
    assert not [r for r in rows if r["error"]]
    defaults = {r["key"]: r for r in rows if r["option"] == "default"}
    assert set(defaults) == {"cache_latents", "textual_inversion", "lora", "img2img",
                             "marigold_original", "marigold_generated", "dino", "mapper_real",
                             "mapper_est", "infer", "score", "metrics"}
    for row in defaults.values():
        assert row["seconds"] > 0 and row["count"] > 0 and row["peak"] > 0, row
    # the published fp16 generation path ran (in fp16 on the CPU too)
    assert "float16" in defaults["img2img"]["what"]
    tried = {(r["part"], r["option"]) for r in rows if r["option"] != "default"}
    wanted = {(p.name, o) for p in pg.PARTS for o in p.options}
    wanted |= {(p.name, p.label) for p in pg.PARTS if p.overrides}  # variants, e.g. noisy copies
    assert tried == wanted
    env = payload["environment"]
    assert env["smoke"] and env["cublas_workspace_config"] == ":4096:8"
    tables = payload["extrapolation"]["tables"]
    assert set(tables) == {"MVTec 3D-AD", "Eyecandies"}
    assert all(seconds > 0 for t in tables.values() for seconds in t["stages"].values())
    text = (tmp_path / "paper_gpu.md").read_text()
    assert "SMOKE" in text and "| **total** |" in text and "speed-up" in text


def test_dataset_counts_are_the_published_ones() -> None:
    # MVTec 3D-AD, Table 1 of the dataset paper: 2656 train, 249 good + 948 defective test.
    counts = pg.MVTEC_COUNTS
    assert sum(t for t, _ in counts.values()) == 2656
    assert sum(t for _, t in counts.values()) == 249 + 948
    for dataset, (preset, _, per_category) in pg.DATASETS.items():
        raw = yaml.safe_load((REPO / "presets" / preset).read_text())
        assert list(per_category) == raw["data"]["categories"], dataset


def test_extrapolation_counts_every_unit_of_the_paper_budgets() -> None:
    # With every unit at 1 s, each stage's total is the number of its units in the table.
    units = dict.fromkeys(("cache_latents", "textual_inversion", "lora", "img2img",
                           "marigold_original", "marigold_generated", "dino", "mapper_real",
                           "mapper_est", "infer", "score", "metrics"), 1.0)
    params = pg.load_preset(REPO / "presets" / "paper.yaml")
    stages = pg.dataset_seconds(units, params, pg.MVTEC_COUNTS)
    generated = 5 * (1 + 2 + 4) * 10  # 5 images per shot, k = 1, 2, 4, 10 categories
    assert stages == {
        # the union of the first 1, 2, 4 shots is 4 train images per category
        "estimate_normals (real)": 10 * 4 + 1197,
        # fit_mapper.noise online: no noisy copies are extracted (the noise is in fit_mapper)
        "extract_features (real)": 10 * 4 * 3 + 3 * 1197,
        # every k trains on the full train split (cached latents), 1000 + 1000 steps
        "augment": 3 * 2656 + 30 * (1000 + 1000) + generated,
        "estimate_normals (generated)": generated,
        "extract_features (generated)": generated * 2,
        "fit_mapper": 10 * (3000 + 1500 + 750) * 2,
        "infer": 3 * 1197,
        "score + evaluate": 3 * 1197 * 2,
    }
    extra = pg.extrapolate(units)
    assert extra["tables"]["MVTec 3D-AD"]["stages"] == stages
    eyecandies = extra["tables"]["Eyecandies"]["stages"]
    assert eyecandies["estimate_normals (real)"] == 10 * (4 + 50)
    assert eyecandies["augment"] == 3 * 10 * 1000 + 30 * 2000 + generated
    assert pg.extrapolate({**units, "dino": None}) == {"missing": ["dino"]}


def test_options_run_after_every_default_part() -> None:
    runs = pg.plan(pg.PARTS, with_options=True)
    defaults = [part.name for part, option in runs if option is None]
    assert defaults == [part.name for part in pg.PARTS]
    first_option = next(i for i, (_, option) in enumerate(runs) if option is not None)
    assert all(option is not None for _, option in runs[first_option:])
    assert all(option in pg.OPTIONS for _, option in runs[first_option:])
    assert pg.plan(pg.PARTS, with_options=False) == [(part, None) for part in pg.PARTS]


def test_a_variant_entry_runs_with_its_overrides_beside_the_default() -> None:
    import torch

    ctx = pg.make_context(REPO / "presets" / "paper.yaml", pg.SMOKE_SIZES, torch.device("cpu"))
    seen = []

    def run(c, option):
        seen.append((c.params.fit_mapper.lr, option))
        return [pg.Row("fit_mapper", "steps", "step", 1.0, 1, None, "mapper_real")]

    rows, _ = pg.run_part(ctx, pg.Part("fit_mapper", run), None)
    assert seen[-1] == (1e-4, None) and (rows[0].option, rows[0].key) == ("default", "mapper_real")
    variant = pg.Part("fit_mapper", run, overrides={"fit_mapper.lr": 0.5}, label="variant")
    rows, _ = pg.run_part(ctx, variant, None)
    # the variant's figures are reported beside the default, not used for the extrapolation
    assert seen[-1] == (0.5, None) and (rows[0].option, rows[0].key) == ("variant", "")
    text = "\n".join(pg.option_table([pg.Row("fit_mapper", "steps", "step", 2.0, 1, None,
                                             "mapper_real"), rows[0]]))
    assert "| variant | 1.00 s | 2.00x |" in text

    def broken(c, option):
        raise ValueError("no such kernel")

    rows, _ = pg.run_part(ctx, pg.Part("fit_mapper", broken), "channels-last")
    assert rows[0].error == "ValueError: no such kernel" and rows[0].option == "channels-last"
