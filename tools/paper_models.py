"""The published model architectures with random weights, as local model folders.

The paper preset names three hub models (SD 2.1-base, Marigold normals v1-1, DINO ViT-B/8).
Their published configs are written down as test fixtures in ``tests/fixtures/paper_models/``
(each cites where it came from). This module builds those architectures with seeded random
weights and saves them where ``models.*`` can point, so the paper preset can run end to end on
a machine without the weights (``benchmarks/paper_smoke.py``), and counts their parameters on
the meta device (``tests/test_paper_models.py``) so the fixtures cannot drift.

The folders are GBs (two 866M-parameter UNets in float32): they are built once, one model at a
time, under ``~/.cache/cmds-ad-paper-models`` (or ``$CMDS_AD_PAPER_MODELS``) in a folder named
by a digest of the fixtures, and reused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "paper_models"
FIXTURE_NAMES = ("sd21_base", "marigold_normals_v1_1", "dino_vitb8")
BUILDER_VERSION = 1  # bump when the builder (not a fixture) changes what it writes
DEFAULT_SEED = 20260
DINO_FILE = "dino_vitb8.safetensors"


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def fixtures_digest() -> str:
    h = hashlib.sha256(str(BUILDER_VERSION).encode())
    for name in FIXTURE_NAMES:
        h.update((FIXTURES / f"{name}.json").read_bytes())
    return h.hexdigest()[:12]


def default_cache() -> Path:
    return Path(os.environ.get("CMDS_AD_PAPER_MODELS", "~/.cache/cmds-ad-paper-models")).expanduser()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _empty_weights(meta: bool) -> Any:
    if not meta:
        return nullcontext()
    from accelerate import init_empty_weights

    return init_empty_weights()


# --- one component from its fixture entry ---------------------------------------------------


def build_component(spec: dict[str, Any], meta: bool = False, seed: int = DEFAULT_SEED) -> Any:
    """A UNet, VAE or CLIP text encoder from a fixture's ``components`` entry.

    ``meta``: parameters on the meta device (no memory, no init time), for counting.
    """
    cls, config = spec["class"], dict(spec["config"])
    with _empty_weights(meta), (nullcontext() if meta else _seeded(seed)):
        if cls in ("UNet2DConditionModel", "AutoencoderKL"):
            import diffusers

            return getattr(diffusers, cls).from_config(config).eval()
        if cls == "CLIPTextModel":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig(**config)).eval()
    raise ValueError(f"no builder for component class {cls!r}")


def build_scheduler(spec: dict[str, Any]) -> Any:
    import diffusers

    return getattr(diffusers, spec["class"]).from_config(dict(spec["config"]))


def build_dino(fixture: dict[str, Any], meta: bool = False, seed: int = DEFAULT_SEED) -> Any:
    import timm

    with _empty_weights(meta), (nullcontext() if meta else _seeded(seed)):
        return timm.create_model(
            fixture["timm_name"], pretrained=False,
            num_classes=fixture["architecture"]["num_classes"],
        ).eval()


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# --- tokenizer --------------------------------------------------------------------------------


def write_clip_like_vocab(folder: Path, vocab_size: int) -> None:
    """A byte-level CLIP BPE vocabulary of ``vocab_size`` tokens (synthetic merges).

    The layout is CLIP's: 256 byte symbols, the same 256 with ``</w>``, then one token per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids (49406 and
    49407 for CLIP's 49408). The real merges are not shipped; these pair lowercase letters
    first, so ordinary prompt words tokenize into a few pieces as they would in CLIP.
    """
    from pipeline.models.diffusion import _byte_alphabet, byte_vocab

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab = byte_vocab()
    n_merges = vocab_size - len(vocab) - 2
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    ordered = letters + [ch for ch in alphabet if ch not in letters]
    merges: list[str] = []

    def pairs() -> Iterator[tuple[str, str]]:
        for a in ordered:
            for b in ordered:
                yield a, b + "</w>"
                yield a, b

    for a, b in pairs():
        if len(merges) == n_merges:
            break
        token = a + b
        if token in vocab:
            continue
        merges.append(f"{a} {b}")
        vocab[token] = len(vocab)
    if len(merges) != n_merges:
        raise ValueError(f"cannot make {n_merges} merges for a vocabulary of {vocab_size}")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer(spec: dict[str, Any], workdir: Path) -> Any:
    from transformers import CLIPTokenizer

    src = workdir / "_vocab"
    write_clip_like_vocab(src, spec["vocab_size"])
    config = spec["config"]
    tokenizer = CLIPTokenizer.from_pretrained(
        src, model_max_length=config["model_max_length"], bos_token=config["bos_token"],
        eos_token=config["eos_token"], pad_token=config["pad_token"], unk_token=config["unk_token"],
        do_lower_case=config["do_lower_case"],
    )
    shutil.rmtree(src, ignore_errors=True)
    return tokenizer


# --- model folders ----------------------------------------------------------------------------


def _save_module(module: Any, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)


def _write_model_index(folder: Path, index: dict[str, Any]) -> None:
    import diffusers

    out = {"_class_name": index["_class_name"], "_diffusers_version": diffusers.__version__}
    out.update({k: v for k, v in index.items() if k != "_class_name"})
    (folder / "model_index.json").write_text(json.dumps(out, indent=2) + "\n")


def write_sd21_base(folder: Path, seed: int = DEFAULT_SEED, log: Any = print) -> None:
    """The SD 2.1-base pipeline folder, one component at a time (peak: the UNet, ~3.5 GB)."""
    fixture = load_fixture("sd21_base")
    comps = fixture["components"]
    for offset, name in enumerate(("unet", "vae", "text_encoder")):
        log(f"  building {name} ({comps[name]['class']}, {comps[name]['params']:,} parameters)")
        module = build_component(comps[name], seed=seed + offset)
        _save_module(module, folder / name)
        del module  # before the next one is built: one model in memory at a time
        gc.collect()
    build_tokenizer(comps["tokenizer"], folder).save_pretrained(folder / "tokenizer")
    build_scheduler(comps["scheduler"]).save_pretrained(folder / "scheduler")
    _write_model_index(folder, fixture["model_index"])


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a component folder: Marigold reuses SD 2's VAE and text encoder."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copy2(path, dst / path.name)


def write_marigold_normals(folder: Path, sd_folder: Path, seed: int = DEFAULT_SEED,
                           log: Any = print) -> None:
    fixture = load_fixture("marigold_normals_v1_1")
    unet = fixture["components"]["unet"]
    log(f"  building unet ({unet['class']}, {unet['config']['in_channels']} input channels, "
        f"{unet['params']:,} parameters)")
    module = build_component(unet, seed=seed + 10)
    _save_module(module, folder / "unet")
    del module
    gc.collect()
    for name in fixture["shared_with"]:
        _link_tree(sd_folder / name, folder / name)
    build_scheduler(fixture["components"]["scheduler"]).save_pretrained(folder / "scheduler")
    _write_model_index(folder, fixture["model_index"])


def write_dino(path: Path, seed: int = DEFAULT_SEED, log: Any = print) -> None:
    from safetensors.torch import save_file

    fixture = load_fixture("dino_vitb8")
    log(f"  building {fixture['timm_name']} ({fixture['params']:,} parameters)")
    model = build_dino(fixture, seed=seed + 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    del model
    gc.collect()


def _atomic_build(target: Path, build: Any) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_paper_models(cache: Path | None = None, log: Any = print) -> dict[str, str]:
    """Build (once) and return the ``models.*`` values of the three random-weight models."""
    root = (cache or default_cache()) / f"v{BUILDER_VERSION}-{fixtures_digest()}"
    sd, marigold, dino = root / "sd21-base", root / "marigold-normals-v1-1", root / "dino"
    if not sd.exists():
        log(f"writing random-weight SD 2.1-base to {sd}")
    _atomic_build(sd, lambda tmp: write_sd21_base(tmp, log=log))
    if not marigold.exists():
        log(f"writing random-weight Marigold normals v1-1 to {marigold}")
    _atomic_build(marigold, lambda tmp: write_marigold_normals(tmp, sd, log=log))
    if not dino.exists():
        log(f"writing random-weight DINO ViT-B/8 to {dino}")
    _atomic_build(dino, lambda tmp: write_dino(tmp / DINO_FILE, log=log))
    arch = load_fixture("dino_vitb8")["timm_name"]
    return {"diffusion": str(sd), "normals": str(marigold), "backbone": f"{arch}@{dino / DINO_FILE}"}


# --- the prediction path alone: Marigold and DINO without SD 2.1's UNet -----------------------


def write_marigold_standalone(folder: Path, seed: int = DEFAULT_SEED, log: Any = print) -> None:
    """Marigold normals v1-1 with its shared components (VAE, text encoder, tokenizer) built
    here from the SD 2.1-base fixture with the seeds ``write_sd21_base`` gives them, so the
    folder holds the same weights as the one ``ensure_paper_models`` links from SD's folder,
    without building SD's UNet (what ``cmds-ad predict`` never runs)."""
    sd = load_fixture("sd21_base")["components"]
    shared = load_fixture("marigold_normals_v1_1")["shared_with"]
    offsets = {"vae": 1, "text_encoder": 2}  # write_sd21_base: unet 0, vae 1, text_encoder 2
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        sd_folder = Path(tmp)
        for name in shared:
            if name in offsets:
                log(f"  building {name} ({sd[name]['class']}, {sd[name]['params']:,} parameters)")
                module = build_component(sd[name], seed=seed + offsets[name])
                _save_module(module, sd_folder / name)
                del module
                gc.collect()
            elif name == "tokenizer":
                build_tokenizer(sd[name], sd_folder).save_pretrained(sd_folder / name)
        write_marigold_normals(folder, sd_folder, seed, log)


def ensure_prediction_models(cache: Path | None = None, log: Any = print) -> dict[str, str]:
    """Build (once) and return ``models.normals`` and ``models.backbone`` of the random-weight
    Marigold and DINO, in the cache ``ensure_paper_models`` uses (the same folders)."""
    root = (cache or default_cache()) / f"v{BUILDER_VERSION}-{fixtures_digest()}"
    marigold, dino = root / "marigold-normals-v1-1", root / "dino"
    if not marigold.exists():
        log(f"writing random-weight Marigold normals v1-1 to {marigold}")
    _atomic_build(marigold, lambda tmp: write_marigold_standalone(tmp, log=log))
    if not dino.exists():
        log(f"writing random-weight DINO ViT-B/8 to {dino}")
    _atomic_build(dino, lambda tmp: write_dino(tmp / DINO_FILE, log=log))
    arch = load_fixture("dino_vitb8")["timm_name"]
    return {"normals": str(marigold), "backbone": f"{arch}@{dino / DINO_FILE}"}


def write_random_mappers(folder: Path, architecture: str, resolution: int,
                         features: dict[str, Any], seed: int = DEFAULT_SEED) -> None:
    """A mapper folder as ``fit_mapper`` writes it (four safetensors and config.json) with
    seeded random weights, for the backbone features ``features`` describes (``backbone``,
    ``layers``, ``grid``, ``channels``: a probe of the backbone)."""
    from safetensors.torch import save_file

    from pipeline.inference import MAPPER_NAMES
    from pipeline.models.mapper import build_mapper

    channels = [int(c) for c in features["channels"]]
    folder.mkdir(parents=True, exist_ok=True)
    specs = {}
    for offset, name in enumerate(MAPPER_NAMES):
        stream, direction = name.split("_", 1)
        with _seeded(seed + 30 + offset):
            mapper = build_mapper(architecture, channels, channels)
        save_file({k: v.contiguous() for k, v in mapper.state_dict().items()},
                  str(folder / f"{name}.safetensors"), metadata={"architecture": architecture})
        source, target = ("rgb", stream) if direction == "2d_to_3d" else (stream, "rgb")
        specs[name] = {"file": f"{name}.safetensors", "source": source, "target": target,
                       "in_channels": channels, "out_channels": channels}
    config = {"architecture": architecture, "resolution": resolution, "mappers": specs,
              "random_weights": True, **features}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
