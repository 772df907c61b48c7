"""Evaluation protocols as objects: what a protocol is called, how it scores, what its headline number is.

A `Protocol` holds everything that differs between protocols: its one-line definition (printed in every
summary and table), its default ICP iterations, its headline metric (the model / baseline ratio of
summary.json) and how it scores a whole predictions store (`score_store`) or one reconstruction file
against one target mesh (`score_pair`). `dualpm-eval`, `dualpm-eval pair` and the summaries read these
fields and never branch on a protocol's name, so a third protocol is one new object in `PROTOCOLS`.

    dualpm    our learning check (`dualpm.eval.evaluate`): Chamfer to the GT layers and the GT surface in
              camera space, no rescale, optional ICP. Not comparable with published numbers.
    animodel  the Animodel benchmark's protocol (`dualpm.eval.animodel`): world frame, volume rescale,
              ICP + 180-degree flip, Chamfer on even points, unit cube by the target mesh's box.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from tqdm import tqdm

from dualpm.errors import ConfigError
from dualpm.eval.animodel import AnimodelOptions, score, score_all
from dualpm.eval.baseline import ConstantBaseline
from dualpm.eval.evaluate import EvalOptions, GroundTruthReader, chamfer_metrics, evaluate_prediction, skeleton_metrics
from dualpm.eval.metrics import EvalError, sample_surface
from dualpm.eval.targets import TargetMeshes, load_target, to_frame
from dualpm.predictions import SAMPLES, PredictionsReader, keep_mask
from dualpm.store.access import Store

Rows = list[dict[str, float]]


@dataclass(frozen=True)
class StoreJob:
    """One evaluation of a predictions store: the predictions and every setting any protocol reads.

    `data` is the prepared dataset with the ground truth (None only with `targets`), `source` its source
    dataset (meshes, poses, cameras; None: the manifest's), `targets` an Animodel-layout folder of meshes.
    """

    predictions: PredictionsReader
    options: EvalOptions
    animodel: AnimodelOptions
    data: Path | str | Store | None
    source: Path | None
    targets: Path | None
    frame: str
    yaw: float
    workers: int
    baseline: ConstantBaseline | None


@dataclass(frozen=True)
class StoreScores:
    """Per-sample rows of one evaluation: `ids` in row order, the baseline's rows (None without one),
    per-joint (rotation degrees, position error) lists of the skeleton metrics, notes for the summary."""

    ids: list[str]
    model: Rows
    baseline: Rows | None
    joints: dict[str, list[tuple[float, float]]]
    notes: list[str]


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol (module docstring). `headline` is the metric whose model / baseline mean ratio
    is summary.json's `chamfer_ratio_model_over_baseline`, `headline_words` says what it measures."""

    name: str
    definition: str
    icp_iterations: int
    headline: str
    headline_words: str
    surface_ratio: str | None  # a second ratio, to the GT surface, where the protocol has one
    mesh_targets: bool  # scores against target meshes, so `dualpm-eval --targets DIR` applies
    pair_frames: tuple[tuple[str, str], ...]  # (metric prefix, label) of the Chamfer lines `pair` prints
    score_store: Callable[[StoreJob], StoreScores]
    score_pair: Callable[[trimesh.Trimesh | np.ndarray, trimesh.Trimesh, AnimodelOptions, int, Path], dict]
    store_config: Callable[[StoreJob], dict]  # the protocol's own entries of the printed, saved config

    def ratio_definition(self) -> str:
        return (f"mean {self.headline} of the model / that of the constant baseline: {self.headline_words}; "
                "lower is better, null without --baseline")

    def ratios(self, model: dict[str, float], baseline: dict[str, float] | None) -> tuple[float | None, ...]:
        """(headline ratio, surface ratio): model mean / baseline mean, None where either is missing."""
        keys = (self.headline, self.surface_ratio)
        return tuple(None if key is None else _ratio(model, baseline, key) for key in keys)


def finite(value: float) -> float | None:
    """`value` if it is a finite float, else None (JSON has no NaN or inf)."""
    return value if isinstance(value, float) and math.isfinite(value) else None


def _ratio(model: dict[str, float], baseline: dict[str, float] | None, key: str) -> float | None:
    if baseline is None or key not in model or key not in baseline:
        return None
    m, b = model[key], baseline[key]
    return finite(m / b) if b > 0 and math.isfinite(b) else None


# ------------------------------------------------------------------------------------------ dualpm


def _dualpm_store(job: StoreJob) -> StoreScores:
    """Every sample of the store against the prepared dataset's ground truth, in the order of its ids."""
    pred, options, baseline = job.predictions, job.options, job.baseline
    reader = GroundTruthReader(job.data, job.source, options.surface_points, options.seed)
    skeletons = bool(pred.attrs.get("skeleton"))
    index = {sid: i for i, sid in enumerate(pred.ids)}
    model_rows: Rows = [{} for _ in pred.ids]
    baseline_rows = None if baseline is None else [{} for _ in pred.ids]
    joints: dict[str, list[tuple[float, float]]] = {}
    notes: list[str] = [reader.source_note] if reader.source_note else []
    for gt in tqdm(reader.read(pred.ids), total=len(pred), desc="eval", unit="sample", dynamic_ncols=True):
        i = index[gt.sample_id]
        maps = pred.sample(i)
        keep = keep_mask(maps, options.occupancy_threshold, options.confidence_threshold)
        occupied = (maps.occupancy.astype(np.float32) > options.occupancy_threshold) & (maps.mask[None] > 0)
        model_rows[i] = evaluate_prediction(maps.canonical, maps.posed, keep, occupied, gt, options)
        if gt.note and gt.note != reader.source_note:
            notes.append(gt.note)
        if skeletons and gt.joints is not None:
            path = pred.path.parent / SAMPLES / gt.sample_id / "skeleton.json"
            if not path.exists():
                notes.append(f"{gt.sample_id}: no skeleton.json (the fit failed at inference)")
            else:
                row, per_joint = skeleton_metrics(path, gt)
                model_rows[i].update(row)
                for name, errors in per_joint.items():
                    joints.setdefault(name, []).append(errors)
        if baseline is not None:
            canonical, posed, base_keep = baseline.predict(maps.mask)
            baseline_rows[i] = evaluate_prediction(canonical, posed, base_keep, base_keep, gt, options)
    return StoreScores(list(pred.ids), model_rows, baseline_rows, joints, notes)


def _dualpm_pair(reconstruction, mesh: trimesh.Trimesh, options: AnimodelOptions, surface_points: int,
                 target: Path) -> dict[str, float]:
    """Chamfer from the points (a mesh: `surface_points` random points on it) to random target surface
    points, plain and after ICP with the flip; unit cube by the target points' box."""
    seed = options.seed + zlib.crc32(target.name.encode())
    truth = sample_surface(mesh.vertices, mesh.faces, surface_points, seed)
    if isinstance(reconstruction, trimesh.Trimesh):
        reconstruction = sample_surface(reconstruction.vertices, reconstruction.faces, surface_points, seed + 1)
    eval_options = EvalOptions(occupancy_threshold=0.5, confidence_threshold=1.0, icp=True,
                               surface_points=surface_points, seed=options.seed,
                               icp_iterations=options.icp_iterations)
    metrics = chamfer_metrics("surface", reconstruction, truth, eval_options)
    return {key.replace("_surface", ""): value for key, value in metrics.items()}


def _dualpm_config(job: StoreJob) -> dict:
    return {"icp": job.options.icp, "surface_points": job.options.surface_points,
            "skeleton": bool(job.predictions.attrs.get("skeleton"))}


# ------------------------------------------------------------------------------------------ animodel


def _cloud(canonical: np.ndarray, posed: np.ndarray, keep: np.ndarray, view: np.ndarray | None, frame: str,
           yaw: float) -> np.ndarray:
    """(N, 3) float64 kept posed points of one prediction ((L, 3, H, W) maps, (L, H, W) keep) in `frame`."""
    points = np.moveaxis(posed, -3, -1)[keep].astype(np.float64)  # (L, 3, H, W) -> (L, H, W, 3)[keep] -> (N, 3)
    return to_frame(frame, points, np.moveaxis(canonical, -3, -1)[keep].astype(np.float64), view, yaw)


def _score_clouds(sample_id: str, clouds: list[np.ndarray], vertices: np.ndarray, faces: np.ndarray,
                  options: AnimodelOptions) -> Rows:
    """`animodel_*` metrics of each cloud against one target mesh (runs in a worker process)."""
    target = trimesh.Trimesh(vertices, faces, process=False)
    try:
        scores = score_all(clouds, target, options)  # the target's volume, samples and trees made once
    except EvalError as err:
        raise EvalError(f"sample {sample_id!r}: {err}") from err
    return [{"points": float(len(cloud)), **{f"animodel_{k}": v for k, v in result.metrics().items()}}
            for cloud, result in zip(clouds, scores, strict=True)]


def _run_jobs(jobs, workers: int) -> Iterator[tuple[str, Rows]]:
    """Yield (sample id, rows) of `_score_clouds(*job)` for every job, in order; `workers` > 1 scores that
    many samples at once in spawned processes (a fresh interpreter each: no fork of a threaded parent),
    with at most 2 x `workers` samples' clouds in memory."""
    if workers <= 1:
        for args in jobs:
            yield args[0], _score_clouds(*args)
        return
    pending: collections.deque = collections.deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for args in jobs:
            pending.append((args[0], pool.submit(_score_clouds, *args)))
            if len(pending) >= 2 * workers:
                sample_id, future = pending.popleft()
                yield sample_id, future.result()
        while pending:
            sample_id, future = pending.popleft()
            yield sample_id, future.result()


def _with_notes(pairs, notes: list[str]):
    # Samples of a prepared dataset whose source mesh is unreachable: recorded, left out of the means.
    for sample_id, target, view, note in pairs:
        if target is None:
            notes.append(note or f"{sample_id}: no ground-truth mesh")
        yield sample_id, target, view


def _animodel_store(job: StoreJob) -> StoreScores:
    """The Animodel protocol over a predictions store.

    Targets come from the prepared dataset (the posed mesh in its world frame, the sample's camera) or
    from `job.targets` (an Animodel-layout folder, matched by id). Each sample's samples are seeded with
    `animodel.seed` + crc32(id), so a sample's numbers depend neither on the others nor on `job.workers`.
    """
    pred, options, baseline, frame, yaw = job.predictions, job.options, job.baseline, job.frame, job.yaw
    index = {sid: i for i, sid in enumerate(pred.ids)}
    notes: list[str] = []

    def work(sample_id: str, target: trimesh.Trimesh, view: np.ndarray | None) -> tuple:
        maps = pred.sample(index[sample_id])
        keep = keep_mask(maps, options.occupancy_threshold, options.confidence_threshold)
        clouds = [_cloud(maps.canonical, maps.posed, keep, view, frame, yaw)]
        if baseline is not None:
            clouds.append(_cloud(*baseline.predict(maps.mask), view, frame, yaw))
        seeded = dataclasses.replace(job.animodel, seed=job.animodel.seed + zlib.crc32(sample_id.encode()))
        return sample_id, clouds, np.asarray(target.vertices), np.asarray(target.faces), seeded

    if job.targets is not None:
        targets = TargetMeshes(job.targets)
        ids, no_target, no_prediction = targets.match(pred.ids)
        if no_target:
            notes.append(f"{len(no_target)} predictions have no target mesh in {targets.folder} and are not "
                         f"scored: {', '.join(no_target[:5])}")
        if no_prediction:
            notes.append(f"{len(no_prediction)} target meshes have no prediction (missing from every mean): "
                         f"{', '.join(no_prediction[:5])}")
        if not ids:
            raise EvalError(f"{targets.folder}: no target mesh matches a prediction id ({', '.join(pred.ids[:3])}...)")
        pairs = ((sid, load_target(targets.paths[sid]), None) for sid in ids)
    else:
        reader = GroundTruthReader(job.data, job.source, 0, options.seed, world_mesh=True)
        if reader.source is None:
            raise ConfigError(f"{reader.source_note}; the animodel protocol scores against the posed meshes")
        ids = list(pred.ids)
        pairs = ((gt.sample_id, None if gt.world_vertices is None else
                  trimesh.Trimesh(gt.world_vertices, gt.faces, process=False), gt.view, gt.note)
                 for gt in reader.read(ids))
        pairs = _with_notes(pairs, notes)
    works = (work(*pair) for pair in pairs if pair[1] is not None)
    scored: dict[str, Rows] = {}
    with tqdm(total=len(ids), desc="eval animodel", unit="sample", dynamic_ncols=True) as bar:
        for sample_id, rows in _run_jobs(works, job.workers):
            scored[sample_id] = rows
            bar.update(1)
    model_rows = [scored[i][0] if i in scored else {} for i in ids]
    baseline_rows = None if baseline is None else [scored[i][1] if i in scored else {} for i in ids]
    return StoreScores(ids, model_rows, baseline_rows, {}, notes)


def _animodel_pair(reconstruction, mesh: trimesh.Trimesh, options: AnimodelOptions, surface_points: int,
                   target: Path) -> dict[str, float]:
    return score(reconstruction, mesh, options, str(target)).metrics()


def _animodel_config(job: StoreJob) -> dict:
    a = job.animodel
    return {"frame": job.frame, "yaw": job.yaw, "align_points": a.align_points, "chamfer_points": a.chamfer_points,
            "min_cubes": a.min_cubes, "workers": job.workers}


DUALPM = Protocol(
    name="dualpm",
    definition="DualPM protocol (Chamfer from the predicted points to the ground-truth points of every rendered "
               "layer and to random surface points of the target, camera space, no rescale; unit cube by the "
               "target points' box; icp_: after rigid ICP with a flip)",
    icp_iterations=50,
    headline="unit_chamfer_layers_sym",
    headline_words="symmetric Chamfer distance from the kept posed points to the ground-truth points of all "
                   "rendered layers, target scaled to a unit cube, no ICP",
    surface_ratio="unit_chamfer_surface_sym",
    mesh_targets=False,
    pair_frames=(("", "target units"), ("unit_", "unit cube"), ("icp_", "after ICP, target units"),
                 ("icp_unit_", "after ICP, unit cube")),
    score_store=_dualpm_store,
    score_pair=_dualpm_pair,
    store_config=_dualpm_config,
)

ANIMODEL = Protocol(
    name="animodel",
    definition="Animodel benchmark protocol (volume rescale, remesh, ICP 8k points x 200 iterations, "
               "180-degree flip about world Y, Chamfer on 60k even points per surface, unit cube by the "
               "target mesh's box)",
    icp_iterations=200,
    headline="animodel_unit_chamfer_sym",
    headline_words="the Animodel protocol's bidirectional Chamfer distance, unit cube",
    surface_ratio=None,
    mesh_targets=True,
    pair_frames=(("", "target units"), ("unit_", "unit cube")),
    score_store=_animodel_store,
    score_pair=_animodel_pair,
    store_config=_animodel_config,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (DUALPM, ANIMODEL)}
