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


def describe_load_error(err: BaseException) -> str:
    """One line saying why `torch.load(weights_only=True)` (ours, or a library's) could not read a file.

    torch's refusal of a pickle that would build other objects than tensors and plain values spans
    several lines and advises `weights_only=False`, which would run the file's code; keep the line
    that names what was refused. Any other error is `Type: message` on one line.
    """
    text = str(err)
    if text.startswith("Weights only load failed"):
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        refused = next((ln for ln in lines if not ln.startswith("Check the documentation")), "")
        refused = refused.rstrip(".")
        return f"refused to load it: it holds objects other than tensors and plain values ({refused})"
    return f"{type(err).__name__}: {' '.join(text.split())}" if text else type(err).__name__
