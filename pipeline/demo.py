"""`dualpm-demo` (`make demo`): synthetic data -> trained, evaluated model -> a report, on one machine.

    synth     dualpm-prep synth OUT/source         procedural rigged quadrupeds, images, splits
    render    dualpm-prep render OUT/source OUT/data  dual point maps (Embree on CPU, nvdiffrast on GPU)
    features  dualpm-prep features ...             rgb pixels, or ODISE-DINO when weights are configured
    train     dualpm-train configs/demo.yaml       --resume auto
    infer     dualpm-infer                         held-out (val) samples: PLYs, sheets, predictions.zarr
    eval      dualpm-eval --baseline               Chamfer etc. against the constant per-pixel baseline
    sequence  dualpm-prep synth --sequence ...     a held-out sequence of the first animal (new poses, moving
              render, features, infer --data       camera), rendered, predicted by the model
    animate   dualpm-animate                       the animal's rig animated by the predictions: OUT/animation/
                                                   animation.glb (Blender, three.js), .bvh, preview.png
    report    OUT/report/                          report.md, training curve, prediction sheet, animation

Every stage is the real command line a user would type, run as a subprocess (so its progress bar
shows), and every command resumes on its own. `OUT/demo_state.json` records the finished stages with
their exact command lines: a rerun skips those and resumes the first unfinished one; `--fresh`
deletes OUT and starts over. The learning check (the model's symmetric unit-cube Chamfer at most half
the baseline's) is printed last and written into the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from dualpm.cliutils import handles_user_errors, show_and_save_config
from dualpm.errors import ConfigError, DualPMError
from dualpm.fileio import atomic_write_text
from pipeline.demo_config import DEFAULT_CONFIG, LEARNING_BAR, DemoConfig, Paths


class DemoError(DualPMError):
    """A stage of the demo failed, or OUT holds a demo made with other settings."""


def _script(name: str) -> str:
    """The console script `name` of this installation (next to the running Python), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise DemoError(f"command {name!r} not found next to {sys.executable} or on PATH; "
                        "install the project (make env, or pip install -e .)")
    return found


def stage_commands(config: DemoConfig) -> dict[str, list[str]]:
    """The command line of every stage, in order (program names as a user types them)."""
    p = Paths(Path(config.out))
    features = ["dualpm-prep", "features", str(p.source), str(p.data), "--extractor", config.extractor,
                "--device", config.device]
    if config.extractor == "sd-dino":
        features += ["--sd-model", str(config.sd_model), "--dino-model", str(config.dino_model)]
    else:  # pixels at the training resolution: a finer grid would only be averaged away by the reader
        features += ["--grid", str(config.resolution)]
    commands = {
        "synth": ["dualpm-prep", "synth", str(p.source), "--num-samples", str(config.samples),
                  "--num-models", str(config.models), "--image-size", str(config.image_size),
                  "--faces", str(config.faces), "--seed", str(config.seed)],
        "render": ["dualpm-prep", "render", str(p.source), str(p.data), "--resolution", str(config.resolution),
                   "--layers", str(config.layers), "--shard-size", str(config.shard_size)],
        "features": features,
        "train": ["dualpm-train", config.train_config, "--data", str(p.data), "--out", str(p.run),
                  "--set", f"model.num_layers={config.layers}", "--resume", "auto"],
        "infer": ["dualpm-infer", "--checkpoint", str(p.run), "--data", str(p.data), "--split", "val",
                  "--out", str(p.pred), "--device", config.device, "--overwrite"],
        "eval": ["dualpm-eval", "--pred", str(p.pred), "--data", str(p.data), "--baseline", "--out", str(p.eval)],
    }
    return commands | sequence_commands(config) if config.sequence_frames else commands


def sequence_commands(config: DemoConfig) -> dict[str, list[str]]:
    """The held-out sequence and its animation: the first animal of the dataset (same seed, faces and image
    size make the same rig, byte for byte), in poses and camera paths it was not trained on."""
    p = Paths(Path(config.out))
    features = stage_commands(dataclasses.replace(config, sequence_frames=0))["features"]
    frames = str(config.sequence_frames)
    return {
        "sequence": ["dualpm-prep", "synth", str(p.seq_source), "--num-samples", frames, "--num-models", "1",
                     "--image-size", str(config.image_size), "--faces", str(config.faces), "--seed",
                     str(config.seed), "--sequence", frames, "--val-fraction", "0.99"],
        "sequence-render": ["dualpm-prep", "render", str(p.seq_source), str(p.seq_data), "--resolution",
                            str(config.resolution), "--layers", str(config.layers), "--shard-size",
                            str(config.shard_size)],
        "sequence-features": [*features[:2], str(p.seq_source), str(p.seq_data), *features[4:]],
        "sequence-infer": ["dualpm-infer", "--checkpoint", str(p.run), "--data", str(p.seq_data), "--split", "val",
                           "--out", str(p.seq_pred), "--device", config.device, "--no-ply", "--overwrite"],
        "animate": ["dualpm-animate", "--pred", str(p.seq_pred), "--out", str(p.animation), "--fps", "24",
                    "--overwrite"],
    }


# ---- state: which stages finished, with which command ---------------------------------------------


def load_state(paths: Paths, config: DemoConfig) -> dict[str, Any]:
    """The saved state of a demo in OUT (a fresh one if none); DemoError if OUT was made differently."""
    if not paths.state.exists():
        return {"config": dataclasses.asdict(config), "stages": {}}
    try:
        state = json.loads(paths.state.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DemoError(f"{paths.state}: unreadable demo state ({err}); rerun with --fresh") from err
    if state.get("config") != dataclasses.asdict(config):
        saved = state.get("config") or {}
        changed = sorted(k for k, v in dataclasses.asdict(config).items() if saved.get(k) != v)
        raise DemoError(f"{paths.out} holds a demo made with other settings ({', '.join(changed)}); "
                        "rerun with --fresh to start over, or use another --out")
    return state


def save_state(paths: Paths, state: dict[str, Any]) -> None:
    atomic_write_text(paths.state, json.dumps(state, indent=2) + "\n")


def run_stage(name: str, command: list[str], paths: Paths, state: dict[str, Any], index: int, total: int) -> None:
    """Run one stage unless it finished before with the same command; record its wall time."""
    done = state["stages"].get(name)
    shown = " ".join(command)
    if done is not None and done["command"] == command:
        click.secho(f"[{index}/{total}] {name}: done before ({done['seconds']:.1f} s), reused", fg="green")
        return
    click.secho(f"[{index}/{total}] {name}: {shown}", fg="cyan", bold=True)
    start = time.perf_counter()
    result = subprocess.run([_script(command[0]), *command[1:]], check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise DemoError(f"stage {name!r} failed with exit status {result.returncode} after {seconds:.0f} s "
                        f"(its messages are above). Command: {shown}. Rerun the demo to resume from this stage.")
    state["stages"][name] = {"command": command, "seconds": round(seconds, 2),
                             "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    save_state(paths, state)


def nothing_to_animate(paths: Paths) -> str | None:
    """Why the held-out sequence cannot be animated (no frame with a kept predicted point), else None."""
    from dualpm.predictions import kept_counts, open_predictions

    counts = kept_counts(open_predictions(paths.seq_pred))
    if (counts >= 3).any():
        return None
    return (f"the model keeps no predicted point on any of the {len(counts)} frames of the held-out sequence "
            "(it learned too little to pose the rig)")


def demo_config_from_options(out: Path, train_config: Path, sd_model: str | None, dino_model: str | None,
                             **settings: Any) -> DemoConfig:
    """The demo's settings; sd-dino features exactly when both weight folders are configured."""
    if bool(sd_model) != bool(dino_model):
        missing = "--dino-model (DUALPM_DINO_MODEL)" if sd_model else "--sd-model (DUALPM_SD_MODEL)"
        raise ConfigError(f"ODISE-DINO features need both weight folders; {missing} is not set. "
                          "Set both, or neither for rgb features.")
    extractor = "sd-dino" if sd_model else "rgb"
    return DemoConfig(out=str(out), train_config=str(train_config), extractor=extractor,
                      sd_model=sd_model or None, dino_model=dino_model or None, **settings)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Folder for everything the demo makes (data, run, predictions, report).")
@click.option("--config", "train_config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default="configs/demo.yaml", help="Training config (dualpm-train).")
@click.option("--samples", type=click.IntRange(20, 1_000_000), default=3000, show_default=True,
              help="Synthetic samples (about 10% held out for evaluation).")
@click.option("--models", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Distinct procedural animals (more: a harder task for the CPU budget).")
@click.option("--image-size", type=click.IntRange(32, 4096), default=128, show_default=True,
              help="Side of the synthetic RGB images, pixels.")
@click.option("--faces", type=click.IntRange(500, 1_000_000), default=5000, show_default=True,
              help="Triangles per animal.")
@click.option("--resolution", type=click.IntRange(16, 4096), default=32, show_default=True,
              help="Side of the dual point maps trained on, pixels.")
@click.option("--layers", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Depth layers rendered and predicted.")
@click.option("--sd-model", type=str, envvar="DUALPM_SD_MODEL", show_envvar=True, default=None,
              help="Local Stable Diffusion folder: with --dino-model, ODISE-DINO features instead of rgb.")
@click.option("--dino-model", type=str, envvar="DUALPM_DINO_MODEL", show_envvar=True, default=None,
              help="Local DINOv2 folder (see --sd-model).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Features and inference device; training uses CUDA whenever torch sees it.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the dataset.")
@click.option("--sequence-frames", type=click.IntRange(min=0), default=24, show_default=True,
              help="Frames of the held-out sequence the trained model animates the rig from (0: none).")
@click.option("--fresh", is_flag=True, help="Delete OUT first and run every stage again.")
@click.option("--dry-run", is_flag=True, help="Print the settings and the commands, run nothing.")
@handles_user_errors
def main(out: Path, train_config: Path, samples: int, models: int, image_size: int, faces: int, resolution: int,
         layers: int, sd_model: str | None, dino_model: str | None, device: str, seed: int, sequence_frames: int,
         fresh: bool, dry_run: bool) -> None:
    """Run the whole DualPM pipeline on a small synthetic dataset and write a report (about 10 minutes
    on 2 CPU cores). Reruns reuse finished stages."""
    config = demo_config_from_options(out.resolve(), train_config.resolve(), sd_model, dino_model, samples=samples,
                                      models=models, image_size=image_size, faces=faces, resolution=resolution,
                                      layers=layers, seed=seed, device=device, sequence_frames=sequence_frames)
    paths = Paths(Path(config.out))
    commands = stage_commands(config)
    show_and_save_config(dataclasses.asdict(config), None, "demo config")
    if config.extractor == "rgb":
        click.secho("features: no Stable Diffusion / DINOv2 weights configured, so the network sees RGB pixels "
                    "(`--extractor rgb`), not ODISE-DINO features; set DUALPM_SD_MODEL and DUALPM_DINO_MODEL "
                    "(see README) for the paper's features.", fg="yellow")
    if dry_run:
        for name, command in commands.items():
            click.echo(f"{name}: {' '.join(command)}")
        return
    if fresh and paths.out.exists():
        shutil.rmtree(paths.out)
    paths.out.mkdir(parents=True, exist_ok=True)
    state = load_state(paths, config)
    save_state(paths, state)
    start = time.perf_counter()
    for index, (name, command) in enumerate(commands.items(), start=1):
        if name == "animate" and name not in state["stages"]:
            reason = nothing_to_animate(paths)
            if reason:  # a model that learned too little is a result to report, like the learning check
                click.secho(f"[{index}/{len(commands) + 1}] animate: skipped, {reason}", fg="red", bold=True)
                state["stages"][name] = {"command": command, "seconds": 0.0, "skipped": reason,
                                         "finished": datetime.datetime.now().isoformat(timespec="seconds")}
                save_state(paths, state)
                continue
        run_stage(name, command, paths, state, index, len(commands) + 1)
    click.secho(f"[{len(commands) + 1}/{len(commands) + 1}] report", fg="cyan", bold=True)
    from pipeline.demo_report import write_report  # matplotlib etc.: only once the stages are done

    passed, ratio = write_report(paths, config, state, commands, time.perf_counter() - start)
    # Every stage succeeded, so the demo did its job and exits 0 either way; a model that did not learn
    # enough is a result to read (in red, and in the report), not a crash. tests/test_demo.py's slow test
    # is what enforces the bar.
    click.secho(f"learning check: model / baseline symmetric Chamfer (unit cube) = {ratio:.3f} "
                f"(must be <= {LEARNING_BAR}): {'PASS' if passed else 'FAIL'}", fg="green" if passed else "red",
                bold=True)
    click.echo(f"report: {paths.report / 'report.md'}")
    click.echo(f"pictures: {paths.report / 'training_curve.png'}, {paths.report / 'predictions.png'}")
    click.echo(f"point clouds (PLY): {paths.pred}")
    if config.sequence_frames and not state["stages"]["animate"].get("skipped"):
        click.echo(f"animated rig (open in Blender or three.js): {paths.animation / 'animation.glb'}")


if __name__ == "__main__":
    main()
