"""Released CMDS-AD checkpoints: conversion, strict checks, refusal of unsafe files (pipeline/official.py).

The checkpoints here are written by the test in the official layout: our CAHFM's state dict
renamed to the published module names by a table written out below (independently of the
library's), saved with ``torch.save`` as the published training scripts do.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.inference import load_mappers
from pipeline.models.mapper import CAHFM
from pipeline.official import convert_state, import_official, read_checkpoint
from pipeline.params import parse_params
from stages import fit_mapper, infer, layout
from stages.cli import app
from tests.test_fit_mapper import synth_features, write_features, write_prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAT = "bagel"
WIDTH = 16  # the smallest the published layout allows: GroupNorm(8, D) and D // 2 for the selector
OURS_TO_OFFICIAL = {
    "project.0.": "proc_l4.", "project.1.": "proc_l7.", "project.2.": "proc_l11.",
    "attention.encode.": "coord_att.conv1.", "attention.norm.": "coord_att.bn1.",
    "attention.attend_h.": "coord_att.conv_h.", "attention.attend_w.": "coord_att.conv_w.",
    "selector.": "spatial_selector.", "head.": "fusion_head.",
}
# The published HierarchicalGatedMapper's state dict (train_2d_to_3d_mvtec3dad.py): three
# Conv+GroupNorm projections, coordinate attention (conv1, bn1, conv_h, conv_w), the spatial
# selector (conv, ReLU, conv) and the fusion head (conv, GroupNorm, GELU, conv).
OFFICIAL_KEYS = sorted(
    [f"proc_l{i}.{j}.{p}" for i in (4, 7, 11) for j in (0, 1) for p in ("weight", "bias")]
    + [f"coord_att.{m}.{p}" for m in ("conv1", "conv_h", "conv_w") for p in ("weight", "bias")]
    + [f"coord_att.bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var",
                                       "num_batches_tracked")]
    + [f"spatial_selector.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")]
    + [f"fusion_head.{j}.{p}" for j in (0, 1, 3) for p in ("weight", "bias")]
)
FILES = {  # our mapper -> (official folder tag, file)
    "real_2d_to_3d": ("2dto3d", "model_real_2d23d_final.pth"),
    "est_2d_to_3d": ("2dto3d", "model_est_2d23d_final.pth"),
    "real_3d_to_2d": ("3dto2d", "model_real_3d22d_final.pth"),
    "est_3d_to_2d": ("3dto2d", "model_est_3d22d_final.pth"),
}


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        prefix = next(p for p in OURS_TO_OFFICIAL if key.startswith(p))
        out[OURS_TO_OFFICIAL[prefix] + key[len(prefix):]] = value.clone()
    return out


def random_mapper(seed: int, width: int = WIDTH) -> CAHFM:
    torch.manual_seed(seed)
    mapper = CAHFM([width] * 3, [width] * 3)
    with torch.no_grad():  # non-trivial BatchNorm statistics: they must be carried over too
        mapper.attention.norm.running_mean.normal_()
        mapper.attention.norm.running_var.uniform_(0.5, 2.0)
        mapper.attention.norm.num_batches_tracked.fill_(seed + 7)
    return mapper.eval()


def write_release(root: Path, category: str = CAT, shots: int = 2, prefix: str = "checkpoints_dual",
                  legacy: bool = False) -> dict[str, CAHFM]:
    """Four random mappers saved as the published scripts save them; returns them by our name."""
    mappers = {}
    for i, (name, (tag, filename)) in enumerate(FILES.items()):
        tag = f"{tag}_new3" if legacy else tag
        folder = root / "checkpoints" / f"{prefix}_{tag}_{category}_{shots}shot"
        folder.mkdir(parents=True, exist_ok=True)
        mappers[name] = random_mapper(seed=i)
        torch.save(to_official(mappers[name].state_dict()), folder / filename)
    return mappers


def release_file(root: Path, name: str, shots: int = 2) -> Path:
    tag, filename = FILES[name]
    return root / "checkpoints" / f"checkpoints_dual_{tag}_{CAT}_{shots}shot" / filename


def features(seed: int, n: int = 2, width: int = WIDTH, grid: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, grid, grid, generator=g) for _ in range(3)]


# ------------------------------------------------------------------------- key layout at 768
def test_real_width_key_layout_loads_strictly(tmp_path):
    mapper = CAHFM([768] * 3, [768] * 3)
    assert sum(p.numel() for p in mapper.parameters()) == 17_325_531
    official = to_official(mapper.state_dict())
    assert sorted(official) == OFFICIAL_KEYS and len(OFFICIAL_KEYS) == 33
    assert official["coord_att.conv1.weight"].shape == (72, 2304, 1, 1)  # mip = 2304 // 32
    assert official["fusion_head.3.weight"].shape == (2304, 768, 1, 1)
    path = tmp_path / "model_real_2d23d_final.pth"
    torch.save(official, path)
    state, c_in, c_out = convert_state(read_checkpoint(path), path)
    assert c_in == c_out == [768] * 3
    fresh = CAHFM([768] * 3, [768] * 3)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in mapper.state_dict().items())


# --------------------------------------------------------------------------- conversion
def test_converted_folder_gives_identical_outputs(tmp_path):
    originals = write_release(tmp_path / "release")
    out = tmp_path / "mappers"
    config = import_official(tmp_path / "release", "mvtec3d", CAT, 2, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.safetensors" for n in FILES] + ["config.json"])
    assert config == json.loads((out / "config.json").read_text())
    assert config["architecture"] == "cahfm" and config["resolution"] == 224
    assert config["backbone"] == "vit_base_patch8_224.dino" and config["layers"] == [4, 7, 11]
    assert config["mappers"]["est_3d_to_2d"]["source"] == "est"
    assert config["mappers"]["real_2d_to_3d"]["target"] == "real"
    files = config["official"]["files"]
    assert files["est_3d_to_2d"]["file"] == f"checkpoints_dual_3dto2d_{CAT}_2shot/model_est_3d22d_final.pth"
    _, loaded = load_mappers(out)  # what infer reads
    x = features(seed=3)
    with torch.no_grad():
        for name, original in originals.items():
            for got, want in zip(loaded[name](x), original(x), strict=True):
                assert torch.equal(got, want), name
    # Distinct weights per file: each official file went to its own mapper.
    with torch.no_grad():
        a, b = loaded["real_2d_to_3d"](x)[0], loaded["est_2d_to_3d"](x)[0]
    assert not torch.equal(a, b)


def test_same_release_gives_identical_bytes(tmp_path):
    write_release(tmp_path / "release")
    import_official(tmp_path / "release", "mvtec3d", CAT, 2, tmp_path / "a")
    import_official(tmp_path / "release", "mvtec3d", CAT, 2, tmp_path / "b")
    for p in sorted((tmp_path / "a").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_eyecandies_and_older_folder_names(tmp_path):
    write_release(tmp_path / "eye", category="Lollipop", shots=4,
                  prefix="checkpoints_eyecandies_dual")
    import_official(tmp_path / "eye", "eyecandies", "Lollipop", 4, tmp_path / "out_eye")
    assert (tmp_path / "out_eye" / "config.json").is_file()
    write_release(tmp_path / "old", legacy=True)
    # The folders may also sit directly under the root (the checkpoints/ folder given itself).
    config = import_official(tmp_path / "old" / "checkpoints", "mvtec3d", CAT, 2, tmp_path / "out")
    assert "_new3_" in config["official"]["files"]["real_2d_to_3d"]["file"]
    with pytest.raises(InputError, match=r"checkpoints_eyecandies_dual_2dto3d_Lollipop_1shot: "
                                         r"checkpoint folder not found"):
        import_official(tmp_path / "eye", "eyecandies", "Lollipop", 1, tmp_path / "none")
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------- refusals
def _refused(root: Path, out: Path, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        import_official(root, "mvtec3d", CAT, 2, out)
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())  # no temp


def _edit(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_missing_extra_and_misshapen_keys_name_file_and_key(tmp_path):
    root, out = tmp_path / "release", tmp_path / "out"
    write_release(root)
    path = release_file(root, "est_3d_to_2d")
    _edit(path, lambda s: s.pop("coord_att.bn1.running_var"))
    _refused(root, out, ModelError, rf"{path}: key 'coord_att.bn1.running_var' missing")
    write_release(root)
    path = release_file(root, "real_2d_to_3d")
    _edit(path, lambda s: s.__setitem__("proc_l4.2.weight", torch.zeros(3)))
    _refused(root, out, ModelError, rf"{path}: unexpected key 'proc_l4.2.weight'")
    write_release(root)
    path = release_file(root, "est_2d_to_3d")
    _edit(path, lambda s: s.__setitem__("fusion_head.3.weight", torch.zeros(WIDTH, WIDTH, 1, 1)))
    _refused(root, out, ModelError,
             rf"{path}: key 'fusion_head.3.weight' has shape \(16, 16, 1, 1\), expected \(48, 16, 1, 1\)")
    # Keys of another architecture (our own names, or the PixelMLP) are not the official layout.
    write_release(root)
    path = release_file(root, "real_3d_to_2d")
    torch.save(random_mapper(0).state_dict(), path)
    _refused(root, out, ModelError, rf"{path}: key 'proc_l4.0.weight' missing")


def test_missing_file_is_named(tmp_path):
    root = tmp_path / "release"
    write_release(root)
    path = release_file(root, "est_3d_to_2d")
    path.unlink()
    _refused(root, tmp_path / "out", InputError, rf"{path}: checkpoint file not found")


def test_not_a_plain_state_dict_is_refused(tmp_path):
    root, out = tmp_path / "release", tmp_path / "out"
    write_release(root)
    path = release_file(root, "real_2d_to_3d")
    state = torch.load(path, weights_only=True)
    torch.save({"state_dict": state, "step": 3000}, path)
    _refused(root, out, ModelError, rf"{path}: refused: not a plain state dict .*'state_dict'")
    torch.save([state], path)
    _refused(root, out, ModelError, rf"{path}: refused: holds a list")
    path.write_bytes(b"not a checkpoint")
    _refused(root, out, ModelError, rf"{path}: cannot read checkpoint")


class Payload:
    """A pickle that creates a file when it is unpickled (what a hostile .pth would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    root = tmp_path / "release"
    write_release(root)
    path = release_file(root, "real_3d_to_2d")
    state = torch.load(path, weights_only=True)
    state["fusion_head.0.bias"] = Payload(marker)
    torch.save(state, path)
    _refused(root, tmp_path / "out", ModelError, rf"{path}: refused: not a plain state dict")
    assert not marker.exists()


# ---------------------------------------------------------------------------------- CLI
def test_cli_import_official(tmp_path):
    runner = CliRunner()
    root, out = tmp_path / "release", tmp_path / "out"
    write_release(root)
    result = runner.invoke(app, ["import-official", str(root), "--category", CAT, "--shots", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "four mappers converted" in result.output and (out / "config.json").is_file()
    path = release_file(root, "est_2d_to_3d")
    path.unlink()
    result = runner.invoke(app, ["import-official", str(root), "--category", CAT, "--shots", "2",
                                 "--out", str(tmp_path / "out2")])
    assert result.exit_code == 1
    assert f"error: {path}: checkpoint file not found" in result.output
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------- presets and the DVC path
def official_params(**over) -> object:
    raw = {
        "data": {"categories": [CAT], "size": 224},
        "fewshot": {"shots": [2]},
        "models": {"backbone": "vit_base_patch8_224.dino"},
        "extract_features": {"layers": [4, 7, 11]},
        "fit_mapper": {"mappers": "official", "checkpoints": "release", "resolution": 224},
        "infer": {"distance": "concatenated", "batch_size": 2},
        "estimate_normals": {"flip_x": False},  # the published (Marigold) frame
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return parse_params(raw)




def test_inconsistent_preset_names_the_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_release(tmp_path / "release")  # fit_mapper.checkpoints must hold the release
    official_params()  # the published setup is accepted
    official_params(models__backbone="vit_base_patch8_224.dino@/models/dino.safetensors")
    with pytest.raises(ParamsError, match=r"fit_mapper.mappers=official: .*inconsistent: "
                                          r"models.backbone='efficientnet_lite0'.*infer.distance="
                                          r"'layerwise' \(need 'concatenated'\)"):
        official_params(models__backbone="efficientnet_lite0", infer__distance="layerwise")
    with pytest.raises(ParamsError, match=r"extract_features.layers=\[2, 3, 4\].*"
                                          r"fit_mapper.resolution=28"):
        official_params(extract_features__layers=[2, 3, 4], fit_mapper__resolution=28)
    with pytest.raises(ParamsError, match=r"fit_mapper.architecture='mlp'"):
        official_params(fit_mapper__architecture="mlp")


def test_official_checkpoints_need_marigolds_own_frame():
    with pytest.raises(ParamsError, match=r"estimate_normals.flip_x=True \(need false"):
        official_params(estimate_normals__flip_x=True)


def write_stores(root: Path, backbone: str = "vit_base_patch8_224.dino", n_test: int = 2) -> None:
    rng = np.random.default_rng(0)
    train_ids = ["good/000", "good/001"]
    write_features(root / layout.features(CAT) / "train.zarr", train_ids,
                   synth_features(2, rng, channels=(WIDTH,) * 3, grid=28),
                   backbone=backbone, layers=(4, 7, 11))
    test_ids = [f"good/{i:03d}" for i in range(n_test)]
    write_features(root / layout.features(CAT) / "test.zarr", test_ids,
                   synth_features(n_test, rng, channels=(WIDTH,) * 3, grid=28),
                   backbone=backbone, layers=(4, 7, 11))
    write_prepare(root / layout.prepared(CAT) / "test.zarr", test_ids, [0] * n_test)


def test_fit_mapper_converts_instead_of_training_and_infer_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    originals = write_release(tmp_path / "release")
    write_stores(tmp_path)
    params = official_params()
    fit_mapper.run(params, CAT, 2, 0)
    out = layout.mappers(CAT, 2, 0)
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "vit_base_patch8_224.dino" and config["channels"] == [WIDTH] * 3
    assert config["provenance"]["params"]["mappers"] == "official"
    rows = layout.loss_curve(CAT, 2, 0).read_text().splitlines()
    assert rows == ["step,real_2d_to_3d,real_3d_to_2d,est_2d_to_3d,est_3d_to_2d"]
    _, loaded = load_mappers(out)
    x = features(seed=5)
    with torch.no_grad():
        assert torch.equal(loaded["est_3d_to_2d"](x)[2], originals["est_3d_to_2d"](x)[2])
    infer.run(params, CAT, 2, 0)
    from pipeline.artifacts import open_store

    streams = open_store(layout.streams(CAT, 2, 0))
    assert streams["psi3d_est"].shape[0] == 2
    assert np.isfinite(streams["psi2d_real"][:].astype(np.float32)).all()


def test_cli_imported_folder_runs_through_infer_and_checks_the_backbone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_release(tmp_path / "release")
    import_official(tmp_path / "release", "mvtec3d", CAT, 2, layout.mappers(CAT, 2, 0))
    write_stores(tmp_path)
    infer.run(official_params(), CAT, 2, 0)
    assert layout.streams(CAT, 2, 0).exists()
    write_stores(tmp_path, backbone="efficientnet_lite0")
    with pytest.raises(InputError, match=r"test.zarr: features of backbone 'efficientnet_lite0'"):
        infer.run(official_params(), CAT, 2, 0)


def test_fit_mapper_refuses_features_of_another_backbone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_release(tmp_path / "release")
    write_stores(tmp_path, backbone="random:vit_base_patch8_224.dino")
    with pytest.raises(InputError, match=r"train.zarr: features of backbone "
                                         r"'random:vit_base_patch8_224.dino'"):
        fit_mapper.run(official_params(), CAT, 2, 0)
    assert not layout.mappers(CAT, 2, 0).exists()


def test_released_route_runs_no_stage_whose_output_is_unused(tmp_path):
    """With released mappers the graph itself has no augment, generated-normals,
    generated-features or training instance; fit_mapper_released converts instead."""
    from tools.scratch_project import clone_repository, sh, write_params

    project = clone_repository(tmp_path / "project")
    unused = {"augment", "estimate_normals_generated", "extract_features_generated", "fit_mapper"}

    def instances() -> dict[str, int]:
        out = sh(["dvc", "stage", "list", "upstream/dvc.yaml"], project).stdout
        names = [line.split()[0].split(":")[1].split("@")[0] for line in out.splitlines() if line]
        return {n: names.count(n) for n in set(names)}

    write_params(project, {"data.categories": ["a", "b"], "demo_data.categories": ["a", "b"],
                           "fewshot.shots": [1, 2], "fewshot.seeds": [0],
                           "fit_mapper.steps": {1: 1, 2: 1}})
    trained = instances()
    assert all(trained[n] == 4 for n in unused) and "fit_mapper_released" not in trained
    write_params(project, {"fit_mapper.mappers": "official", "fit_mapper.trained_seeds": [],
                           "fit_mapper.released_seeds": [0]})
    released = instances()
    assert not unused & set(released) and released["fit_mapper_released"] == 4
    assert released["infer"] == trained["infer"] == 4
    assert sum(trained.values()) - sum(released.values()) == 4 * 3  # 3 unused stages per (c, k)
    # and DVC builds the whole graph (no dependency on an output nobody produces)
    dag = sh(["dvc", "dag", "upstream/dvc.yaml:infer@a-1-0"], project).stdout
    assert "fit_mapper_released@a-1-0" in dag and "augment" not in dag
    assert _unproduced_artifacts(project) == []


def _unproduced_artifacts(project: Path) -> list[str]:
    """Dependencies under artifacts/ that no stage instance of the graph writes (`dvc repro`
    would stop at them as missing)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)
        outs = [Path(o.fs_path) for stage in stages for o in stage.outs]
        root = Path(repo.root_dir) / "artifacts"
        return sorted(f"{stage.addressing}: {dep.def_path}" for stage in stages
                      for dep in stage.deps if root in Path(dep.fs_path).parents
                      and not any(o == Path(dep.fs_path) or o in Path(dep.fs_path).parents
                                  for o in outs))
