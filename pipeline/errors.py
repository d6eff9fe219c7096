"""User-facing errors: one clear message naming the file or parameter at fault."""


class CmdsAdError(Exception):
    """Base class of every error the command line reports as one line with a non-zero exit."""


class InputError(CmdsAdError):
    """A data file, dataset layout or artifact is missing, unreadable or inconsistent."""


class ParamsError(CmdsAdError):
    """A parameter in params.yaml is unknown or invalid."""


class ModelError(CmdsAdError):
    """A model cannot be found or loaded (hub id offline, wrong local folder, wrong architecture)."""


class OutputError(CmdsAdError):
    """An output cannot be written safely: another process writes it, its temporary was removed,
    or the folder given holds files this tool did not write."""


class ResourceError(CmdsAdError):
    """A stage ran out of memory or disk space (the message says where and how much)."""
