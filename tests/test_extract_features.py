"""The extract_features stage on tiny synthetic stores (demo EfficientNet-Lite0 backbone, 64 x 64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stages.extract_features as stage
from pipeline.artifacts import StoreWriter, open_store
from pipeline.errors import InputError, ParamsError
from pipeline.features import IMAGENET_MEAN, IMAGENET_STD, Noise, sample_noise
from pipeline.models.backbones import load_backbone
from pipeline.params import parse_params
from stages import layout

CAT = "bagel"
S = 64  # EfficientNet takes any size: a 64 x 64 image gives an 8 x 8 stride-8 grid


def make_params(**features) -> object:
    section = {"layers": [2, 3, 4], "batch_size": 2, **features}
    return parse_params(
        {"data": {"categories": [CAT]}, "models": {"backbone": "efficientnet_lite0"}, "extract_features": section}
    )


def write_real(n_train: int = 3, n_test: int = 3, seed: int = 0, size: int = S) -> dict:
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ids = [f"good/{i:03d}" for i in range(n)] if split == "train" else [f"crack/{i:03d}" for i in range(n)]
        labels = [0] * n if split == "train" else [1] * n
        rgb = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        real = rng.random((n, size, size, 3)).astype(np.float16)
        est = rng.random((n, size, size, 3)).astype(np.float16)
        types = ["good" if label == 0 else "crack" for label in labels]
        attrs = {"ids": ids, "labels": labels, "defect_types": types}
        with StoreWriter(layout.prepared(CAT) / f"{split}.zarr", attrs=attrs) as w:
            w.write("rgb", rgb)
            w.write("normals", real)
        with StoreWriter(layout.normals(CAT) / f"{split}.zarr", attrs={"ids": ids}) as w:
            w.write("normals", est)
        data[split] = {"ids": ids, "labels": labels, "types": types, "rgb": rgb, "real": real, "est": est}
    return data


def write_generated(n: int, shots: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(10 + n)
    ids = [f"gen/good/000/{j}" for j in range(n)]
    rgb = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    est = rng.random((n, S, S, 3)).astype(np.float16)
    with StoreWriter(layout.augmented(CAT, shots, seed) / "generated.zarr",
                     attrs={"ids": ids, "source_ids": ["good/000"] * n}) as w:
        w.write("rgb", rgb)
    with StoreWriter(layout.normals_generated(CAT, shots, seed), attrs={"ids": ids}) as w:
        w.write("normals", est)
    return {"ids": ids, "rgb": rgb, "est": est}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("efficientnet_lite0", [2, 3, 4])


def reference(backbone, images: np.ndarray, rgb: bool) -> list[np.ndarray]:
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    if rgb:
        x = x / 255
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return [m.numpy() for m in backbone(x)]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_real_features_match_the_backbone(workdir, backbone):
    data = write_real(n_train=3, n_test=5)  # 5 with batch 2: a short last batch
    stage.run(make_params(), CAT)
    for split in ("train", "test"):
        store = open_store(layout.features(CAT) / f"{split}.zarr")
        n = len(data[split]["ids"])
        assert store.attrs["ids"] == data[split]["ids"] and store.attrs["labels"] == data[split]["labels"]
        assert store.attrs["defect_types"] == data[split]["types"]
        assert store.attrs["backbone"] == "efficientnet_lite0" and store.attrs["layers"] == [2, 3, 4]
        assert store.attrs["grid"] == [8, 8] and store.attrs["channels"] == [40, 112, 320]
        assert store.attrs["stage"] == "extract_features" and store.attrs["split"] == split
        assert sorted(store.names()) == sorted(f"{m}_{l}" for m in ("rgb", "real", "est") for l in range(3))
        for modality, is_rgb in (("rgb", True), ("real", False), ("est", False)):
            ref = reference(backbone, data[split][modality], rgb=is_rgb)
            for layer, c in enumerate((40, 112, 320)):
                got = store[f"{modality}_{layer}"][:]
                assert got.dtype == np.float16 and got.shape == (n, c, 8, 8)
                np.testing.assert_allclose(got.astype(np.float32), ref[layer], rtol=1e-2, atol=1e-2)
    # Normals are fed without ImageNet normalisation: normalising them would change the features.
    wrong = reference(backbone, data["test"]["real"].astype(np.float32) * 255, rgb=True)[0]
    got = open_store(layout.features(CAT) / "test.zarr")["real_0"][:].astype(np.float32)
    assert np.abs(got - wrong).max() > 0.1


def test_float32_features_are_the_backbone_output_as_computed(workdir, backbone):
    """extract_features.feature_dtype float32 (the published training's precision) stores the
    float32 backbone output itself, noisy copies included; float16 is its rounding."""
    data = write_real(n_train=3, n_test=2)
    stage.run(make_params(feature_dtype="float32", noisy_copies=1, batch_size=4), CAT)
    full = open_store(layout.features(CAT) / "train.zarr")
    ref = reference(backbone, data["train"]["rgb"], rgb=True)
    for layer in range(3):
        assert full[f"rgb_{layer}"].dtype == np.float32
        assert full[f"noisy_rgb_{layer}"].dtype == np.float32
        np.testing.assert_allclose(full[f"rgb_{layer}"][:], ref[layer], rtol=1e-4, atol=1e-4)
    full = {name: full[name][:] for name in ("rgb_0", "real_2", "noisy_est_1")}
    stage.run(make_params(noisy_copies=1, batch_size=4), CAT)
    half = open_store(layout.features(CAT) / "train.zarr")
    for name in ("rgb_0", "real_2", "noisy_est_1"):
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(half[name][:], full[name].astype(np.float16))


def test_identical_inputs_give_byte_identical_stores(workdir):
    write_real()
    params = make_params(noisy_copies=1)
    stage.run(params, CAT)
    first = files(layout.features(CAT))
    stage.run(params, CAT)
    second = files(layout.features(CAT))
    assert first.keys() == second.keys() and len(first) > 4
    assert first == second


def test_noisy_copies_for_train_only_and_independent_of_batch_size(workdir, backbone):
    data = write_real(n_train=3, n_test=2)
    stage.run(make_params(noisy_copies=2, noise_sigma=0.05, batch_size=2), CAT)
    train = open_store(layout.features(CAT) / "train.zarr")
    test = open_store(layout.features(CAT) / "test.zarr")
    assert not any(name.startswith("noisy_") for name in test.names())
    clean, noisy = train["rgb_0"][:].astype(np.float32), train["noisy_rgb_0"][:].astype(np.float32)
    assert noisy.shape == (3, 2, 40, 8, 8) and train["noisy_est_2"].shape == (3, 2, 320, 8, 8)
    assert train.attrs["noisy_copies"] == 2
    assert np.abs(noisy[:, 0] - noisy[:, 1]).max() > 0  # copies differ
    assert np.abs(noisy[:, 0] - clean).max() > 0
    # Small input noise: noisy features stay near the clean ones.
    assert np.abs(noisy[:, 0] - clean).mean() < 0.5 * np.abs(clean).mean()
    # Noise of std sigma is added in [0, 1] image space; normals are then fed unnormalised.
    noise = Noise(copies=2, sigma=0.05, seed=0, tag=f"{CAT}/train")
    for i in range(3):
        eps = sample_noise(noise, i, "real", (3, S, S))
        x = torch.from_numpy(data["train"]["real"][i].astype(np.float32)).permute(2, 0, 1)
        with torch.inference_mode():
            ref = backbone(x[None] + eps)[0].numpy()  # both copies as a batch of two
        got = train["noisy_real_0"][i].astype(np.float32)
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)
    # The noise of a sample does not depend on the batch it falls in (features agree up to
    # float rounding, which differs with the batch size); another seed gives other noise.
    stage.run(make_params(noisy_copies=2, noise_sigma=0.05, batch_size=3), CAT)
    rebatched = open_store(layout.features(CAT) / "train.zarr")["noisy_rgb_0"][:].astype(np.float32)
    np.testing.assert_allclose(rebatched, noisy, rtol=1e-2, atol=1e-2)
    stage.run(make_params(noisy_copies=2, noise_sigma=0.05, batch_size=3, seed=1), CAT)
    reseeded = open_store(layout.features(CAT) / "train.zarr")["noisy_rgb_0"][:].astype(np.float32)
    assert np.abs(reseeded - noisy).max() > 0.1


def test_generated_features(workdir, backbone):
    data = write_generated(3)
    stage.run(make_params(), CAT, shots=1, seed=0)
    store = open_store(layout.features_generated(CAT, 1, 0))
    assert sorted(store.names()) == sorted(f"{m}_{l}" for m in ("rgb", "est") for l in range(3))
    assert store.attrs["ids"] == data["ids"] and store.attrs["labels"] == [0, 0, 0]
    assert store.attrs["source_ids"] == ["good/000"] * 3
    ref = reference(backbone, data["est"], rgb=False)
    np.testing.assert_allclose(store["est_1"][:].astype(np.float32), ref[1], rtol=1e-2, atol=1e-2)


def test_zero_generated_images_give_an_empty_store(workdir):
    write_generated(0, shots=2)
    stage.run(make_params(noisy_copies=1), CAT, shots=2, seed=0)
    store = open_store(layout.features_generated(CAT, 2, 0))
    assert len(store) == 0 and store.attrs["ids"] == []
    assert store["rgb_0"].shape == (0, 40, 8, 8) and store["noisy_est_2"].shape == (0, 1, 320, 8, 8)
    assert store.attrs["grid"] == [8, 8] and store.attrs["channels"] == [40, 112, 320]


@pytest.mark.parametrize(
    ("remove", "maker"), [("prepare", "prepare"), ("normals", "estimate_normals")]
)
def test_missing_input_store_names_path_and_stage(workdir, remove, maker):
    write_real()
    path = (layout.prepared(CAT) if remove == "prepare" else layout.normals(CAT)) / "test.zarr"
    (path / "zarr.json").unlink()
    with pytest.raises(InputError) as err:
        stage.run(make_params(), CAT)
    assert str(path) in str(err.value) and f"`{maker}`" in str(err.value)
    assert not layout.features(CAT).exists()


def test_missing_generated_store_names_augment(workdir):
    with pytest.raises(InputError, match=r"augment.*k1-s0.*`augment` stage.*cmds-ad augment bagel --shots 1"):
        stage.run(make_params(), CAT, shots=1, seed=0)


def test_ids_that_differ_name_both_files(workdir):
    write_real()
    ids = ["good/000", "good/001", "good/999"]
    with StoreWriter(layout.normals(CAT) / "train.zarr", attrs={"ids": ids}) as w:
        w.write("normals", np.zeros((3, S, S, 3), np.float16))
    with pytest.raises(InputError) as err:
        stage.run(make_params(), CAT)
    message = str(err.value)
    assert str(layout.prepared(CAT) / "train.zarr") in message
    assert str(layout.normals(CAT) / "train.zarr") in message
    assert not layout.features(CAT).exists()


@pytest.mark.parametrize(
    ("array", "bad", "pattern"),
    [
        ("normals", np.zeros((3, 32, 32, 3), np.float16), "32x32"),
        ("normals", np.zeros((3, S, S, 4), np.float16), r"\(N, H, W, 3\)"),
        ("normals", np.zeros((2, S, S, 3), np.float16), "2 images but 3 ids"),
    ],
)
def test_wrong_image_shapes(workdir, array, bad, pattern):
    write_real()
    with StoreWriter(layout.normals(CAT) / "test.zarr", attrs={"ids": [f"crack/{i:03d}" for i in range(3)]}) as w:
        w.write(array, bad)
    with pytest.raises(InputError, match=pattern) as err:
        stage.run(make_params(), CAT)
    assert str(layout.normals(CAT) / "test.zarr") in str(err.value)


def test_wrong_rgb_dtype(workdir):
    write_real()
    with StoreWriter(layout.prepared(CAT) / "test.zarr", attrs={"ids": [f"crack/{i:03d}" for i in range(3)]}) as w:
        w.write("rgb", np.zeros((3, S, S, 3), np.float32))
        w.write("normals", np.zeros((3, S, S, 3), np.float16))
    with pytest.raises(InputError, match="expected uint8 RGB"):
        stage.run(make_params(), CAT)


def test_vit_backbone_rejects_other_image_sizes(workdir):
    write_real()
    params = parse_params({
        "data": {"categories": [CAT]},
        "models": {"backbone": "random:vit_small_patch8_224"},
        "extract_features": {"layers": [4, 7, 11]},
    })
    with pytest.raises(InputError, match="64x64 but backbone 'random:vit_small_patch8_224' takes 224x224"):
        stage.run(params, CAT)
    assert not layout.features(CAT).exists()


def test_failure_mid_way_leaves_no_store(workdir):
    data = write_real(n_train=3, n_test=5)
    est = data["test"]["est"].copy()
    est[4, 0, 0, 0] = np.nan  # the last batch of the last split
    with StoreWriter(layout.normals(CAT) / "test.zarr", attrs={"ids": data["test"]["ids"]}) as w:
        w.write("normals", est)
    with pytest.raises(InputError, match=r"normals/bagel/test.zarr/normals.*NaN"):
        stage.run(make_params(), CAT)
    assert not layout.features(CAT).exists()
    leftovers = [p.name for p in (workdir / "artifacts").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_unencoded_normals_are_rejected(workdir):
    data = write_real()
    with StoreWriter(layout.normals(CAT) / "train.zarr", attrs={"ids": data["train"]["ids"]}) as w:
        w.write("normals", (data["train"]["est"] * 2 - 1).astype(np.float16))  # raw n in [-1, 1]
    with pytest.raises(InputError, match=r"normals/bagel/train.zarr/normals.*outside \[0, 1\]"):
        stage.run(make_params(), CAT)
    assert not layout.features(CAT).exists()


def test_failure_keeps_a_previous_store(workdir):
    write_real()
    stage.run(make_params(), CAT)
    before = files(layout.features(CAT))
    (layout.normals(CAT) / "test.zarr" / "zarr.json").unlink()
    with pytest.raises(InputError):
        stage.run(make_params(), CAT)
    assert files(layout.features(CAT)) == before


def test_seed_without_shots_is_a_params_error(workdir):
    with pytest.raises(ParamsError, match="--shots"):
        stage.run(make_params(), CAT, seed=1)


def test_noise_space_normalised_adds_rgb_noise_after_imagenet_normalisation(workdir, backbone):
    data = write_real(n_train=2, n_test=1)
    stage.run(make_params(noisy_copies=2, noise_sigma=0.05, noise_space="image"), CAT)
    image = open_store(layout.features(CAT) / "train.zarr")
    image_rgb, image_real = image["noisy_rgb_0"][:], image["noisy_real_0"][:]
    stage.run(make_params(noisy_copies=2, noise_sigma=0.05, noise_space="normalised"), CAT)
    train = open_store(layout.features(CAT) / "train.zarr")
    assert train.attrs["noise_space"] == "normalised" and image.attrs["noise_space"] == "image"
    noise = Noise(copies=2, sigma=0.05, seed=0, tag=f"{CAT}/train", space="normalised")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for i in range(2):
        eps = sample_noise(noise, i, "rgb", (3, S, S))
        x = torch.from_numpy(data["train"]["rgb"][i].astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.inference_mode():
            after = backbone((x - mean) / std + eps)[0].numpy()
            before = backbone((x + eps - mean) / std)[0].numpy()
        got = train["noisy_rgb_0"][i].astype(np.float32)
        np.testing.assert_allclose(got, after, rtol=1e-2, atol=1e-2)
        assert np.abs(got - before).max() > 0.05  # 1/std ~ 4.4x stronger than in image space
    # Normal images are not normalised: both placements give the same bytes for them.
    np.testing.assert_array_equal(train["noisy_real_0"][:], image_real)
    assert np.abs(train["noisy_rgb_0"][:].astype(np.float32) - image_rgb.astype(np.float32)).max() > 0


def test_precision_sets_the_backbone_dtype(workdir):
    from pipeline.models.backbones import backbone_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backbone_dtype("auto", cuda) == torch.float16 and backbone_dtype("auto", cpu) == torch.float32
    assert backbone_dtype("fp32", cuda) == torch.float32  # published: ViT-B/8 in float32
    assert backbone_dtype("fp16", cpu) == torch.float16
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("auto", torch.float32)):
        model = stage._backbone(make_params(precision=precision))
        assert next(model.parameters()).dtype == dtype
    with pytest.raises(ParamsError, match="extract_features.precision"):
        make_params(precision="bf16")
