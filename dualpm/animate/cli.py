"""`dualpm-animate`: the user's rig animated by what the model saw in the frames.

    dualpm-animate --pred PREDS --out ANIM [--rig RIG.glb] [--order FILE] [--fps 24] ...

Reads the predictions folder of `dualpm-infer` (from --images or --data), orders its frames (natural sort
of the ids, or --order FILE), fits one pose per frame to the rig (`dualpm.animate.fit.fit_frames`), and
writes into OUT:

    animation.glb            the rig as given, plus one animation and a camera node (dualpm.animate.glb)
    animation.bvh            skeleton-only motion (dualpm.animate.bvh)
    shapes/ poses/ cameras/ metadata/   the fitted poses in the published layout (dualpm.animate.dataset)
    fit.json                 per frame and joint: points used, residual, fitted / inherited; the cameras
    preview.png              up to 8 input frames above the fitted rig rendered through their cameras
    animate.config.yaml      the resolved configuration
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import click
import numpy as np
import yaml

from dualpm.animate.bvh import write_bvh
from dualpm.animate.dataset import write_dataset
from dualpm.animate.fit import FIT_METHOD, CameraTrack, estimate_cameras, fit_frames
from dualpm.animate.glb import export_glb
from dualpm.animate.inputs import (
    Template,
    dataset_focal_lengths,
    find_template,
    frame_order,
    image_aspect,
    input_images,
    read_frames,
    training_focal_length,
)
from dualpm.animate.preview import write_preview
from dualpm.cliutils import FloatOrAuto, handles_user_errors, show_and_save_config
from dualpm.errors import ConfigError, DatasetError, DualPMError, GltfError
from dualpm.fileio import atomic_write_json
from dualpm.gltf import load_skinned_mesh, scaled_mesh
from dualpm.predictions import open_predictions
from dualpm.skeleton.fit import DEFAULT_PRIOR_DEGREES, METHODS
from dualpm.skeleton.retarget import retarget_poses
from dualpm.skeleton.smooth import SMOOTH_METHODS, fill_frames, jitter, smooth_poses

DEFAULT_FOCAL_MM = 50.0  # where neither the frames nor the training data say
OUTPUTS = ("animation.glb", "animation.bvh", "fit.json", "poses", "cameras", "metadata", "shapes",
           "preview.png")


class AnimateError(DualPMError):
    """Inputs of dualpm-animate that do not fit together."""


class FocalLength(click.ParamType):
    """A focal length in mm (> 0) or one of the words auto, shared, per-frame."""

    name = "mm|auto|shared|per-frame"
    words = ("auto", "shared", "per-frame")

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value in self.words:
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor one of {', '.join(self.words)}", param, ctx)
        if not (0 < number < float("inf")):
            self.fail(f"{value!r} must be a positive focal length in mm", param, ctx)
        return number


def _model_name(path: Path) -> str:
    name = re.sub(r"[^\w.-]+", "_", path.stem.removesuffix("_shape")).strip("._-")
    return name or "rig"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--pred", "pred", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder written by dualpm-infer (holding predictions.zarr).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (animation.glb, animation.bvh, poses/, cameras/, metadata/, shapes/, "
                   "fit.json, preview.png).")
@click.option("--rig", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Your rig (.glb/.gltf with one skinned mesh), exported with the animation as given. "
                   "Default: the template the model was trained for (through the checkpoint / dataset).")
@click.option("--mesh-scale", type=FloatOrAuto(), default="auto", show_default=True,
              help="With --rig: model units per rig unit (the factor of `dualpm-prep synth --mesh-scale`). "
                   "auto: the factor recorded in the dataset's synth.json, else 1.")
@click.option("--order", "order_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="Text file listing the frame ids in order, one per line (default: natural sort of the "
                   "ids).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=24.0, show_default=True,
              help="Frames per second of the animation.")
@click.option("--focal-length", type=FocalLength(), default="auto", show_default=True,
              help="Focal length of the frames in mm (36 mm sensor height), or: auto (the dataset's "
                   "metadata of the frames for --data predictions, else the training data's median, else "
                   "50), shared (one for all frames, estimated from the predicted points' perspective), "
                   "per-frame (one each; the estimates need accurate predicted depth).")
@click.option("--min-points", type=click.IntRange(min=3), default=3, show_default=True,
              help="Fewest points for a joint's own fit; joints with fewer inherit their parent's motion.")
@click.option("--fit", type=click.Choice(METHODS), default=FIT_METHOD, show_default=True,
              help="Pose fit: lbs (the rig's rigid skeleton against the full skinning residual, robust) or "
                   "kabsch (the reference's per-bone fit).")
@click.option("--pose-prior", "pose_prior", type=click.FloatRange(min=0, max=180), default=DEFAULT_PRIOR_DEGREES,
              show_default=True,
              help="Degrees: with --fit lbs, the spread of a Gaussian prior on each joint's rotation from rest, "
                   "weighed against the points' noise (estimated per frame: exact points are not held back); "
                   "0: no prior.")
@click.option("--smooth", type=click.Choice(("auto",) + SMOOTH_METHODS), default="auto", show_default=True,
              help="Filter the poses over time on the rotation manifold; auto: savgol for 3 frames or more, "
                   "none for fewer.")
@click.option("--target-rig", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Retarget the motion to this other rig and export that one.")
@click.option("--joint-map", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --target-rig: YAML mapping of source joint names to target joint names (for "
                   "joints whose names differ).")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in OUT.")
@click.option("--dry-run", is_flag=True, help="Resolve inputs and print the configuration; write nothing.")
@handles_user_errors
def main(pred: Path, out: Path, rig: Path | None, mesh_scale: float | str, order_file: Path | None,
         fps: float, focal_length: float | str, min_points: int, fit: str, pose_prior: float, smooth: str,
         target_rig: Path | None, joint_map: Path | None, overwrite: bool, dry_run: bool) -> None:
    """Animate a rig with the poses fitted to dualpm-infer's predictions of a sequence of frames."""
    if joint_map is not None and target_rig is None:
        raise ConfigError("--joint-map needs --target-rig")
    preds = open_predictions(pred)
    ids = frame_order(preds.ids, order_file)
    template = find_template(preds, ids)
    smooth = ("savgol" if len(ids) >= 3 else "none") if smooth == "auto" else smooth
    rig_path, factor, model = _resolve_rig(pred, rig, mesh_scale, template)
    user_rig = load_skinned_mesh(rig_path)
    fit_rig = user_rig if factor == 1.0 else scaled_mesh(user_rig, factor)
    config = {
        "pred": str(pred.resolve()), "out": str(out), "frames": len(ids), "first": ids[0], "last": ids[-1],
        "order": str(order_file) if order_file else "natural sort of the ids",
        "rig": str(rig_path), "template": str(template.path) if template else None, "model": model,
        "mesh_scale": factor, "fps": fps, "focal_length": focal_length, "min_points": min_points,
        "fit": fit, "pose_prior": pose_prior, "smooth": smooth, "target_rig": str(target_rig) if target_rig else None,
        "joint_map": str(joint_map) if joint_map else None,
    }
    if dry_run:
        show_and_save_config(config, None, "animate config (dry run)")
        click.echo(f"{len(ids)} frames would be fitted to {rig_path} and written to {out}")
        return
    taken = [name for name in OUTPUTS if (out / name).exists()]
    if taken and not overwrite:
        raise AnimateError(f"{out}: holds {', '.join(taken)} of an earlier run; pass --overwrite or another "
                           "--out")
    start = time.perf_counter()
    frames = read_frames(preds, ids)
    seen = np.flatnonzero([frame is not None for frame in frames])  # frames where the animal was seen
    if not len(seen):
        raise AnimateError(f"{pred}: no frame has 3 or more kept points, nothing to fit (empty masks, or a "
                           "model that predicts no surface?)")
    seen_ids, seen_frames = [ids[i] for i in seen], [frames[i] for i in seen]
    fitted = fit_frames(fit_rig, seen_frames, min_points=min_points, ids=seen_ids, method=fit,
                        prior_degrees=pose_prior)
    poses = fill_frames(fitted.poses, seen, len(ids))  # unseen frames: interpolated between their neighbours
    report = fitted.to_json(seen_ids)
    fitted_frames = dict(zip(seen_ids, report["frames"], strict=True))
    report["frames"] = [fitted_frames.get(i, {"id": i, "joints": [], "status": "no kept points: interpolated"})
                        for i in ids]
    if len(seen) < len(ids):
        click.secho(f"{len(ids) - len(seen)} of {len(ids)} frames have fewer than 3 kept points; their poses "
                    "and cameras are interpolated from their neighbours (fit.json lists them)", fg="yellow")
    if smooth != "none":
        before = jitter(fit_rig, poses, fps)
        poses = smooth_poses(fit_rig, poses, fps, smooth)
        report["jitter"] = {"method": smooth, "before": before, "after": jitter(fit_rig, poses, fps)}
    focal, focal_source = _focal_lengths(preds, ids, focal_length)
    if not isinstance(focal, (str, float, int)):  # one per frame: those of the seen frames
        focal = [focal[i] for i in seen]
    seen_camera = estimate_cameras(seen_frames, image_aspect(preds, ids), focal)
    every = np.arange(len(ids))
    camera = CameraTrack(np.interp(every, seen, seen_camera.focal_mm), seen_camera.aspect,
                         np.interp(every, seen, seen_camera.depth))
    export_path, export_rig, scale, track = rig_path, fit_rig, factor, camera
    if target_rig is not None:
        mapping = _read_joint_map(joint_map) if joint_map else None
        export_rig = load_skinned_mesh(target_rig)
        poses, unmatched = retarget_poses(fit_rig, poses, export_rig, mapping)
        export_path, scale, track, model = target_rig, 1.0, None, _model_name(target_rig)
        report["unmatched_target_joints"] = list(unmatched)
        click.echo(f"retargeted to {target_rig}; joints left at rest: {', '.join(unmatched) or 'none'}")
    for name in taken:  # --overwrite: no stale frames of the earlier run may stay in poses/ etc.
        (shutil.rmtree if (out / name).is_dir() else Path.unlink)(out / name)
    out.mkdir(parents=True, exist_ok=True)
    show_and_save_config(config, out / "animate.config.yaml", "animate config")
    summary = export_glb(export_path, out / "animation.glb", poses, fps, scale, track)
    try:
        write_bvh(out / "animation.bvh", export_rig, poses, fps, scale)
    except GltfError as err:  # a skeleton BVH cannot hold (several root joints): the rest is still useful
        (out / "animation.bvh").unlink(missing_ok=True)
        report["bvh"] = str(err)
        click.echo(f"animation.bvh not written: {err}")
    if track is not None:
        write_dataset(out, export_rig, model, ids, poses, track)
        write_preview(out / "preview.png", ids, input_images(preds, ids), export_rig, poses, track)
    cameras = None if track is None else {
        "focal_length_mm": track.focal_mm.tolist(), "focal_source": focal_source, "aspect": track.aspect,
        "view_z": track.depth.tolist()}
    report |= {"ids": list(ids), "fps": fps, "mesh_scale": factor, "camera": cameras}
    atomic_write_json(out / "fit.json", report)
    fitted_share = np.mean([j["status"] == "fitted" for frame in fitted.joints for j in frame])
    click.echo(f"animated {len(ids)} frames ({summary['animated_nodes']} nodes, {fitted_share:.0%} of joints "
               f"fitted, focal {np.median(camera.focal_mm):.1f} mm: {focal_source}) in "
               f"{time.perf_counter() - start:.1f} s -> {out / 'animation.glb'}")


def _resolve_rig(pred: Path, rig: Path | None, mesh_scale: float | str,
                 template: Template | None) -> tuple[Path, float, str]:
    """(the rig file to export, model units per rig unit, model name); checks it against the template."""
    if rig is None:
        if template is None:
            raise AnimateError(f"{pred}: cannot find the template the model was trained for (no dataset "
                               "recorded, or it moved); pass --rig RIG.glb")
        return template.path, 1.0, template.model
    if template is None:
        return rig, mesh_scale if isinstance(mesh_scale, float) else 1.0, _model_name(rig)
    given, trained = load_skinned_mesh(rig), load_skinned_mesh(template.path)
    if trained.num_joints != given.num_joints:
        raise AnimateError(f"{rig}: has {given.num_joints} joints but the predictions were made for "
                           f"{template.path} with {trained.num_joints}; pass the rig the model was trained "
                           "for")
    return rig, mesh_scale if isinstance(mesh_scale, float) else template.mesh_scale, template.model


def _focal_lengths(preds, ids: list[str], option: float | str) -> tuple[float | np.ndarray | str, str]:
    """What `estimate_cameras` gets for --focal-length, and where it comes from (for fit.json)."""
    if option in ("shared", "per-frame"):
        return option, f"estimated ({option}) from the predicted points"
    if option != "auto":
        return option, "--focal-length"
    known = dataset_focal_lengths(preds, ids)
    if known is not None:
        return known, "the dataset's metadata of the frames"
    median = training_focal_length(preds)
    if median is not None:
        return median, "the training dataset's median"
    return DEFAULT_FOCAL_MM, "the default"


def _read_joint_map(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DatasetError(f"{path}: cannot read the joint map ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise DatasetError(f"{path}: the joint map must be a YAML mapping of source joint names to target "
                           "names")
    return data


if __name__ == "__main__":
    main()
