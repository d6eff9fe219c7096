"""distribute.yaml and the command line: validation with the key named, overrides, SLURM
times and gres, and the settings a SLURM job gets (no SLURM needed: test_slurm.py runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.settings import (
    ClusterOptions,
    DistributeError,
    gres_gpus,
    resolve_options,
    walltime_seconds,
)
from scheduler.slurm import job_kinds, job_kwargs

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "distribute.yaml"
    path.write_text(text)
    return path


def test_no_file_means_the_defaults(tmp_path):
    options = resolve_options(tmp_path / "distribute.yaml", {})
    assert options == ClusterOptions()
    assert (options.cluster, options.jobs, options.worker_gpus) == ("local", 2, 0)


def test_the_shipped_file_is_valid_and_local():
    options = resolve_options(REPO / "distribute.yaml", {})
    assert options.cluster == "local" and options.jobs == 2


def test_file_values_and_command_line_overrides(tmp_path):
    path = _write(tmp_path, "distribute:\n  cluster: slurm\n  partition: gpu\n  walltime: '2:00:00'"
                            "\n  gres: gpu:a100:1\n  cpu_jobs: 2\n  sbatch: ['--qos=long']\n")
    options = resolve_options(path, {"walltime": None, "cores": 8, "sbatch": ["--qos=short"]})
    assert options.partition == "gpu" and options.walltime == "2:00:00"  # None: not given
    assert options.cores == 8 and options.sbatch == ["--qos=short"]
    assert options.worker_gpus == 1 and options.slurm_gres == "gpu:a100:1"
    assert resolve_options(path, {"cluster": "local"}).cluster == "local"


@pytest.mark.parametrize("text, message", [
    ("distribute:\n  partitoin: gpu\n",
     "distribute.yaml: distribute.partitoin: unknown key (allowed: cluster, jobs, gpus,"),
    ("distribute: {}\ncluster: slurm\n",
     "distribute.yaml: cluster: unknown key (allowed: distribute)"),
    ("distribute:\n  jobs: 0\n", "distribute.yaml: distribute.jobs: Input should be greater"),
    ("distribute:\n  walltime: 4h\n", "distribute.walltime: not a SLURM time; e.g. 04:00:00"),
    ("distribute:\n  memory: lots\n", "distribute.memory: not a memory size; e.g. 16GB"),
    ("distribute:\n  cluster: pbs\n",
     "distribute.cluster: expected local, slurm or tcp://HOST:PORT"),
    ("distribute:\n  gres: 'gpu:2:'\n", "distribute.gres: not a SLURM gres"),
    ("distribute:\n  sbatch: ['-p debug']\n", "'-p debug': -p is set by the key partition"),
    ("distribute:\n  sbatch: ['--output=x']\n", "--output is set by cmds-ad itself"),
    ("distribute:\n  sbatch: ['qos=long']\n", "'qos=long': each entry is one sbatch option"),
    ("distribute:\n  gres: gpu:2\n  gpus: 1\n", "gres gpu:2 asks for 2 GPUs, gpus for 1"),
    ("- a list\n", "expected a mapping with a distribute: block"),
    ("distribute: [\n", "not valid YAML"),
])
def test_bad_file_is_one_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(DistributeError) as err:
        resolve_options(_write(tmp_path, text), {})
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "distribute.yaml"))


def test_bad_command_line_value_is_named(tmp_path):
    with pytest.raises(DistributeError, match="command line: walltime: not a SLURM time"):
        resolve_options(tmp_path / "distribute.yaml", {"walltime": "soon"})


def test_cli_refuses_bad_settings_before_anything(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    _write(tmp_path, "distribute:\n  jobz: 2\n")
    result = CliRunner().invoke(app, ["distribute", "--settings",
                                      str(tmp_path / "distribute.yaml")])
    assert result.exit_code == 1
    assert "distribute.jobz: unknown key" in result.output


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("1-12", 129600),
    ("2-00:30", 174600), ("2-00:30:05", 174605),
])
def test_walltime_formats(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("gres, gpus", [
    ("gpu:1", 1), ("gpu:a100:2", 2), ("gpu", 1), ("mps:100", 0), ("gpu:1,mps:50", 1), (None, 0),
])
def test_gpus_of_a_gres(gres, gpus):
    assert gres_gpus(gres) == gpus


def test_slurm_jobs_with_and_without_the_gres(tmp_path):
    options = ClusterOptions(cluster="slurm", jobs=2, gpus=1, cores=8, memory="32GB",
                             partition="gpu", cpu_jobs=3, cpu_partition="cpu",
                             account="lab", sbatch=["--qos=long"])
    assert job_kinds(options) == [("gpu", True, 2), ("cpu", False, 3)]
    gpu = job_kwargs(options, tmp_path, with_gres=True)
    cpu = job_kwargs(options, tmp_path, with_gres=False)
    # one instance at a time on the job's 8 cores
    assert (gpu["cores"], gpu["job_cpu"]) == (1, 8)
    assert gpu["job_extra_directives"] == ["--gres=gpu:1", "--qos=long"]
    assert gpu["worker_extra_args"] == ["--resources", "GPU=1"]
    assert (gpu["queue"], cpu["queue"]) == ("gpu", "cpu")
    assert cpu["job_extra_directives"] == ["--qos=long"] and cpu["worker_extra_args"] == []
    assert (gpu["job_name"], cpu["job_name"]) == ("cmds-ad-gpu", "cmds-ad")


class _Job:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class _Cluster:
    """What SlurmJobs reads of a dask-jobqueue cluster: its jobs, its specs, scale()."""

    def __init__(self, jobs: dict[str, str]) -> None:
        self.workers = {name: _Job(job_id) for name, job_id in jobs.items()}
        self.worker_spec = {name: {"options": {"job_name": name}} for name in jobs}
        self.scaled: list[int] = []

    def scale(self, n: int) -> None:
        self.scaled.append(n)


class _Client:
    def __init__(self) -> None:
        self.names: list[str] = []

    def scheduler_info(self, n_workers: int = 5) -> dict:
        return {"workers": {f"tcp://w{i}": {"name": n} for i, n in enumerate(self.names)}}


def _jobs(monkeypatch, tmp_path, states: dict):
    from scheduler import slurm as distribute_slurm

    monkeypatch.setattr(distribute_slurm, "squeue_states", lambda: states)
    cluster, client = _Cluster({"gpu-0": "11", "cpu-0": "12"}), _Client()
    jobs = distribute_slurm.SlurmJobs(cluster, client, tmp_path)
    jobs.POLL_S = 0
    return jobs, cluster, client


def test_slurm_job_that_ends_after_its_worker_connected_is_replaced(monkeypatch, tmp_path):
    states = {"11": ("RUNNING", "None"), "12": ("PENDING", "Resources")}
    jobs, cluster, client = _jobs(monkeypatch, tmp_path, states)
    said: list[str] = []
    client.names = ["gpu-0"]
    jobs.poll(said.append)
    assert said == ["SLURM job 11 submitted (worker gpu-0)",
                    "SLURM job 12 submitted (worker cpu-0)"]
    assert jobs.summary() == "SLURM jobs: 1 pending (Resources), 1 running"
    del states["11"]  # cancelled
    client.names = []
    jobs.poll(said.append)
    assert said[-1].startswith("SLURM job 11 (worker gpu-0) ended") and "gpu-1" in said[-1]
    assert sorted(cluster.worker_spec) == ["cpu-0", "gpu-1"]  # the same spec, renamed
    assert cluster.worker_spec["gpu-1"] == {"options": {"job_name": "gpu-0"}}
    assert cluster.scaled == [2]


def test_slurm_job_that_ends_before_its_worker_connected_stops_the_run(monkeypatch, tmp_path):
    (tmp_path / "cmds-ad-12.err").write_text("line 1\n/bin/python: No module named distributed\n")
    jobs, cluster, client = _jobs(monkeypatch, tmp_path, {"11": ("RUNNING", "None")})
    client.names = ["gpu-0"]
    with pytest.raises(DistributeError) as err:
        jobs.poll(lambda _: None)
    assert "SLURM job 12 (worker cpu-0) ended before its Dask worker connected" in str(err.value)
    assert "No module named distributed" in str(err.value)
    assert cluster.scaled == []
