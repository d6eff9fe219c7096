"""The DVC stages' commands, one line each: the module, the instance its arguments name and the
help. Standard library only: the `cmds-ad` entry point (stages/warm.py) reads the names before
it imports anything else, and stages/cli.py builds the commands from the same table.

Instance forms: "-" none; "category"; "k" a category, k and seed; "maybe_k" a category and,
for generated images, k and seed.
"""

from __future__ import annotations

_TABLE = """
validate_params     -         validate the whole parameter file before any work.
prepare             category  read, preprocess and store one category; choose the shots.
augment             k         fine-tune a LoRA on the shots and generate augmented images.
estimate_normals    maybe_k   Marigold normals of real (or generated) images.
extract_features    maybe_k   backbone features of real (or generated) images.
fit_mapper          k         train the four cross-modal feature mappers.
infer               k         run the four mappers on the test set; store the raw stream maps.
score               k         fuse, mask, smooth and normalise the stream maps (no torch).
validation_streams  k         stream maps of the validation split's normal samples.
thresholds          k         image and pixel thresholds from the normal samples' scores.
evaluate            k         metrics, curves, heatmaps and fusion ablations of one instance.
report              -         summary tables (mean over categories per k) and the overview figure.
"""


def _parse(table: str) -> dict[str, tuple[str, str]]:
    rows = (line.split(maxsplit=2) for line in table.strip().splitlines())
    return {module: ("" if form == "-" else form, f"Stage: {text}") for module, form, text in rows}


# module -> (instance form, help)
STAGE_COMMANDS = _parse(_TABLE)
# the command words, as typed: `cmds-ad fit-mapper ...`
STAGE_NAMES = frozenset(module.replace("_", "-") for module in STAGE_COMMANDS)
