"""User-facing errors: one clear message naming the file or parameter at fault."""


class CmdsAdError(Exception):
    """Base class of every error the command line reports as one line with a non-zero exit."""


class InputError(CmdsAdError):
    """A data file, dataset layout or artifact is missing, unreadable or inconsistent."""


class ParamsError(CmdsAdError):
    """A parameter in params.yaml is unknown or invalid."""


class ModelError(CmdsAdError):
    """A model cannot be found or loaded (hub id offline, wrong local folder, wrong architecture)."""
