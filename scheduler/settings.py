"""The settings of ``cmds-ad distribute``: a ``distribute:`` block in ``distribute.yaml`` at the
repository root, overridden by command-line options.

No stage reads the file and DVC does not track it, so editing it re-runs nothing, and
``cmds-ad distribute`` accepts it uncommitted (the workers never read it). Validated like
``params.yaml``: an unknown key is named with the keys allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import CmdsAdError
from pipeline.params import format_validation_error

SETTINGS_FILE = "distribute.yaml"
CLUSTER_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss)://")
# SLURM's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds
WALLTIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
GRES = re.compile(r"^[A-Za-z][\w/]*(:[\w.-]+)*(,[A-Za-z][\w/]*(:[\w.-]+)*)*$")
# sbatch options the settings set themselves: an extra line must not fight them
SET_BY_KEYS = {
    **dict.fromkeys(("-p", "--partition"), "the key partition"),
    **dict.fromkeys(("-A", "--account"), "the key account"),
    **dict.fromkeys(("-t", "--time"), "the key walltime"),
    **dict.fromkeys(("--mem",), "the key memory"),
    **dict.fromkeys(("-c", "--cpus-per-task"), "the key cores"),
    **dict.fromkeys(("--gres", "--gpus", "-G"), "the key gres"),
    **dict.fromkeys(("-J", "--job-name", "-o", "--output", "-e", "--error"), "cmds-ad itself"),
}


class DistributeError(CmdsAdError):
    """Bad input to ``cmds-ad distribute`` (settings, dirty tree, no remote, no scheduler,
    a SLURM partition or walltime the cluster refuses)."""


def walltime_seconds(text: str) -> int:
    """Seconds of a SLURM time limit (``30``, ``04:00:00``, ``1-12``, ``2-00:30:00``)."""
    match = WALLTIME.fullmatch(text.strip())
    if match is None:
        raise ValueError("not a SLURM time; e.g. 04:00:00, 90 (minutes) or 1-12:00:00")
    days, hours, minutes, seconds, only_minutes, m_seconds, h_m_s = match.groups()
    if days is not None:
        return (int(days) * 24 + int(hours)) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
    if h_m_s is not None:  # hours:minutes:seconds
        return int(only_minutes) * 3600 + int(m_seconds) * 60 + int(h_m_s)
    return int(only_minutes) * 60 + int(m_seconds or 0)


def gres_gpus(gres: str | None) -> int:
    """GPUs in a SLURM gres string: ``gpu:2`` and ``gpu:a100:2`` are 2, ``gpu`` is 1."""
    total = 0
    for entry in (gres or "").split(","):
        name, *rest = entry.split(":")
        if name == "gpu":
            total += int(rest[-1]) if rest and rest[-1].isdigit() else 1
    return total


class ClusterOptions(BaseModel):
    """Where the workers run and, on SLURM, what each job asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    cluster: str = "local"       # local | slurm | tcp://HOST:PORT (a running Dask scheduler)
    jobs: int = Field(2, ge=1)   # local: worker processes; slurm: jobs, one Dask worker each
    gpus: int = Field(0, ge=0)   # GPUs per worker; on SLURM the same as gres: gpu:<gpus>
    scratch: str | None = None   # folder for the workers' clones (default: Dask's own)
    connect_timeout: float = Field(5.0, gt=0)  # seconds a tcp:// scheduler has to answer
    # SLURM: every job (its worker runs one stage instance at a time, on the job's cores)
    cores: int = Field(4, ge=1)
    memory: str = "16GB"
    gres: str | None = None      # e.g. gpu:1 or gpu:a100:1; its GPUs: the worker's GPU resource
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    walltime: str = "04:00:00"
    sbatch: list[str] = Field(default=[])  # more #SBATCH lines, e.g. --qos=normal
    # SLURM: more jobs like the above without the gres, for the stages that need no GPU
    cpu_jobs: int = Field(0, ge=0)
    cpu_partition: str | None = None  # None: partition

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        if v not in ("local", "slurm") and not CLUSTER_ADDRESS.match(v):
            raise ValueError("expected local, slurm or tcp://HOST:PORT")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        from dask.utils import parse_bytes

        try:
            parse_bytes(v)
        except (ValueError, TypeError):
            raise ValueError("not a memory size; e.g. 16GB or 4000MB") from None
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        walltime_seconds(v)
        return v

    @field_validator("gres")
    @classmethod
    def _gres(cls, v: str | None) -> str | None:
        if v is not None and not GRES.match(v):
            raise ValueError("not a SLURM gres; e.g. gpu:1 or gpu:a100:2")
        return v

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, v: list[str]) -> list[str]:
        for line in v:
            option = line.split("=", 1)[0].split()[0] if line.strip() else ""
            if not option.startswith("-"):
                raise ValueError(f"{line!r}: each entry is one sbatch option, e.g. --qos=normal")
            if option in SET_BY_KEYS:
                raise ValueError(f"{line!r}: {option} is set by {SET_BY_KEYS[option]}")
        return v

    @model_validator(mode="after")
    def _gpus_agree(self) -> ClusterOptions:
        if self.gres is not None and self.gpus and gres_gpus(self.gres) != self.gpus:
            raise ValueError(f"gres {self.gres} asks for {gres_gpus(self.gres)} GPUs, gpus for "
                             f"{self.gpus}: give one of them")
        return self

    @property
    def worker_gpus(self) -> int:
        """GPUs each worker offers (local, slurm) as its Dask ``GPU`` resource."""
        return gres_gpus(self.gres) if self.gres is not None else self.gpus

    @property
    def slurm_gres(self) -> str | None:
        return self.gres if self.gres is not None else (f"gpu:{self.gpus}" if self.gpus else None)


class SettingsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    distribute: ClusterOptions = ClusterOptions()


def read_settings(path: Path) -> dict[str, Any]:
    """The ``distribute:`` block of ``path`` as given (validated), or {} without the file."""
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise DistributeError(f"{path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise DistributeError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DistributeError(f"{path}: expected a mapping with a distribute: block")
    try:
        SettingsFile.model_validate(raw)
    except ValidationError as err:
        raise DistributeError(format_validation_error(err, str(path), SettingsFile)) from None
    block = raw.get("distribute") or {}
    return dict(block)


def resolve_options(path: Path, overrides: Mapping[str, Any]) -> ClusterOptions:
    """The file's settings with the command-line ``overrides`` (None: not given) on top."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return ClusterOptions.model_validate({**read_settings(path), **given})
    except ValidationError as err:
        raise DistributeError(
            format_validation_error(err, "command line", ClusterOptions)) from None
