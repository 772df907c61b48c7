"""Training checkpoints (atomic; `latest.pt` + the last K step-numbered copies; RNG capture) and run folders.

```
<run>/checkpoints/step-00001000.pt   one per checkpoint (the oldest pruned beyond `keep`)
<run>/checkpoints/latest.pt          the newest (a hard link to it where the filesystem allows)
```
A run folder holding an earlier run (any of `RUN_ENTRIES`) is only trained in again to continue it
(`--resume`) or after deleting that run (`--overwrite`): see `prepare_run_dir`.
A checkpoint is a dict of tensors and plain Python values only, so `torch.load(weights_only=True)` reads
it: RNG states are tensors and lists, configs plain dicts (see `capture_rng`). `save_checkpoint` also
embeds the features' PCA basis (key `feature_basis`, see `feature_basis_entry`), so inference on raw
images needs the checkpoint alone, not the dataset it was trained on.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualpm.errors import ConfigError, DualPMError, describe_load_error
from dualpm.features.pca import FeatureBasis
from dualpm.fileio import TMP_PREFIX, atomic_output, remove_stale_temporaries, safe_join
from dualpm.store.remote import is_url
from dualpm.train.config import upgrade_recorded_config

FORMAT = "dualpm-checkpoint"
VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
# What resuming needs; `save_checkpoint` callers other than the trainer (tests, benchmarks) may write less.
RESUME_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "data", "config", "dataset")
FEATURE_BASIS = "feature_basis"  # {"tensors": {name: tensor}, "meta": {str: str}}, or None without PCA


class CheckpointError(DualPMError):
    """A checkpoint that is missing, unreadable, or not from this trainer."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the step-numbered checkpoints in `run_dir`, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write `state` as `step-<step>.pt` and `latest.pt` (each atomically), then prune to `keep` copies.

    keep: step-numbered checkpoints kept (the newest); 0 keeps all. `latest.pt` is always kept.
    Returns the step-numbered path.
    """
    features, dataset = state.get("features"), state.get("dataset")
    if FEATURE_BASIS not in state and isinstance(features, dict) and isinstance(dataset, dict):
        state = {**state, FEATURE_BASIS: feature_basis_entry(dataset["root"], features)}
    folder = checkpoint_dir(run_dir)
    path = folder / f"step-{step:08d}.pt"
    with atomic_output(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    with atomic_output(folder / LATEST) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)  # same bytes, no copy; files are only ever replaced, never edited
        except OSError:
            shutil.copyfile(path, tmp)
    if keep > 0:
        # The one just written always stays (a run resumed from an earlier checkpoint of its folder
        # has later-numbered ones beside it), with the keep - 1 highest-numbered others.
        others = [old for _, old in step_checkpoints(run_dir) if old != path]
        for old in others[: max(0, len(others) - (keep - 1))]:
            old.unlink(missing_ok=True)
    return path


# What a training run writes in its folder (loop.py); anything else there is left alone.
RUN_ENTRIES = (CHECKPOINTS, "metrics.jsonl", "config.yaml", "tb", "ids")
_RANK_IDS_RE = re.compile(r"^rank-\d+\.txt$")
STORE_MANIFEST = "manifest.json"  # what marks a prepared dataset (dualpm.store.MANIFEST_NAME)


def _foreign_content(path: Path, name: str) -> str | None:
    """Why `path` (run entry `name`) is not what a training run writes there (None: it is)."""
    if path.is_symlink():
        return "a symbolic link"
    if name in ("metrics.jsonl", "config.yaml"):
        return None if path.is_file() else "not a file"
    if not path.is_dir():
        return "not a folder"
    if name == "tb":  # TensorBoard event files (in subfolders for other tags)
        bad = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith("events.out.tfevents.")]
    elif name == "ids":
        bad = [p for p in path.iterdir() if not (_RANK_IDS_RE.match(p.name) and p.is_file())]
    else:  # checkpoints
        bad = [p for p in path.iterdir() if not (
            p.is_file() and (_STEP_RE.match(p.name) or p.name == LATEST or p.name.startswith(TMP_PREFIX)))]
    return f"holds {bad[0].relative_to(path)}" if bad else None


def run_dir_problem(
    run_dir: str | os.PathLike, resume: str | None, overwrite: bool, data_root: str | os.PathLike | None = None
) -> str | None:
    """Why training may not start in `run_dir` as asked (None: it may).

    A run folder is never the dataset `data_root`, inside it, or above it, and never a prepared dataset
    (it holds `manifest.json`): `--overwrite` there would delete the store's own entries (its `ids`
    array). A folder holding an earlier run (any of `RUN_ENTRIES`) needs `resume` (continue it) or
    `overwrite` (start over), and `overwrite` deletes only entries that are recognisably a run's own
    (checkpoint files, rank id lists, event files, the log and the config). Asking for both is a
    contradiction.
    """
    if resume is not None and overwrite:
        return "--overwrite starts a run over and --resume continues one: give only one of them"
    run_dir = Path(run_dir)
    if data_root is not None and not is_url(str(data_root)):  # a store URL is never a local folder
        out, data = run_dir.resolve(), Path(data_root).resolve()
        what = ("is the dataset" if out == data else "is inside the dataset" if out.is_relative_to(data)
                else "holds the dataset" if data.is_relative_to(out) else None)
        if what is not None:
            return (f"{run_dir}: the run folder {what} {data_root}; a run and a prepared dataset never share "
                    "a folder: give --out a folder outside the dataset")
    if (run_dir / STORE_MANIFEST).exists():
        return (f"{run_dir}: holds a prepared dataset ({STORE_MANIFEST}); a run folder is never a store: "
                "give --out a folder of its own")
    held = [name for name in RUN_ENTRIES if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    for name in held:
        why = _foreign_content(run_dir / name, name)
        if why is not None:
            return (f"{run_dir / name}: not what a training run writes ({why}); --overwrite deletes only a "
                    "run's own entries: give --out a folder of its own")
    if not held or resume is not None or overwrite:
        return None
    steps = step_checkpoints(run_dir)
    what = f"checkpoints up to step {steps[-1][0]}" if steps else f"no checkpoint, but {', '.join(held)}"
    return (
        f"{run_dir}: holds an earlier training run ({what}); continue it with --resume auto, start it over "
        f"with --overwrite (deletes its {', '.join(held)}), or give another --out"
    )


def prepare_run_dir(
    run_dir: str | os.PathLike, resume: str | None, overwrite: bool, data_root: str | os.PathLike | None = None
) -> None:
    """Make `run_dir` ready for a run (one process only, before anything writes there).

    Raises `ConfigError` for a `run_dir_problem` (checked before anything is touched); removes
    temporaries of checkpoint and log writes that were killed mid-write; with `overwrite`, deletes the
    earlier run's entries. They are first moved
    into a temporary folder, checkpoints first, so a kill part way leaves a folder that either still
    holds the run or holds no checkpoint (a run that stopped before its first one, which `--resume auto`
    starts over), and never a half-deleted checkpoint; the temporary folder goes at the next start.
    """
    run_dir = Path(run_dir)
    problem = run_dir_problem(run_dir, resume, overwrite, data_root)
    if problem is not None:
        raise ConfigError(problem)
    remove_stale_temporaries(run_dir)
    remove_stale_temporaries(checkpoint_dir(run_dir))
    held = [name for name in RUN_ENTRIES if (run_dir / name).exists()]
    if overwrite and held:
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}overwritten.", dir=run_dir))
        for name in held:  # CHECKPOINTS first
            os.replace(run_dir / name, trash / name)
        shutil.rmtree(trash)


def feature_basis_entry(dataset_root: str | os.PathLike, feature_config: dict[str, Any]) -> dict | None:
    """The dataset's feature PCA basis as plain tensors and strings (what `FEATURE_BASIS` holds).

    Args:
        dataset_root: the prepared dataset folder.
        feature_config: its features column config; its "basis" names the basis file relative to the
            root (None or absent: the features have no PCA, e.g. rgb or precomputed) and "basis_sha256",
            when present, the content hash it must have.
    Returns:
        {"tensors", "meta"} for `FeatureBasis.from_tensors`, or None without a basis.
    """
    name = feature_config.get("basis")
    if not name:
        return None
    path = safe_join(dataset_root, str(name))
    basis = FeatureBasis.load(path)
    expected = feature_config.get("basis_sha256")
    if expected and basis.content_hash() != expected:
        raise CheckpointError(f"{path}: the feature basis changed after the features were extracted with it")
    return {"tensors": basis.tensors(), "meta": dict(basis.meta)}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with `weights_only=True` (CheckpointError if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's unpickler raises about anything (IndexError, KeyError, ...) on bytes that are not a
        # torch file; whichever it is, the file is not a checkpoint this code can read.
        reason = describe_load_error(err)
        raise CheckpointError(f"{path}: not a readable dualpm checkpoint ({reason})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dualpm training checkpoint (a torch file of something else)")
    if state.get("version") != VERSION:
        version = state.get("version")
        raise CheckpointError(f"{path}: checkpoint version {version!r}, this code reads {VERSION}")
    if isinstance(state.get("config"), dict):
        state["config"] = upgrade_recorded_config(state["config"])
    return state


def load_weights(model: torch.nn.Module, weights: Any, where: str | os.PathLike) -> None:
    """Load `weights` (a checkpoint's "model" entry) into `model`, or raise CheckpointError in one line
    saying how they do not fit (tensors of other shapes, missing or unexpected names: one example each)."""
    own = model.state_dict()
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: its model weights are not a dict of tensors")
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    other = [k for k in own if k in weights and (not isinstance(weights[k], torch.Tensor)
                                                 or tuple(weights[k].shape) != tuple(own[k].shape))]
    if missing or unexpected or other:
        parts = []
        if other:
            k = other[0]
            found = tuple(weights[k].shape) if isinstance(weights[k], torch.Tensor) else type(weights[k]).__name__
            parts.append(f"{len(other)} of another shape, e.g. {k}: {found} in the file, {tuple(own[k].shape)} "
                         "in the model")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise CheckpointError(
            f"{where}: its model weights do not fit the model its config describes ({'; '.join(parts)}): "
            "the file was changed or written by other code"
        )
    model.load_state_dict(weights)


def find_checkpoint(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint `--resume` names: 'auto' = `<run>/checkpoints/latest.pt` if any (else None), a path."""
    if resume == "auto":
        latest = checkpoint_dir(run_dir) / LATEST
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (give a checkpoint file or 'auto')")
    return path


def load_resume_checkpoint(
    run_dir: str | os.PathLike, resume: str
) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """(path, state, note) of the checkpoint `--resume` names, read (`load_checkpoint`); (None, None, None)
    for 'auto' in a folder without checkpoints.

    With 'auto', a `latest.pt` that does not read (truncated by a full disk, damaged) falls back to the
    newest step-numbered checkpoint that does, and `note` says so (None otherwise); when none reads, the
    latest's error is raised. A named path never falls back.
    """
    path = find_checkpoint(run_dir, resume)
    if path is None:
        return None, None, None
    try:
        return path, load_checkpoint(path), None
    except CheckpointError as err:
        if resume != "auto":
            raise
        latest_error = err
    for step, candidate in reversed(step_checkpoints(run_dir)):
        try:
            state = load_checkpoint(candidate)
        except CheckpointError:
            continue
        note = (f"note: {latest_error}; resuming from {candidate} (step {step}), the newest checkpoint that "
                "reads")
        return candidate, state, note
    raise latest_error


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU and current CUDA device, numpy, Python) as tensors and lists."""
    np_state = np.random.get_state(legacy=False)
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # The current device only: touching every visible GPU would open a context on each, per rank.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng` (the CUDA state goes to the current device, if there is one)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
