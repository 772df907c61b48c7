"""Typed training configuration: YAML -> frozen dataclasses with strict checking, `--set` overrides.

    raw = read_config("configs/demo.yaml", ["train.lr=1e-4", "data.batch_size=4"])
    config = config_from_dict(raw)                      # unknown keys, wrong types, bad ranges -> ConfigError
    explicit = "in_channels" in raw.get("model", {})
    config = resolve_config(config, open_dataset(config.data.root), explicit_in_channels=explicit)

Values missing from the YAML take the dataclass defaults; the defaults of `TrainConfig` and of the model
and loss configs are the reference values of the paper (configs/paper.yaml spells them out).
Dataset-dependent values are filled in by `resolve_config`: `model.in_channels` from the features column,
`data.resolution` from the render column, `data.layers` from `model.num_layers`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dualpm.data.reader import DatasetInfo
from dualpm.errors import ConfigError
from dualpm.loss import LossConfig
from dualpm.model import ModelConfig

PRECISIONS = ("auto", "bf16", "fp32")


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # prepared dataset folder or URL (s3://, gs://, https://); required
    cache: str | None = None  # folder keeping a remote store's fetched shards (None: none)
    cache_gib: float = 50.0  # the most the cache holds (GiB)
    layers: int | None = None  # target layers read; None: model.num_layers (they must agree)
    resolution: tuple[int, int] | None = None  # (H, W) trained at; None: the render column's
    batch_size: int = 12  # per DDP rank
    loader_workers: int = 2  # DataLoader worker processes per rank (decoding; 0: in the training process)
    prefetch: int = 2  # batches prefetched per worker
    shuffle_buffer: int = 64  # samples per consumer's shuffle buffer (<= 1: shard order only)
    open_shards: int = 4  # shards each consumer reads at once, interleaved (mixes model-ordered shards)
    # Mirror half the training images left-right (dualpm.data.augment). Only for left-right symmetric rest
    # shapes: the value is the canonical axis the mirror negates (0: x, the synthetic quadrupeds' lateral
    # axis). None: no mirroring (the reference).
    hflip_canonical_axis: int | None = None
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        _check(self.root is None or self.root != "", "data.root", "a dataset folder", self.root)
        _check(self.layers is None or self.layers >= 1, "data.layers", ">= 1", self.layers)
        _check(self.cache_gib > 0, "data.cache_gib", "> 0", self.cache_gib)
        if self.resolution is not None:
            _check(min(self.resolution) >= 1, "data.resolution", "[H, W] with H, W >= 1", self.resolution)
        _check(self.batch_size >= 1, "data.batch_size", ">= 1", self.batch_size)
        _check(self.loader_workers >= 0, "data.loader_workers", ">= 0", self.loader_workers)
        _check(self.prefetch >= 1, "data.prefetch", ">= 1", self.prefetch)
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", self.shuffle_buffer)
        _check(self.open_shards >= 1, "data.open_shards", ">= 1", self.open_shards)
        axis = self.hflip_canonical_axis
        _check(axis in (None, 0, 1, 2), "data.hflip_canonical_axis", "null, 0, 1 or 2", axis)
        for name in ("train_split", "val_split"):
            _check(bool(getattr(self, name)), f"data.{name}", "a split name", getattr(self, name))


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/dualpm"  # the run folder: config.yaml, checkpoints/, tb/, metrics.jsonl
    steps: int = 100_000  # optimizer steps (global: every rank takes each step)
    lr: float = 6e-4  # Adam
    lr_step: int = 30_000  # StepLR step size (in optimizer steps)
    lr_gamma: float = 0.5
    grad_clip: float = 1.0  # clip every gradient VALUE to [-grad_clip, grad_clip]; 0: off
    seed: int = 42
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the model
    log_every: int = 50  # steps between train log lines (TensorBoard, metrics.jsonl, progress bar)
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # step-numbered checkpoints kept besides latest.pt; 0: keep all
    validate_every: int = 1000  # steps between validations (and one at the end); 0: never
    val_batches: int = 0  # validation batches per rank; 0: the whole val split
    progress: bool = True  # tqdm progress bar (rank 0)
    record_ids: bool = False  # debug: append "step role epoch id" per sample to <run>/ids/rank-<r>.txt

    def __post_init__(self) -> None:
        _check(bool(self.out_dir), "train.out_dir", "a folder", self.out_dir)
        _check(self.steps >= 1, "train.steps", ">= 1", self.steps)
        _check(math.isfinite(self.lr) and self.lr > 0, "train.lr", "a number > 0", self.lr)
        _check(self.lr_step >= 1, "train.lr_step", ">= 1", self.lr_step)
        _check(0 < self.lr_gamma <= 1, "train.lr_gamma", "in (0, 1]", self.lr_gamma)
        clip = self.grad_clip
        _check(math.isfinite(clip) and clip >= 0, "train.grad_clip", ">= 0", clip)
        _check(self.seed >= 0, "train.seed", ">= 0", self.seed)
        _check(self.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", self.precision)
        for name in ("log_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", ">= 1", getattr(self, name))
        for name in ("keep_checkpoints", "validate_every", "val_batches"):
            _check(getattr(self, name) >= 0, f"train.{name}", ">= 0", getattr(self, name))


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.layers is not None and self.data.layers != self.model.num_layers:
            raise ConfigError(
                f"data.layers={self.data.layers} but model.num_layers={self.model.num_layers}: the loss "
                "needs as many target layers as the model predicts (leave data.layers unset)"
            )


# --- YAML / dict -> dataclasses ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """`value` (from YAML) as type `tp`, or ConfigError naming `key`, the expected type and the value."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
    elif origin is tuple and isinstance(value, (list, tuple)):
        variadic = len(args) == 2 and args[1] is Ellipsis
        if variadic or len(value) == len(args):
            kinds = [args[0]] * len(value) if variadic else args
            pairs = enumerate(zip(kinds, value, strict=True))
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in pairs)
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "6e-4" (no dot) as a string; accept numbers written that way.
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, key: str) -> Any:
    where = key or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in raw:
        if name not in names:
            dotted = f"{key}.{name}" if key else str(name)
            if dotted in RENAMED_KEYS:
                raise ConfigError(f"config key {dotted!r} is now {RENAMED_KEYS[dotted]!r} (README, 'Words that mean "
                                  "one thing'); rename it in your YAML or --set")
            raise ConfigError(f"unknown config key {dotted!r}; allowed keys of {where}: {', '.join(names)}")
    values = {n: _convert(hints[n], raw[n], f"{key}.{n}" if key else n) for n in names if n in raw}
    try:
        return cls(**values)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(f"{key}.") or not key else f"{key}: {msg}") from err


# Keys renamed so that one word means one thing across the commands: old spelling -> new. A user's YAML or
# --set with an old key is refused naming the new one; a checkpoint's recorded config is upgraded on reading.
RENAMED_KEYS = {"data.workers": "data.loader_workers"}


def upgrade_recorded_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config recorded by an earlier version (a checkpoint's) with renamed keys under their new names."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for old, new in RENAMED_KEYS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        section = out.get(old_section)
        if isinstance(section, dict) and old_name in section:
            out.setdefault(new_section, {})[new_name] = section.pop(old_name)
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a `Config` from nested plain values (as read from YAML)."""
    return _build(Config, raw, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) of a config dataclass: YAML-, JSON- and torch.load-safe."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def set_value(raw: dict[str, Any], key: str, value: Any, option: str) -> None:
    """Set dotted `key` of `raw` to `value` in place, making missing sections. `option` (e.g. "--out")
    names what set it in the ConfigError raised when a section on the way is not a mapping."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # missing, or an empty section ("train:" reads as null)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{option}: {where} is not a section (a mapping of keys to values)")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `KEY=VALUE` overrides (dotted keys; VALUE parsed as a YAML scalar or list) to `raw` in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from err
        set_value(raw, ".".join(parts), value, f"--set {item!r}")
    return raw


def read_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Raw config dict from a YAML file (None: all defaults) with `overrides` applied."""
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: config file not found") from err
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not a readable YAML file ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, loss, train)")
        for name, section in raw.items():
            if section is not None and not isinstance(section, dict):
                raise ConfigError(
                    f"{path}: section {name!r} must be a mapping of keys to values, got {section!r}"
                )
    return apply_overrides(raw, overrides)


def resolve_config(config: Config, info: DatasetInfo, explicit_in_channels: bool) -> Config:
    """Fill in the dataset-dependent values (see the module docstring) and check them against `info`.

    explicit_in_channels: the user set model.in_channels; then it must equal the dataset's channels.
    """
    channels = info.feature_channels
    if explicit_in_channels and config.model.in_channels != channels:
        raise ConfigError(
            f"model.in_channels={config.model.in_channels} but the features of {info.root} have "
            f"{channels} channels (leave model.in_channels unset: it is read from the dataset)"
        )
    layers = config.model.num_layers
    if layers > info.stored_layers:
        raise ConfigError(
            f"model.num_layers={layers} but {info.root} stores only {info.stored_layers} layers"
        )
    data = dataclasses.replace(
        config.data, root=str(info.root), layers=layers, resolution=config.data.resolution or info.resolution
    )
    model = dataclasses.replace(config.model, in_channels=channels)
    return dataclasses.replace(config, data=data, model=model)


# Keys that may change when a run is resumed: where things are, how often to log, how long to run.
RESUMABLE_CHANGES = frozenset(
    {
        "data.root", "data.cache", "data.cache_gib", "data.loader_workers", "data.prefetch", "train.out_dir",
        "train.steps", "train.precision",
        "train.channels_last", "train.compile", "train.log_every", "train.checkpoint_every",
        "train.keep_checkpoints", "train.validate_every", "train.val_batches", "train.progress",
        "train.record_ids",
    }
)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested plain config dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b, dotted = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{dotted}.")
        elif a != b:
            out.append(dotted)
    return out
