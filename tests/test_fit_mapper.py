"""fit_mapper: training library and stage, on tiny synthetic feature stores.

The helpers here build a whole synthetic project (prepare, features, generated features) in
which the normal-feature layers are a fixed function of the RGB layers; ``test_scoring`` reuses
them. Defective test samples break that relation inside a square region.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.artifacts import StoreWriter
from pipeline.errors import InputError, ParamsError
from pipeline.params import Params, parse_params
from pipeline.training import (
    OnlineNoise,
    StreamData,
    TrainConfig,
    cosine_lr,
    derive_seed,
    mapping_loss,
    train_stream,
)
from stages import fit_mapper, layout

# one intra-op thread (conftest): the tiny mappers' training spends most of its time in
# oversubscribed threads on a shared machine otherwise
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAT = "bagel"  # a real category name: box sizes (3, 5)
CHANNELS = (8, 8, 8)
GRID = 8
SIZE = 32
DEFECT = (slice(1, 4), slice(1, 4))  # grid cells of the synthetic defect


def make_params(architecture: str = "cahfm", steps: int = 60, seed: int = 0,
                score: dict | None = None, infer: dict | None = None, **fit) -> Params:
    return parse_params({
        "data": {"categories": [CAT], "size": SIZE},
        "fewshot": {"shots": [2]},
        "fit_mapper": {"architecture": architecture, "resolution": GRID, "steps": {2: steps},
                       "lr": 1e-2, "lr_min": 1e-4, "seed": seed, **fit},
        "infer": {"batch_size": 4, **(infer or {})},
        "score": {"batch_size": 3, **(score or {})},
    })


LATENT = 4


def relation(channels=CHANNELS, seed: int = 1234):
    """Fixed per-pixel maps from a small latent to each modality's layers."""
    rng = np.random.default_rng(seed)
    rel = {kind: [rng.normal(size=(c, LATENT)) for c in channels] for kind in ("rgb", "real")}
    # Estimated normals approximate the real ones (the score compares them with real features).
    rel["est"] = [a + 0.1 * rng.normal(size=a.shape) for a in rel["real"]]
    return rel


def synth_features(n: int, rng: np.random.Generator, channels=CHANNELS, grid: int = GRID,
                   defective: np.ndarray | None = None) -> dict[str, list[np.ndarray]]:
    """Every modality is a fixed function of one per-pixel latent, so each predicts the others.

    In defective samples the normals inside DEFECT come from another latent: they still look
    like normals but no longer match the RGB.
    """
    rel = relation(channels)
    z = rng.normal(size=(n, LATENT, grid, grid))
    z_other = z.copy()
    if defective is not None:
        for i in np.flatnonzero(defective):
            cells = z[i][(0, *DEFECT)].shape
            z_other[i][(slice(None), *DEFECT)] = rng.normal(size=(LATENT, *cells))
    out = {}
    for kind, mats in rel.items():
        src = z if kind == "rgb" else z_other
        out[kind] = [np.tanh(np.einsum("oc,nchw->nohw", a, src)) for a in mats]
    return out


def write_features(path: Path, ids: list[str], feats: dict[str, list[np.ndarray]],
                   backbone: str = "toy", noisy: int = 0, rng=None,
                   layers: tuple[int, ...] = (0, 1, 2)) -> None:
    channels = [int(a.shape[1]) for a in feats["rgb"]]
    grid = list(feats["rgb"][0].shape[2:])
    attrs = {"ids": ids, "backbone": backbone, "grid": grid, "channels": channels,
             "layers": list(layers)}
    with StoreWriter(path, attrs=attrs) as w:
        for modality, layers in feats.items():
            for layer, arr in enumerate(layers):
                w.write(f"{modality}_{layer}", arr.astype(np.float16))
                if noisy:
                    noise = rng.normal(size=(len(arr), noisy, *arr.shape[1:]))
                    copies = arr[:, None] + 0.01 * noise
                    w.write(f"noisy_{modality}_{layer}", copies.astype(np.float16))


def write_prepare(path: Path, ids: list[str], labels: list[int], with_fg: bool = True) -> None:
    fg = np.zeros((len(ids), SIZE, SIZE), np.uint8)
    fg[:, 2:-2, 2:-2] = 1
    with StoreWriter(path, attrs={"ids": ids, "labels": labels, "category": CAT}) as w:
        if with_fg:
            w.write("fg", fg)
        w.write("rgb", np.zeros((len(ids), SIZE, SIZE, 3), np.uint8))


def write_project(root: Path, n_train: int = 3, n_test: int = 6, n_gen: int = 2,
                  noisy: int = 0, seed: int = 0, test: bool = True) -> dict:
    """All inputs of fit_mapper and score for CAT, k=2, seed 0, under ``root``."""
    rng = np.random.default_rng(seed)
    train_ids = [f"good/{i:03d}" for i in range(n_train)]
    (root / layout.prepared(CAT)).mkdir(parents=True, exist_ok=True)
    (root / layout.prepared(CAT) / "shots.json").write_text(
        json.dumps({"k2-s0": train_ids[:2], "k1-s0": train_ids[:1]}))
    write_prepare(root / layout.prepared(CAT) / "train.zarr", train_ids, [0] * n_train)
    write_features(root / layout.features(CAT) / "train.zarr", train_ids,
                   synth_features(n_train, rng), noisy=noisy, rng=rng)
    gen_ids = [f"gen/good/000/{j}" for j in range(n_gen)]
    gen = synth_features(n_gen, rng)
    del gen["real"]
    write_features(root / layout.features_generated(CAT, 2, 0), gen_ids, gen)
    info = {"train_ids": train_ids, "gen_ids": gen_ids}
    if test:
        labels = [i % 2 for i in range(n_test)]
        test_ids = [f"{'crack' if lab else 'good'}/{i:03d}" for i, lab in enumerate(labels)]
        write_prepare(root / layout.prepared(CAT) / "test.zarr", test_ids, labels)
        write_features(root / layout.features(CAT) / "test.zarr", test_ids,
                       synth_features(n_test, rng, defective=np.array(labels, bool)))
        info.update(test_ids=test_ids, labels=labels)
    return info


MAPPER_FILES = sorted(f"{s}_{d}.safetensors" for s in ("real", "est")
                      for d in ("2d_to_3d", "3d_to_2d"))


# ------------------------------------------------------------------------------ library
def test_cosine_lr_endpoints() -> None:
    assert cosine_lr(0, 100, 1e-2, 1e-4) == pytest.approx(1e-2)
    assert cosine_lr(99, 100, 1e-2, 1e-4) == pytest.approx(1e-4)
    assert cosine_lr(50, 101, 1.0, 0.0) == pytest.approx(0.5)
    lrs = [cosine_lr(s, 20, 1.0, 0.1) for s in range(20)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_mapping_loss_weights_and_mask() -> None:
    t = [torch.ones(1, 2, 2, 2) for _ in range(3)]
    p = [x.clone() for x in t]
    p[1][:, :, 0, 0] = -1.0  # one opposite pixel in layer 1: distance 2 there
    weights = (1.2, 1.0, 0.8)
    assert float(mapping_loss(p, t, weights)) == pytest.approx(1.0 * 2 / 4)
    mask = torch.ones(1, 2, 2)
    mask[0, 0, 0] = 0  # masking the bad pixel removes the loss
    assert float(mapping_loss(p, t, weights, mask)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1  # only the bad pixel counts
    assert float(mapping_loss(p, t, weights, mask)) == pytest.approx(2.0)
    p[2][:, :, 0, 0] = -1.0
    assert float(mapping_loss(p, t, weights)) == pytest.approx(1.0 * 0.5 + 0.8 * 0.5)


@pytest.mark.parametrize("architecture", ["cahfm", "mlp"])
def test_short_training_loss_decreases(architecture: str) -> None:
    rng = np.random.default_rng(0)
    f = synth_features(2, rng)
    data = StreamData([a[:, None] for a in f["rgb"]], [a[:, None] for a in f["real"]])
    cfg = TrainConfig(architecture, GRID, 40, 1e-2, 1e-4, 1e-4, (1.2, 1.0, 0.8), 1)
    result = train_stream(data, cfg, seed=3, device=torch.device("cpu"))
    for direction, losses in result.losses.items():
        assert len(losses) == 40
        first, last = np.mean(losses[:5]), np.mean(losses[-5:])
        assert last < 0.6 * first, (direction, first, last)


def test_derive_seed_differs() -> None:
    assert derive_seed(0, 0, 1) != derive_seed(0, 0, 2)
    assert derive_seed(5, 1) == derive_seed(5, 1)


# -------------------------------------------------------------------------------- stage
def test_stage_writes_mappers_config_and_loss_curve(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    info = write_project(tmp_path, test=False, noisy=2)
    fit_mapper.run(make_params(steps=12), CAT, 2, 0)
    out = layout.mappers(CAT, 2, 0)
    assert sorted(p.name for p in out.iterdir()) == sorted([*MAPPER_FILES, "config.json"])
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp left
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "cahfm"
    assert config["grid"] == [GRID, GRID] and config["channels"] == list(CHANNELS)
    assert config["backbone"] == "toy" and config["resolution"] == GRID
    assert config["shot_ids"] == info["train_ids"][:2]
    assert config["feature_stores"]["generated"]["ids"] == info["gen_ids"]
    assert config["mappers"]["real_2d_to_3d"]["in_channels"] == list(CHANNELS)
    state = load_file(str(out / "est_3d_to_2d.safetensors"))
    assert any(k.startswith("attention.") for k in state)
    rows = layout.loss_curve(CAT, 2, 0).read_text().splitlines()
    assert rows[0] == "step,real_2d_to_3d,real_3d_to_2d,est_2d_to_3d,est_3d_to_2d"
    assert len(rows) == 1 + 12
    cells = [r.split(",") for r in rows[1:]]
    assert [int(c[0]) for c in cells] == list(range(12))
    assert all(0 < float(v) < 10 for c in cells for v in c[1:])


def _digest(root: Path) -> dict[str, bytes]:
    files = [*sorted(layout.mappers(CAT, 2, 0).iterdir()), layout.loss_curve(CAT, 2, 0)]
    return {p.name: (root / p).read_bytes() for p in files}


def test_identical_seeds_give_identical_bytes(tmp_path, monkeypatch) -> None:
    digests = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = tmp_path / run
        root.mkdir()
        monkeypatch.chdir(root)
        write_project(root, test=False)
        fit_mapper.run(make_params(architecture="mlp", steps=8, seed=seed), CAT, 2, 0)
        digests.append(_digest(root))
    assert digests[0] == digests[1]
    assert digests[0]["real_2d_to_3d.safetensors"] != digests[2]["real_2d_to_3d.safetensors"]


def _expect_error(match: str) -> None:
    with pytest.raises(InputError, match=match):
        fit_mapper.run(make_params(steps=2), CAT, 2, 0)
    assert not layout.mappers(CAT, 2, 0).exists()
    assert not layout.loss_curve(CAT, 2, 0).exists()


def test_generated_store_of_other_backbone(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, test=False)
    gen = synth_features(2, np.random.default_rng(1))
    del gen["real"]
    write_features(layout.features_generated(CAT, 2, 0), ["g0", "g1"], gen, backbone="vit")
    _expect_error(r"features_generated/bagel/k2-s0.zarr: feature backbone 'vit' does not match "
                  r"'toy' of artifacts/features/bagel/train.zarr")


def test_generated_store_of_other_widths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, test=False)
    gen = synth_features(2, np.random.default_rng(1), channels=(8, 8, 16))
    del gen["real"]
    write_features(layout.features_generated(CAT, 2, 0), ["g0", "g1"], gen)
    _expect_error(r"k2-s0.zarr: feature channels \[8, 8, 16\] does not match \[8, 8, 8\] of "
                  r"artifacts/features/bagel/train.zarr")


def test_missing_foreground_mask(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    info = write_project(tmp_path, test=False)
    write_prepare(layout.prepared(CAT) / "train.zarr", info["train_ids"], [0] * 3, with_fg=False)
    _expect_error(r"prepare/bagel/train.zarr: no foreground mask array 'fg'.*features/bagel/"
                  r"train.zarr")


def test_shot_not_in_feature_store(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, test=False)
    (layout.prepared(CAT) / "shots.json").write_text(json.dumps({"k2-s0": ["good/000", "x/9"]}))
    _expect_error(r"features/bagel/train.zarr: samples \['x/9'\] listed in "
                  r"artifacts/prepare/bagel/shots.json are not in this store")


def test_bad_params(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, test=False)
    with pytest.raises(ParamsError, match=r"fit_mapper.lr_min: 0.1 is above fit_mapper.lr"):
        fit_mapper.run(make_params(lr_min=0.1), CAT, 2, 0)
    with pytest.raises(ParamsError, match=r"fit_mapper.steps: no step count for k=1"):
        fit_mapper.run(make_params(), CAT, 1, 0)
    assert not layout.mappers(CAT, 2, 0).exists() and not layout.mappers(CAT, 1, 0).exists()


def test_missing_shot_key(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, test=False)
    (layout.prepared(CAT) / "shots.json").write_text(json.dumps({"k1-s0": ["good/000"]}))
    _expect_error(r"shots.json: no shots for 'k2-s0'")


@pytest.mark.parametrize("noise_on", ["source", "both"])
def test_noise_on_source_keeps_targets_clean(monkeypatch, noise_on: str) -> None:
    import pipeline.training as training

    rng = np.random.default_rng(0)
    n, c = 3, (8, 8, 8)
    clean_rgb = [rng.normal(size=(n, 1, k, GRID, GRID)).astype(np.float32) for k in c]
    clean_nrm = [rng.normal(size=(n, 1, k, GRID, GRID)).astype(np.float32) for k in c]
    # Noisy copies far from the clean features, so the mean tells which one a tensor is.
    noisy_rgb = [np.repeat(a, 2, axis=1) + 100.0 for a in clean_rgb]
    noisy_nrm = [np.repeat(a, 2, axis=1) + 200.0 for a in clean_nrm]
    data = StreamData(noisy_rgb, noisy_nrm, None, rgb_clean=clean_rgb, normals_clean=clean_nrm)
    targets: list[float] = []
    sources: list[float] = []
    loss = training.mapping_loss

    def record(pred, target, weights, mask=None):
        targets.append(float(target[0].mean()))
        return loss(pred, target, weights, mask)

    build = training.build_mapper

    def build_and_hook(*args):
        mapper = build(*args)
        mapper.register_forward_pre_hook(lambda m, a: sources.append(float(a[0][0].mean())))
        return mapper

    monkeypatch.setattr(training, "mapping_loss", record)
    monkeypatch.setattr(training, "build_mapper", build_and_hook)
    config = TrainConfig("mlp", GRID, 3, 1e-3, 1e-4, 0.0, (1.2, 1.0, 0.8), 1, noise_on)
    train_stream(data, config, seed=0, device=torch.device("cpu"))
    assert len(targets) == len(sources) == 6  # 3 steps x (2d_to_3d, 3d_to_2d)
    assert all(s > 150 for s in sources[1::2]) and all(90 < s < 110 for s in sources[0::2])
    if noise_on == "source":  # noisy inputs, clean targets (the published placement)
        assert all(abs(t) < 5 for t in targets)
    else:
        assert all(t > 150 for t in targets[0::2]) and all(90 < t < 110 for t in targets[1::2])


def test_stage_noise_on(tmp_path, monkeypatch) -> None:
    digests = {}
    for noise_on, noisy in (("source", 2), ("both", 2), ("source", 0), ("both", 0)):
        root = tmp_path / f"{noise_on}{noisy}"
        root.mkdir()
        monkeypatch.chdir(root)
        write_project(root, test=False, noisy=noisy)
        fit_mapper.run(make_params(architecture="mlp", steps=2, noise_on=noise_on), CAT, 2, 0)
        digests[noise_on, noisy] = _digest(root)
    assert digests["source", 2]["real_2d_to_3d.safetensors"] != digests["both", 2]["real_2d_to_3d.safetensors"]
    # Without noisy copies both placements are the same training, byte for byte.
    same = [k for k in digests["both", 0] if k != "config.json"]  # config records noise_on
    assert [digests["source", 0][k] for k in same] == [digests["both", 0][k] for k in same]


class RecordingEncoder:
    """A frozen stand-in backbone: 1x1 projections of the (noisy) image, pooled to GRID, that
    records what each call receives."""

    def __init__(self, channels=CHANNELS) -> None:
        gen = torch.Generator().manual_seed(5)
        self.weights = [torch.randn(c, 3, generator=gen) for c in channels]
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x, kind, added):
        self.calls.append((kind, x.clone(), None if added is None else added.clone()))
        x = x if added is None else x + added  # the caller normalises; here: identity
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, GRID)
        return [torch.einsum("oc,nchw->nohw", w, pooled) for w in self.weights]


def _online_data(n: int = 3, sigma: float = 0.01, space: str = "normalised"):
    gen = torch.Generator().manual_seed(9)
    rgb, normals = torch.rand(n, 3, 16, 16, generator=gen), torch.rand(n, 3, 16, 16, generator=gen)
    encoder = RecordingEncoder()
    clean = {k: [f.numpy()[:, None] for f in encoder(x, k, None)]
             for k, x in (("rgb", rgb), ("normals", normals))}
    encoder.calls.clear()
    online = OnlineNoise(rgb, normals, encoder, sigma, space)
    return StreamData(clean["rgb"], clean["normals"], online=online), encoder, rgb, normals


@pytest.mark.parametrize("space", ["normalised", "image"])
def test_online_noise_is_fresh_every_step_on_the_inputs_only(monkeypatch, space: str) -> None:
    """fit_mapper.noise online (published, OFFICIAL 15): every step encodes the batch's images
    plus new N(0, sigma) noise; the targets are the clean features."""
    import pipeline.training as training

    data, encoder, rgb, normals = _online_data(space=space)
    targets: list[torch.Tensor] = []
    loss = training.mapping_loss

    def record(pred, target, weights, mask=None):
        targets.append(target[0].clone())
        return loss(pred, target, weights, mask)

    monkeypatch.setattr(training, "mapping_loss", record)
    steps = 4
    config = TrainConfig("mlp", GRID, steps, 1e-3, 1e-4, 0.0, (1.2, 1.0, 0.8), 1, "source")
    train_stream(data, config, seed=0, device=torch.device("cpu"))
    assert [kind for kind, _, _ in encoder.calls] == ["rgb", "normals"] * steps
    noises = []
    for kind, x, added in encoder.calls:
        images = rgb if kind == "rgb" else normals
        if kind == "rgb" and space == "normalised":  # added after the normalisation
            row = next(i for i in range(len(images)) if torch.equal(x[0], images[i]))
            noises.append(added)
        else:  # in [0, 1]: the image itself carries the noise
            assert added is None
            row = int(torch.argmin(((images - x[0]) ** 2).flatten(1).sum(1)))
            noises.append(x - images[row : row + 1])
    eps = torch.stack(noises)
    assert 0.008 < float(eps.std()) < 0.012 and abs(float(eps.mean())) < 1e-3
    # fresh: no two steps share their noise
    assert all(not torch.allclose(eps[i], eps[j]) for i in range(len(eps)) for j in range(i))
    # targets: the stored clean features of the step's sample, exactly
    clean = {k: torch.from_numpy(np.stack(f[0][:, 0])) for k, f in
             (("normals", data.normals), ("rgb", data.rgb))}
    for t in targets[0::2]:  # 2d_to_3d: clean normals
        assert any(torch.equal(t[0], c) for c in clean["normals"])
    for t in targets[1::2]:
        assert any(torch.equal(t[0], c) for c in clean["rgb"])


def test_online_noise_is_seeded() -> None:
    config = TrainConfig("mlp", GRID, 3, 1e-3, 1e-4, 0.0, (1.2, 1.0, 0.8), 1, "source")
    runs = []
    for seed in (0, 0, 1):
        data, _, _, _ = _online_data()
        result = train_stream(data, config, seed=seed, device=torch.device("cpu"))
        runs.append(result.losses["2d_to_3d"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _image_project(n_train: int = 3, n_gen: int = 2, size: int = 64) -> None:
    """Every store fit_mapper.noise online reads, with images (k = 2, seed 0), and their
    features made by the extract_features stage with the demo backbone."""
    from stages import extract_features

    rng = np.random.default_rng(3)
    ids = {"train": [f"good/{i:03d}" for i in range(n_train)], "test": ["crack/000"]}
    for split, split_ids in ids.items():
        n = len(split_ids)
        fg = np.zeros((n, size, size), np.uint8)
        fg[:, 8:-8, 8:-8] = 1
        with StoreWriter(layout.prepared(CAT) / f"{split}.zarr",
                         attrs={"ids": split_ids, "labels": [0] * n}) as w:
            w.write("rgb", rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
            w.write("normals", rng.random((n, size, size, 3)).astype(np.float16))
            w.write("fg", fg)
        with StoreWriter(layout.normals(CAT) / f"{split}.zarr", attrs={"ids": split_ids}) as w:
            w.write("normals", rng.random((n, size, size, 3)).astype(np.float16))
    (layout.prepared(CAT) / "shots.json").write_text(json.dumps({"k2-s0": ids["train"][:2]}))
    gen_ids = [f"gen/good/000/{j}" for j in range(n_gen)]
    with StoreWriter(layout.augmented(CAT, 2, 0) / "generated.zarr", attrs={"ids": gen_ids}) as w:
        w.write("rgb", rng.integers(0, 256, (n_gen, size, size, 3), dtype=np.uint8))
    with StoreWriter(layout.normals_generated(CAT, 2, 0), attrs={"ids": gen_ids}) as w:
        w.write("normals", rng.random((n_gen, size, size, 3)).astype(np.float16))
    params = _online_params()
    extract_features.run(params, CAT)
    extract_features.run(params, CAT, 2, 0)


def _online_params(noise: str = "online", **features) -> Params:
    return parse_params({
        "data": {"categories": [CAT], "size": 64},
        "fewshot": {"shots": [2]},
        "models": {"backbone": "efficientnet_lite0"},
        "extract_features": {"layers": [2, 3, 4], "feature_dtype": "float32", **features},
        "fit_mapper": {"architecture": "mlp", "resolution": 8, "steps": {2: 3}, "lr": 1e-2,
                       "lr_min": 1e-4, "noise": noise, "noise_on": "source"},
    })


def test_stage_online_noise_through_the_backbone(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _image_project()
    digests = []
    for noise in ("online", "online", "copies"):
        fit_mapper.run(_online_params(noise), CAT, 2, 0)
        digests.append(_digest(tmp_path))
    assert digests[0] == digests[1]  # seeded: byte-identical
    weights = "real_2d_to_3d.safetensors"
    assert digests[0][weights] != digests[2][weights]  # the noise reached the mapper inputs
    config = json.loads((layout.mappers(CAT, 2, 0) / "config.json").read_text())
    assert config["provenance"]["params"]["noise"] == "copies"

    # The stored features must come from the backbone that online runs (here: other weights).
    import pipeline.models.backbones as backbones

    monkeypatch.setattr(backbones, "efficientnet_lite0",
                        lambda layers: backbones.random_backbone("efficientnet_lite0", layers))
    with pytest.raises(InputError, match="configured backbone .* re-run extract_features"):
        fit_mapper.run(_online_params(), CAT, 2, 0)


def test_online_noise_refuses_stored_copies() -> None:
    with pytest.raises(ParamsError, match="extract_features.noisy_copies: 2 copies"):
        _online_params(noisy_copies=2)
    _online_params("copies", noisy_copies=2)  # the copies mode reads them
