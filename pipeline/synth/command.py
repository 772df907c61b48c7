"""`dualpm-prep synth OUT`: write a synthetic dataset of rigged quadrupeds in the published layout."""

from __future__ import annotations

from pathlib import Path

import click

from dualpm.cliutils import FloatOrAuto, OutputFolder, handles_user_errors, renamed_option, show_and_save_config
from dualpm.data.source import Layout
from dualpm.fileio import refuse_nested
from dualpm.render import BACKENDS
from pipeline.cluster import connect_timeout_option
from pipeline.synth.config import CONFIG_NAME, FAILURES_NAME, SynthConfig
from pipeline.synth.generate import (
    chunks,
    generate,
    make_plan,
    mesh_path,
    prepare_output,
    sample_done,
)
from pipeline.synth.preview import write_preview
from pipeline.synth.rig_assets import APPEARANCES, POSE_SOURCES

PREVIEW_DEFAULT = "OUT/preview.png"


@click.command()
@click.argument("out", type=OutputFolder())
@click.option("--num-samples", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples to generate.")
@click.option("--num-models", type=click.IntRange(min=1), default=4, show_default=True,
              help="Procedural animals (with --mesh: the number of meshes).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of every random draw.")
@click.option("--image-size", type=click.IntRange(8, 4096), default=256, show_default=True,
              help="Image side, pixels.")
@click.option("--faces", type=click.IntRange(min=500), default=20000, show_default=True,
              help="Triangles per procedural animal (user meshes are kept as they are).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1,
              show_default=True,
              help="Share of the other models' samples held out in splits/val.txt.")
@click.option("--heldout-models", type=click.IntRange(min=0), default=0, show_default=True,
              help="Models whose samples all go to val (listed in splits/val_models.txt).")
@click.option("--mesh", "meshes", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Rigged glTF/GLB with one skinned mesh, used instead of procedural animals (repeatable).")
@click.option("--mesh-scale", type=FloatOrAuto(), default="auto", show_default=True,
              help="Factor applied to every --mesh rig (vertices, bones, poses, cameras), e.g. 0.01 for a "
                   "rig in cm; auto: its rest mesh's longest side becomes 2.4 (the procedural animals').")
@click.option("--sequence", type=click.IntRange(min=0), default=0, show_default=True,
              help="Frames per sequence: consecutive ids of one model move smoothly (key poses splined on the "
                   "rotation manifold, orbiting camera); whole sequences are held out. 0: independent samples.")
@click.option("--appearance", type=click.Choice(APPEARANCES), default="auto", show_default=True,
              help="asset: a --mesh rig's own glTF material (base colour texture, factor, vertex colours); "
                   "procedural: the fur coat; mixed: half each; auto: asset for rigs with a material.")
@click.option("--poses", "pose_source", type=click.Choice(POSE_SOURCES), default="auto", show_default=True,
              help="random: joint perturbations; clips: a random time of a random animation clip of the rig; "
                   "mixed: half each; auto: mixed for rigs with clips, else random.")
@click.option("--clip-jitter", type=click.FloatRange(0.0, 180.0), default=0.0, show_default=True,
              help="Degrees: each joint of a clip pose turns by up to this much about a random axis.")
@click.option("--hdri", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder of equirectangular images: light the animal and are seen behind it.")
@click.option("--backgrounds", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder of photos put behind the animal (random crop, scale, flip).")
@click.option("--random-yaw/--no-random-yaw", "yaw", default=True, show_default=True,
              help="Turn each sample's whole body by a random angle about +Y.")
@renamed_option("--yaw", "--no-yaw", new="--random-yaw/--no-random-yaw", takes_value=False,
                meaning="a random turn on or off; --yaw DEG is an angle in dualpm-eval")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Renderer: cuda (nvdiffrast) where Ray has GPUs, else cpu (Embree).")
@click.option("--address", type=str, default=None, show_default="start a local Ray",
              help="host:port of a running Ray cluster (OUT must be on a filesystem its nodes share).")
@connect_timeout_option
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="all CPUs",
              help="Tasks at a time (and CPUs of the local Ray).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Samples per Ray task (all of one model).")
@click.option("--overwrite", is_flag=True,
              help="Redo everything, also finished samples, and accept new settings.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), is_flag=False,
              flag_value=PREVIEW_DEFAULT, default=None,
              help=f"Write a contact sheet of the first samples (RGB + mask); alone: {PREVIEW_DEFAULT}.")
@click.option("--dry-run", is_flag=True, help="Print the config and the planned work, write nothing.")
@click.pass_context
@handles_user_errors
def synth(ctx: click.Context, out: Path, num_samples: int, num_models: int, seed: int, image_size: int,
          faces: int, val_fraction: float, heldout_models: int, meshes: tuple[Path, ...],
          mesh_scale: float | str, sequence: int, appearance: str, pose_source: str, clip_jitter: float,
          hdri: Path | None,
          backgrounds: Path | None, yaw: bool, backend: str, address: str | None, connect_timeout: float,
          workers: int | None, chunk_size: int, overwrite: bool, preview: Path | None, dry_run: bool) -> None:
    """Generate a synthetic dataset of rigged quadrupeds in OUT, in the published DualPM layout.

    Writes shapes/<model>/<model>_shape.gltf, poses/, cameras/, metadata/, renders/, masks/,
    splits/val.txt and synth.json; reruns resume (finished samples are skipped).
    """
    for mesh in meshes:  # synth writes, and with --overwrite deletes, inside OUT
        refuse_nested(mesh, out, "a --mesh file")
    if meshes:
        explicit = ctx.get_parameter_source("num_models") != click.core.ParameterSource.DEFAULT
        if explicit and num_models != len(meshes):
            raise click.UsageError(f"--num-models {num_models} disagrees with the {len(meshes)} --mesh files")
        num_models = len(meshes)
    elif ctx.get_parameter_source("mesh_scale") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--mesh-scale applies to --mesh rigs; the procedural animals are made to size")
    config = SynthConfig(
        num_samples=num_samples, num_models=num_models, seed=seed, image_size=image_size, faces=faces,
        val_fraction=val_fraction, heldout_models=heldout_models, meshes=tuple(meshes), mesh_scale=mesh_scale,
        yaw=yaw, backend=backend, chunk_size=chunk_size, sequence=sequence, appearance=appearance, poses=pose_source,
        hdri=hdri, clip_jitter=clip_jitter, backgrounds=backgrounds,
    )
    shown = config.record() | {"backend": backend, "chunk_size": chunk_size, "workers": workers or "all",
                               "address": address or "local", "out": str(out)}
    show_and_save_config(shown, None, "synth config" + (" (dry run)" if dry_run else ""))
    plan = make_plan(config)  # validates --mesh files before anything is written
    if dry_run:
        prepare_output(out, config, plan, overwrite, dry_run=True)
        layout = Layout(out)
        done = 0 if overwrite else sum(sample_done(layout, s.id) for s in plan.samples)
        for model in plan.models:
            kept = not overwrite and mesh_path(out, model.name).exists()
            count = sum(s.model == model.index for s in plan.samples)
            source = f"{model.source} scaled by {model.scale:.6g}" if model.source else "procedural"
            click.echo(f"  model {model.name}: {count} samples, from {source}{' (exists)' if kept else ''}")
        todo = chunks(config, plan, out, overwrite)
        held = f", held-out models {list(plan.val_models)}" if plan.val_models else ""
        click.echo(f"planned: {len(plan.samples)} samples ({done} done, {len(plan.samples) - done} to do in "
                   f"{len(todo)} tasks), {len(plan.val_ids)} in splits/val.txt{held}; nothing written")
        return
    for model in plan.models:
        if model.source is not None:
            click.echo(f"  model {model.name}: {model.source} scaled by {model.scale:.6g} "
                       f"(--mesh-scale {mesh_scale})")
    summary = generate(out, config, plan, overwrite=overwrite, address=address, workers=workers,
                       connect_timeout=connect_timeout)
    click.echo(summary.line())
    if preview is not None:
        target = out / "preview.png" if str(preview) == PREVIEW_DEFAULT else preview
        shown = write_preview(out, target)
        click.echo(f"preview of {shown} samples: {target}")
    if summary.failed:
        raise click.ClickException(
            f"{summary.failed} samples failed (see {out / FAILURES_NAME}); rerun to retry them"
        )
    click.echo(f"dataset: {out} (settings in {out / CONFIG_NAME})")
