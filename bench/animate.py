"""Benchmark of pose fitting for animation (issue 23 "Measure"): accuracy, jitter and speed on held-out
synthetic sequences of the demo animal.

    python bench/animate.py [--work DIR] [--sequences 2] [--frames 24] [--checkpoint RUN/checkpoints/latest.pt]

Steps (console scripts as subprocesses): `dualpm-prep synth --sequence` (the demo's animal: seed 0, one model,
5000 faces, 128 px), `dualpm-prep render` (32 px, 4 layers, as the demo), `dualpm-infer --oracle` (the
ground-truth dual point maps; the store needs a features column: rgb) and, with --checkpoint,
`dualpm-infer --images` with the model (features and
PCA basis from the checkpoint). For every sequence and predictions: rest pose (the rest mesh placed by one
rigid fit of all point pairs), per-bone Kabsch (`fit_sequence(method="kabsch")`, the reference) and the
rigid-skeleton LBS fit (`method="lbs"` with dualpm-animate's default pose prior, and without it; also
smoothed: savgol, oneeuro). Every fit is exported as `dualpm-animate` exports it (`export_glb`, the rig's own
glTF plus the animation) and its keyframes are read back from the GLB (`dualpm.animation.load_clips`, sampled
at each frame's time) and re-skinned: what is measured is the file a user gets. Reported: per-vertex error of
the re-skinned mesh against the ground-truth posed mesh in the predictions' camera space (% of body length =
longest side of the rest mesh), the same after removing each frame's mean offset ("centred": the
articulation alone, without the depth a monocular model misjudges), joint position error (same unit), jitter
(mean joint acceleration, body lengths / s^2 at --fps) and CPU seconds per frame of each fit + GLB export
(this process is pinned to one thread).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core, before numpy loads
    os.environ[_name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dualpm.animate.glb import export_glb  # noqa: E402
from dualpm.animation import load_clips, sample_clip  # noqa: E402
from dualpm.camera import view_from_camera_pose  # noqa: E402
from dualpm.data.source import SourceDataset  # noqa: E402
from dualpm.gltf import load_skinned_mesh  # noqa: E402
from dualpm.predictions import keep_mask, open_predictions  # noqa: E402
from dualpm.skeleton.fit import DEFAULT_PRIOR_DEGREES, FrameObservation, fit_sequence, rig_size  # noqa: E402
from dualpm.skeleton.kinematics import RigTree  # noqa: E402
from dualpm.skeleton.rigid import kabsch_umeyama  # noqa: E402
from dualpm.skeleton.smooth import jitter, smooth_poses  # noqa: E402
from dualpm.skinning import read_pose_file, skin  # noqa: E402

torch.set_num_threads(1)
BIN = Path(sys.executable).parent


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, sequences: int, frames: int, checkpoint: Path | None) -> dict[str, Path]:
    source, data = work / "source", work / "data"
    if not (source / "synth.json").exists():
        run("dualpm-prep", "synth", str(source), "--num-samples", str(sequences * frames), "--num-models", "1",
            "--image-size", "128", "--faces", "5000", "--seed", "0", "--sequence", str(frames),
            "--val-fraction", "0.99", "--workers", "1")
    if not (data / "manifest.json").exists():
        run("dualpm-prep", "render", str(source), str(data), "--resolution", "32", "--layers", "4",
            "--shard-size", "64", "--workers", "1")
    if "features" not in json.loads((data / "manifest.json").read_text()).get("columns", {}):
        run("dualpm-prep", "features", str(source), str(data), "--extractor", "rgb", "--device", "cpu", "--grid",
            "32", "--workers", "1")  # the oracle reads a store with features (their values do not matter)
    out = {"oracle": work / "oracle"}
    if not (out["oracle"] / "predictions.zarr").exists():
        run("dualpm-infer", "--oracle", "--data", str(data), "--split", "val", "--out", str(out["oracle"]),
            "--no-ply", "--no-sheets", "--device", "cpu")
    if checkpoint is not None:
        out["model"] = work / "model"
        if not (out["model"] / "predictions.zarr").exists():
            run("dualpm-infer", "--checkpoint", str(checkpoint), "--images", str(source / "renders"), "--masks",
                str(source / "masks"), "--out", str(out["model"]), "--no-ply", "--no-sheets", "--device", "cpu")
    return out


def camera_space(view: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World points -> the predictions' camera space (view applied, view[2, 3] subtracted from z)."""
    out = points @ view[:3, :3].T + view[:3, 3]
    out[..., 2] -= view[2, 3]
    return out


def observations(preds, ids: list[str]) -> list[FrameObservation]:
    occ, conf = preds.attrs["occupancy_threshold"], preds.attrs["confidence_threshold"]
    index = {sample_id: i for i, sample_id in enumerate(preds.ids)}
    frames = []
    for sample_id in ids:
        maps = preds.sample(index[sample_id])
        keep = keep_mask(maps, occ, conf)
        canonical = np.moveaxis(maps.canonical, -3, -1)[keep].astype(np.float64)
        posed = np.moveaxis(maps.posed, -3, -1)[keep].astype(np.float64)
        confidence = np.minimum(maps.confidence[keep].astype(np.float64), 1e4)
        frames.append(FrameObservation(canonical, posed, confidence))
    return frames


def rest_placed(mesh, tree: RigTree, frame: FrameObservation) -> tuple[np.ndarray, np.ndarray]:
    """Rest mesh and rest joints moved by one rigid fit of all the frame's point pairs."""
    rotation, translation, _ = kabsch_umeyama(frame.canonical, frame.posed)
    rest_world = tree.pose_world(tree.rest)
    vertices = skin(mesh, tree.rest, dtype=torch.float64)[0].numpy()
    joints = rest_world[tree.joint_nodes, :3, 3]
    return vertices @ rotation.T + translation, joints @ rotation.T + translation


def through_glb(mesh, poses: np.ndarray, fps: float, work: Path) -> np.ndarray:
    """The poses as a user gets them: exported into the rig's own glTF, read back and sampled at the keys."""
    path = work / "bench.glb"
    export_glb(mesh.source, path, poses, fps)
    (clip,) = load_clips(path, mesh.num_nodes)
    return sample_clip(clip, mesh, np.arange(len(poses)) / fps)


def measure(mesh, tree, frames, truth_vertices, truth_joints, fps: float, size: float, work: Path
            ) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    rest = [rest_placed(mesh, tree, f) for f in frames]
    rows["rest pose"] = errors(np.stack([v for v, _ in rest]), np.stack([j for _, j in rest]), truth_vertices,
                               truth_joints, size) | {"jitter": acceleration(np.stack([j for _, j in rest]), fps)
                                                      / size}
    fits = {}
    spread = np.radians(DEFAULT_PRIOR_DEGREES)
    for name, method, prior in (("kabsch", "kabsch", None), ("lbs", "lbs", spread),
                                ("lbs, no prior", "lbs", None)):
        start = time.process_time()  # CPU seconds of this one-thread process: robust on a shared machine
        fitted = fit_sequence(mesh, frames, method=method, spread=prior).poses
        fits[name] = through_glb(mesh, fitted, fps, work)
        seconds = (time.process_time() - start) / len(frames)
        rows[name] = pose_errors(mesh, tree, fits[name], truth_vertices, truth_joints, size) | {
            "jitter": jitter(mesh, fits[name], fps) / size, "s_per_frame": seconds}
    for smoothing in ("savgol", "oneeuro"):
        smoothed = through_glb(mesh, smooth_poses(mesh, fits["lbs"], fps, smoothing), fps, work)
        rows[f"lbs + {smoothing}"] = pose_errors(mesh, tree, smoothed, truth_vertices, truth_joints, size) | {
            "jitter": jitter(mesh, smoothed, fps) / size}
    rows["ground truth"] = {"jitter": acceleration(truth_joints, fps) / size}
    return rows


def least_squares_seconds(mesh, tree, frames, size: float) -> tuple[float, float]:
    """Seconds per frame of the LBS solve alone, with our solver and with scipy.optimize.least_squares (trf,
    Huber, the same analytic Jacobian), from the same Kabsch start: the choice made in dualpm/skeleton/fit.py."""
    from scipy.optimize import least_squares

    from dualpm.skeleton import fit as fitting
    from dualpm.skeleton.joints import estimate_joint_transforms

    ours = scipy = 0.0
    for frame in frames:
        prepared = fitting._subsample(fitting._prepare(mesh, 0, frame, size), 2000)
        kabsch = estimate_joint_transforms(prepared.canonical, prepared.posed, prepared.weights, min_weight=0.5,
                                           min_points=3, parents=tree.joint_parent)
        start = fitting.local_pose_from_skinning(tree, kabsch.transforms)
        roots = tree.joint_nodes[tree.skeleton_roots]
        placed = start[roots, 4:].copy()
        start[:, 4:] = tree.rest[:, 4:]
        start[roots, 4:] = placed
        free = ((prepared.weights @ tree.below) >= fitting.SUPPORT_WEIGHT).sum(axis=0) >= 3  # as fit_sequence
        start[tree.joint_nodes[~free], :4] = tree.rest[tree.joint_nodes[~free], :4]
        problem = fitting._LbsProblem(tree, prepared, start, free)
        clock = time.process_time()
        fitting.solve_robust(problem, fitting.HUBER_FRACTION * size)
        ours += time.process_time() - clock
        problem = fitting._LbsProblem(tree, prepared, start, free)
        clock = time.process_time()
        least_squares(problem.residuals, problem.x0(), jac=problem.jacobian, method="trf", loss="huber",
                      f_scale=fitting.HUBER_FRACTION * size, x_scale=1.0, ftol=1e-8, xtol=1e-10, gtol=1e-10)
        scipy += time.process_time() - clock
    return ours / len(frames), scipy / len(frames)


def acceleration(joints: np.ndarray, fps: float) -> float:
    return float(np.linalg.norm((joints[2:] - 2 * joints[1:-1] + joints[:-2]) * fps**2, axis=2).mean())


def pose_errors(mesh, tree, poses, truth_vertices, truth_joints, size) -> dict:
    vertices = skin(mesh, poses, dtype=torch.float64).numpy()
    joints = np.stack([tree.pose_world(p)[tree.joint_nodes, :3, 3] for p in poses])
    return errors(vertices, joints, truth_vertices, truth_joints, size)


def errors(vertices, joints, truth_vertices, truth_joints, size) -> dict:
    offset = vertices.mean(axis=-2, keepdims=True) - truth_vertices.mean(axis=-2, keepdims=True)  # (F, 1, 3)
    return {"vertex_pct": 100 * float(np.linalg.norm(vertices - truth_vertices, axis=-1).mean()) / size,
            "centred_pct": 100 * float(np.linalg.norm(vertices - offset - truth_vertices, axis=-1).mean()) / size,
            "joint_pct": 100 * float(np.linalg.norm(joints - truth_joints, axis=-1).mean()) / size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dualpm-bench-animate"))
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON too.")
    args = parser.parse_args()
    predictions = prepare(args.work, args.sequences, args.frames, args.checkpoint)
    dataset = SourceDataset(args.work / "source")
    mesh = load_skinned_mesh(dataset.layout.mesh(dataset.models[0]))
    tree, size = RigTree.of(mesh), rig_size(mesh)
    ids = dataset.ids
    results = {}
    for name, folder in predictions.items():
        preds = open_predictions(folder)
        table: dict[str, list[dict]] = {}
        for s in range(args.sequences):
            seq = ids[s * args.frames : (s + 1) * args.frames]
            views = [view_from_camera_pose(torch.from_numpy(dataset.sample(i).camera_pose)).numpy() for i in seq]
            poses = np.stack([read_pose_file(dataset.sample(i).pose_path, mesh.num_nodes) for i in seq])
            world_vertices = skin(mesh, poses.astype(np.float64), dtype=torch.float64).numpy()
            world_joints = np.stack([tree.pose_world(p)[tree.joint_nodes, :3, 3] for p in poses])
            truth_vertices = np.stack([camera_space(v, x) for v, x in zip(views, world_vertices, strict=True)])
            truth_joints = np.stack([camera_space(v, x) for v, x in zip(views, world_joints, strict=True)])
            frames = observations(preds, seq)
            rows = measure(mesh, tree, frames, truth_vertices, truth_joints, args.fps, size, args.work)
            for method, row in rows.items():
                table.setdefault(method, []).append(row)
        results[name] = {m: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for m, rows in table.items()}
        ours, scipy = least_squares_seconds(mesh, tree, observations(preds, ids[: min(8, len(ids))]), size)
        results[name]["solver"] = {"ours_s": ours, "least_squares_s": scipy}
    print(f"\n{platform.processor() or platform.machine()}, one thread; {args.sequences} sequences x {args.frames} "
          f"frames, {mesh.num_joints} joints, body length {size:.3f}")
    for name, table in results.items():
        print(f"\n{name} predictions: method | vertex error % | centred % | joint error % | jitter (body/s^2) | "
              "s/frame")
        for method, row in table.items():
            if method == "solver":
                continue
            cells = [f"{row[k]:.3f}" if k in row else "-" for k in ("vertex_pct", "centred_pct", "joint_pct", "jitter")]
            cells.append(f"{row['s_per_frame']:.3f}" if "s_per_frame" in row else "-")
            print(f"  {method:16s} | " + " | ".join(cells))
        if "lbs" in table:
            print(f"  lbs / kabsch time ratio {table['lbs']['s_per_frame'] / table['kabsch']['s_per_frame']:.2f}, "
                  f"vertex error ratio {table['lbs']['vertex_pct'] / table['kabsch']['vertex_pct']:.3f}")
        solver = table["solver"]
        print(f"  LBS solve alone, s/frame: ours {solver['ours_s']:.3f}, scipy least_squares "
              f"{solver['least_squares_s']:.3f} (ratio {solver['least_squares_s'] / solver['ours_s']:.1f})")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
