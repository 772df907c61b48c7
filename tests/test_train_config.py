"""Training configs: YAML files, strict keys and types, ranges, --set overrides, resolution, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dualpm.data.reader import open_dataset
from dualpm.errors import ConfigError
from dualpm.loss import LossConfig
from dualpm.model import ModelConfig, UNetConfig
from dualpm.train import (
    Config,
    DataConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    read_config,
    resolve_config,
)
from dualpm.train.cli import main
from dualpm.train.config import config_diff
from test_reader import write_store

REPO = Path(__file__).parents[1]


def test_paper_config_holds_the_reference_values():
    config = config_from_dict(read_config(REPO / "configs" / "paper.yaml"))
    t, d, m = config.train, config.data, config.model
    reference = (6e-4, 30_000, 0.5, 100_000, 1.0, 42)
    assert (t.lr, t.lr_step, t.lr_gamma, t.steps, t.grad_clip, t.seed) == reference
    assert d.batch_size == 12 and m.num_layers == 4
    assert m.unet == UNetConfig(128, (1, 2, 2, 2), 2, (3,), 0.1, 32, 1)  # also the UNetConfig defaults
    assert config.loss == LossConfig(alpha=1.0, occupancy_weight=1.0, label_clamp=(0.01, 0.99))
    # The dataclass defaults are the reference values too: an empty config is the paper's.
    empty = config_from_dict({})
    assert empty.train == TrainConfig() and (empty.train.lr, empty.train.steps) == (6e-4, 100_000)
    assert dataclass_fields_equal(empty.model.unet, m.unet) and empty.data.batch_size == 12


def dataclass_fields_equal(a, b) -> bool:
    return config_to_dict(a) == config_to_dict(b)


def test_demo_config_is_small_and_cpu_friendly():
    config = config_from_dict(read_config(REPO / "configs" / "demo.yaml"))
    assert config.model.unet.base_channels <= 32 and config.model.unet.dropout == 0
    assert config.model.num_layers == 4 and config.train.precision == "auto"
    # The demo's training budget: 2 cores train the demo model at ~80 samples/s (docs/benchmarks.md), so
    # 40,000 samples is about 8 of the demo's 10 minutes.
    assert config.train.steps * config.data.batch_size <= 40_000


def test_round_trip_through_plain_dicts_and_yaml():
    config = config_from_dict(read_config(REPO / "configs" / "paper.yaml", ["data.resolution=[64, 48]"]))
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(config))))
    assert again == config and again.data.resolution == (64, 48)


def test_set_overrides_parse_yaml_values():
    raw = read_config(REPO / "configs" / "demo.yaml", [
        "train.lr=1e-4", "data.batch_size=3", "model.unet.channel_mult=[1, 2]",
        "model.unet.attention_levels=[]",
        "train.compile=true", "data.root=/some/where",
    ])
    config = config_from_dict(raw)
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)  # "1e-4" is a string in YAML 1.1
    assert config.data.batch_size == 3 and config.train.compile is True and config.data.root == "/some/where"
    assert config.model.unet.channel_mult == (1, 2) and config.model.unet.attention_levels == ()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'; allowed keys of train: out_dir, steps, lr,"),
        ("optim.lr=1", r"unknown config key 'optim'; allowed keys of the config: data, model, loss, train"),
        ("model.unet.width=3", r"unknown config key 'model.unet.width'; allowed keys of model.unet: base_"),
        ("train.lr=fast", r"train.lr: expected a number, got 'fast'"),
        ("data.batch_size=2.5", r"data.batch_size: expected an integer, got 2.5"),
        ("train.compile=yes please", r"train.compile: expected true/false, got 'yes please'"),
        ("model.unet.channel_mult=[1, a]", r"model.unet.channel_mult\[1\]: expected an integer, got 'a'"),
        ("data.resolution=64", r"data.resolution: expected a list of 2 \(an integer, an integer\) or null"),
        ("train=3", r"train: expected a mapping"),
        ("train.lr=-1", r"train.lr must be a number > 0, got -1.0"),
        ("data.loader_workers=-1", r"data.loader_workers must be >= 0, got -1"),
        ("data.workers=2", r"config key .data.workers. is now .data.loader_workers."),
        ("train.precision=fp16", r"train.precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'"),
        ("model.unet.dropout=1.5", r"model.unet: UNetConfig.dropout must be a number in \[0, 1\)"),
        ("loss.label_clamp=[0.9, 0.1]", r"loss: LossConfig.label_clamp must be"),
        ("data.layers=3", r"data.layers=3 but model.num_layers=4"),
        ("data.hflip_canonical_axis=3", r"data.hflip_canonical_axis must be null, 0, 1 or 2, got 3"),
        ("loss.distance=l1", r"loss: LossConfig.distance must be one of \('squared', 'euclidean'\)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(read_config(REPO / "configs" / "demo.yaml", [override]))


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=3", "train.lr.x=1"])
def test_malformed_overrides(item):
    with pytest.raises(ConfigError, match="--set"):
        config_from_dict(read_config(REPO / "configs" / "demo.yaml", [item]))


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        read_config(tmp_path / "list.yaml")


def test_resolve_takes_channels_resolution_and_layers_from_the_dataset(tmp_path):
    info = open_dataset(write_store(tmp_path / "d", channels=7, size=16))
    base = Config(data=DataConfig(root=str(info.root)), model=ModelConfig(num_layers=3))
    resolved = resolve_config(base, info, explicit_in_channels=False)
    assert resolved.model.in_channels == 7 and resolved.data.resolution == (16, 16)
    assert resolved.data.layers == 3
    with pytest.raises(ConfigError, match="model.in_channels=64 but the features of .* have 7 channels"):
        resolve_config(base, info, explicit_in_channels=True)
    with pytest.raises(ConfigError, match="model.num_layers=8 but .* stores only 6 layers"):
        resolve_config(Config(model=ModelConfig(num_layers=8)), info, explicit_in_channels=False)


def test_config_diff_lists_dotted_keys():
    a = config_to_dict(Config())
    b = config_to_dict(config_from_dict({"train": {"lr": 1e-3}, "model": {"unet": {"dropout": 0.0}}}))
    assert config_diff(a, b) == ["model.unet.dropout", "train.lr"]


# --- the command line ------------------------------------------------------------------------------


def test_cli_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    root = write_store(tmp_path / "d", channels=5)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [str(REPO / "configs" / "demo.yaml"), "--data", str(root), "--out", str(out),
         "--set", "train.steps=7", "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    assert "in_channels: 5" in result.output and "steps: 7" in result.output
    assert re.search(r"resolution:\n +- 16\n +- 16\n", result.output)
    assert "DualPMNet: 2 x UNet(" in result.output and "8 train / 4 val samples" in result.output
    assert not out.exists()


def test_cli_errors_are_one_clear_line(tmp_path):
    runner = CliRunner()
    demo = str(REPO / "configs" / "demo.yaml")
    result = runner.invoke(main, [demo, "--dry-run"])
    assert result.exit_code == 1 and "data.root is not set" in result.output
    result = runner.invoke(main, [demo, "--data", str(tmp_path / "nope"), "--dry-run"])
    assert result.exit_code == 1 and "dataset folder not found" in result.output
    root = write_store(tmp_path / "d", channels=5)
    result = runner.invoke(main, [demo, "--data", str(root), "--set", "model.in_channels=64", "--dry-run"])
    assert result.exit_code == 1 and "model.in_channels=64 but the features" in result.output
    result = runner.invoke(main, [demo, "--data", str(root), "--set", "train.bogus=1", "--dry-run"])
    assert result.exit_code == 1 and "unknown config key 'train.bogus'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("text, option", [
    ("train: [1, 2]\n", "--out"), ("data: 5\n", "--data"), ("train: [1, 2]\n", "--set"),
    ("model: text\n", None),
])
def test_a_section_that_is_not_a_mapping_is_one_clear_line(tmp_path, text, option):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    section = text.split(":")[0]
    args = [str(config), "--dry-run"]
    args += {"--out": ["--out", str(tmp_path / "run")], "--data": ["--data", str(tmp_path / "d")],
             "--set": ["--set", "train.lr=1e-3"], None: []}[option]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert f"{config}: section {section!r} must be a mapping of keys to values" in result.output


def test_recorded_configs_with_renamed_keys_are_upgraded():
    from dualpm.train.config import upgrade_recorded_config

    old = {"data": {"root": "d", "workers": 3}, "train": {"lr": 1e-3}}
    new = upgrade_recorded_config(old)
    assert new == {"data": {"root": "d", "loader_workers": 3}, "train": {"lr": 1e-3}}
    assert old == {"data": {"root": "d", "workers": 3}, "train": {"lr": 1e-3}}  # the input is not changed
    assert config_from_dict(new).data.loader_workers == 3
