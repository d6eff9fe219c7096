"""``cmds-ad distribute``: DVC stage instances as Dask tasks on a cluster.

``plan`` (which instances run), ``cluster`` (start or reach the Dask cluster), ``task`` (one
instance on a worker), ``worker`` (the process the task starts in a fresh clone), ``run``
(schedule, follow, sync the workspace), ``settings`` (``distribute.yaml``), ``slurm`` (SLURM
jobs through dask-jobqueue)."""
