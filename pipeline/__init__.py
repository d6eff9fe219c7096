"""CMDS-AD: few-shot RGB + 3D anomaly detection, as a library.

The package holds the method as pure functions and small torch modules; it knows nothing
of DVC or the command line (those live in ``stages``).
"""

__version__ = "0.1.0"
