"""`dualpm-train`: train DualPM on a prepared dataset, on CPU, one GPU or many (torchrun).

    dualpm-train configs/demo.yaml --data out/demo --out runs/demo
    dualpm-train configs/paper.yaml --data /data/dualpm --set train.lr=3e-4 --set data.batch_size=8
    torchrun --nproc-per-node 8 -m dualpm.train.cli configs/paper.yaml --data /data/dualpm --resume auto

Exit status: 0 once train.steps are done; 75 (EX_TEMPFAIL) when SIGUSR1 or SIGTERM (a Slurm time-limit
warning, preemption, scancel) stopped the run early, after a checkpoint (continue with --resume auto).
"""

from __future__ import annotations

import os

import click

from dualpm.cliutils import handles_user_errors, show_and_save_config
from dualpm.data.reader import open_dataset
from dualpm.errors import ConfigError
from dualpm.model import DualPMNet, describe
from dualpm.train.checkpoint import run_dir_problem
from dualpm.train.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    read_config,
    resolve_config,
    set_value,
)
from dualpm.train.distributed import STOP_SIGNALS
from dualpm.train.loop import EXIT_STOPPED, check_complete, train


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--data", "data_root", type=str, metavar="FOLDER|URL",
    help="Prepared dataset: a folder, or an s3:// gs:// https:// file:// URL (sets data.root).",
)
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder keeping the shards of a remote --data store for later epochs and runs "
              "(sets data.cache; bounded by data.cache_gib).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run folder (sets train.out_dir).")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.lr=1e-4 (repeatable; VALUE is YAML).",
)
@click.option(
    "--resume", metavar="auto|PATH", help="Continue from a checkpoint; 'auto': the run's latest, if any."
)
@click.option(
    "--overwrite", is_flag=True,
    help="Start over in a run folder that holds an earlier run, deleting its checkpoints and logs.",
)
@click.option(
    "--allow-incomplete", is_flag=True,
    help="Train on a store whose render or features stage did not finish every shard (prints the counts); "
    "without it such a store is refused.",
)
@click.option(
    "--dry-run", is_flag=True,
    help="Print the resolved config and the model size, check the dataset and the run folder, stop.",
)
@handles_user_errors
def main(
    config_file: str | None, data_root: str | None, cache: str | None, out_dir: str | None,
    overrides: tuple[str, ...],
    resume: str | None, overwrite: bool, allow_incomplete: bool, dry_run: bool,
) -> None:
    """Train the two-stage DualPM network on CONFIG_FILE (YAML; omitted: the paper's reference values).

    Under torchrun every rank runs this command; rank 0 prints, logs and writes checkpoints.

    A run folder that holds an earlier run is refused unless --resume continues it or --overwrite
    deletes it first; a run folder is never the dataset, inside it or above it. A store whose render or
    features stage left shards unfinished is refused (with the counts) unless --allow-incomplete.

    On SIGUSR1 or SIGTERM every rank finishes the current step, rank 0 writes a checkpoint, and the
    command exits with status 75 (0 once train.steps are done); rerun with --resume auto to continue.
    """
    raw = read_config(config_file)
    if data_root is not None:
        set_value(raw, "data.root", data_root, "--data")
    if cache is not None:
        set_value(raw, "data.cache", cache, "--cache")
    if out_dir is not None:
        set_value(raw, "train.out_dir", out_dir, "--out")
    apply_overrides(raw, overrides)  # after --data / --out: an explicit --set wins
    config = config_from_dict(raw)  # unknown keys, types and ranges fail here, before any data is read
    if config.data.root is None:
        raise ConfigError(
            "data.root is not set: give the prepared dataset folder (--data PATH or --set data.root=PATH)"
        )
    # The run folder is checked before the dataset is read: a refusal must not wait on (or be hidden by)
    # the dataset's own problems, and --overwrite must never reach a store.
    problem = run_dir_problem(config.train.out_dir, resume, overwrite, config.data.root)
    if problem is not None:
        raise ConfigError(problem)
    info = open_dataset(config.data.root, config.data.cache, int(config.data.cache_gib * 2**30))
    config = resolve_config(config, info, explicit_in_channels="in_channels" in (raw.get("model") or {}))
    if dry_run:
        check_complete(info, config, allow_incomplete)
        if int(os.environ.get("RANK", "0")) == 0:
            show_and_save_config(config_to_dict(config), None, "resolved config")
            click.echo(describe(DualPMNet(config.model)))
            (h, w), (gh, gw) = info.resolution, info.feature_grid
            click.echo(
                f"data: {info.root}: {info.count(config.data.train_split)} train / "
                f"{info.count(config.data.val_split)} val samples, "
                f"render {h}x{w} x {info.stored_layers} layers, "
                f"features {info.feature_channels} x {gh}x{gw}"
            )
        return
    result = train(
        config, info, resume=resume, stop_signals=STOP_SIGNALS, overwrite=overwrite,
        allow_incomplete=allow_incomplete,
    )
    if result.stopped_by is not None:  # the loop printed where it stopped
        click.get_current_context().exit(EXIT_STOPPED)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"done: step {result.step}, checkpoint {result.checkpoint}")


if __name__ == "__main__":
    main()
