"""The Dask cluster of ``cmds-ad distribute``: checked before any work, started (local
processes, SLURM jobs) or connected to (an address)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from scheduler.settings import ClusterOptions, DistributeError


def _no_scheduler(options: ClusterOptions, err: Exception) -> DistributeError:
    return DistributeError(f"no Dask scheduler answers at {options.cluster} "
                           f"(within {options.connect_timeout:g} s): {err}")


def check_cluster(options: ClusterOptions) -> None:
    """Fail within seconds, before any work: no answer at an address; on SLURM no sbatch, or
    jobs that SLURM would refuse or never start."""
    if options.cluster == "slurm":
        from scheduler.slurm import check_slurm

        check_slurm(options)
    if options.cluster.startswith("tcp://"):
        host, _, port = options.cluster.removeprefix("tcp://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)),
                                     timeout=options.connect_timeout).close()
        except (OSError, ValueError) as err:
            raise _no_scheduler(options, err) from None


def start_cluster(options: ClusterOptions, run_dir: Path):
    """A Dask client for ``options.cluster``, the cluster object to close (if ours) and, on
    SLURM, the :class:`SlurmJobs` that watches the jobs (their logs go to ``run_dir``)."""
    from distributed import Client

    if options.cluster == "local":
        from distributed import LocalCluster

        resources = {"GPU": options.worker_gpus} if options.worker_gpus else None
        # one thread per worker process: a stage instance is a process of its own and uses
        # the cores itself; the dashboard on a free port
        cluster = LocalCluster(n_workers=options.jobs, threads_per_worker=1, processes=True,
                               dashboard_address=":0", resources=resources,
                               silence_logs=logging.CRITICAL)  # failures are reported below
        return Client(cluster), cluster, None
    if options.cluster == "slurm":
        from scheduler.slurm import SlurmJobs, start_slurm_cluster

        cluster = start_slurm_cluster(options, run_dir / "slurm")
        client = Client(cluster)
        return client, cluster, SlurmJobs(cluster, client, run_dir / "slurm")
    try:
        client = Client(options.cluster, timeout=f"{options.connect_timeout}s")
    except (OSError, TimeoutError) as err:  # it stopped answering since check_cluster
        raise _no_scheduler(options, err) from None
    return client, None, None


def cluster_has_gpus(client, options: ClusterOptions) -> bool:
    if options.cluster in ("local", "slurm"):
        return options.worker_gpus > 0
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


def dashboard_up(client) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - only decides whether to print a link
        return False
