"""Many runs of the pipeline through DVC's experiments: ``sweep`` (``cmds-ad sweep``) and
``sensitivity`` (``cmds-ad sweep-lambda``, the paper's sensitivity plot)."""
