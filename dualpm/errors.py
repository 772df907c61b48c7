"""User-facing errors.

Everything a user can cause (bad input files, bad configuration, a missing optional dependency)
raises a subclass of `DualPMError` whose message names the file or sample and says what is wrong.
Command-line entry points turn these into `click.ClickException` so users see one clear line, not a
traceback. Internal bugs stay ordinary exceptions.
"""


class DualPMError(Exception):
    """Base class of all user-facing errors."""


class GltfError(DualPMError):
    """A glTF/GLB file that cannot be used as a single skinned triangle mesh."""


class DatasetError(DualPMError):
    """A dataset file or folder that is missing, malformed or inconsistent."""


class ConfigError(DualPMError):
    """A configuration value that is unknown, of the wrong type or out of range."""


class BackendUnavailable(DualPMError):
    """A requested compute backend (e.g. nvdiffrast on CUDA) cannot be used on this machine."""
