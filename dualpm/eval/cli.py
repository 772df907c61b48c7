"""`dualpm-eval`: measure dualpm-infer predictions against ground truth, under a named protocol.

    dualpm-eval --pred pred/demo --data out/demo --baseline            # protocol dualpm, writes into pred/demo
    dualpm-eval --pred pred/demo --icp --surface-points 20000 --out reports/demo
    dualpm-eval --pred pred/demo --protocol animodel --out reports/animodel        # the benchmark's numbers
    dualpm-eval --pred pred/horse --protocol animodel --targets animodel/horse     # Animodel's own data
    dualpm-eval pair recon.obj target.obj [--protocol animodel|dualpm] [--json]    # any method, one pair

Protocols (every summary and table names the one that produced it):
    dualpm    (default) our learning check: Chamfer from the kept posed points to the GT points of every
              rendered layer and to the GT mesh surface, camera space, no rescale, optional ICP; unit cube
              by the GT points' box. Not comparable with published numbers.
    animodel  the Animodel benchmark's protocol (`dualpm.eval.animodel`): predictions taken to the target's
              world frame (`--frame`), meshed, volume-rescaled, ICP + 180-degree flip, Chamfer on 60,000
              even points per surface, unit cube by the target mesh's box. Comparable with Farm3D,
              MagicPony, 3D-Fauna and DualPM tables.

Outputs (in --out, default the predictions folder), each written atomically:
    metrics.csv     one row per sample: every metric of the model (and `baseline_...` with --baseline)
    summary.json    "protocol", means over samples (see `summary_json`); "chamfer_ratio_model_over_baseline"
    summary.md      the markdown table printed at the end
    eval.config.yaml
See `dualpm.eval.evaluate` (dualpm) and `dualpm.eval.animodel` (animodel) for the metrics.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import multiprocessing
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import click
import numpy as np
import trimesh
from tqdm import tqdm

from dualpm.cliutils import handles_user_errors, show_and_save_config
from dualpm.errors import ConfigError
from dualpm.eval.animodel import AnimodelOptions, score_all
from dualpm.eval.baseline import ConstantBaseline, fit_constant_baseline
from dualpm.eval.evaluate import (
    EvalOptions,
    GroundTruthReader,
    evaluate_prediction,
    mean_metrics,
    skeleton_metrics,
)
from dualpm.eval.metrics import EvalError
from dualpm.eval.pair import ICP_ITERATIONS, PROTOCOL_NAMES, PROTOCOLS, animodel_sampling_options, pair
from dualpm.eval.targets import FRAMES, TargetMeshes, load_target, to_frame
from dualpm.fileio import atomic_write_json, atomic_write_text
from dualpm.predictions import SAMPLES, Predictions, keep_mask, open_predictions

RATIO_KEY = "chamfer_ratio_model_over_baseline"
RATIO_METRIC = "unit_chamfer_layers_sym"
RATIO_METRICS = {"dualpm": RATIO_METRIC, "animodel": "animodel_unit_chamfer_sym"}
RATIO_DEFINITIONS = {
    "dualpm": (f"mean {RATIO_METRIC} of the model / that of the constant baseline: symmetric Chamfer distance "
               "from the kept posed points to the ground-truth points of all rendered layers, target scaled "
               "to a unit cube, no ICP; lower is better, null without --baseline"),
    "animodel": ("mean animodel_unit_chamfer_sym of the model / that of the constant baseline: the Animodel "
                 "protocol's bidirectional Chamfer distance, unit cube; lower is better, null without --baseline"),
}
RATIO_SURFACE_KEY = "chamfer_ratio_model_over_baseline_surface"
# Rows of the markdown table: (metric key, label). Absent keys (no surface, no ICP, ...) are left out.
TABLE = [
    ("unit_chamfer_layers_sym", "Chamfer sym., GT layers, unit cube"),
    ("unit_chamfer_layers_pred_to_gt", "Chamfer pred->GT, GT layers, unit cube"),
    ("unit_chamfer_layers_gt_to_pred", "Chamfer GT->pred, GT layers, unit cube"),
    ("chamfer_layers_sym", "Chamfer sym., GT layers, scene units"),
    ("unit_chamfer_surface_sym", "Chamfer sym., GT surface, unit cube"),
    ("unit_chamfer_surface_pred_to_gt", "Chamfer pred->GT, GT surface, unit cube"),
    ("unit_chamfer_surface_gt_to_pred", "Chamfer GT->pred, GT surface, unit cube"),
    ("chamfer_surface_sym", "Chamfer sym., GT surface, scene units"),
    ("icp_unit_chamfer_layers_sym", "ICP + Chamfer sym., GT layers, unit cube"),
    ("icp_unit_chamfer_surface_sym", "ICP + Chamfer sym., GT surface, unit cube"),
    ("animodel_unit_chamfer_sym", "Animodel Chamfer bidir., unit cube"),
    ("animodel_unit_chamfer_pred_to_gt", "Animodel Chamfer reconstruction->target, unit cube"),
    ("animodel_unit_chamfer_gt_to_pred", "Animodel Chamfer target->reconstruction, unit cube"),
    ("animodel_chamfer_sym", "Animodel Chamfer bidir., target units"),
    ("animodel_volume_scale", "Animodel volume rescale factor"),
    ("animodel_flipped", "fraction kept flipped (180 degrees about Y)"),
    ("animodel_enclosed", "fraction of clouds meshed closed"),
    ("canonical_error", "canonical error (known pixels), scene units"),
    ("posed_error", "posed error (known pixels), scene units"),
    ("skeleton_rotation_deg", "skeleton rotation error, degrees"),
    ("skeleton_position_error", "skeleton joint position error, scene units"),
    ("points", "kept points per sample"),
]


def _finite(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def _ratio(model: dict[str, float], baseline: dict[str, float] | None, key: str) -> float | None:
    if baseline is None or key not in model or key not in baseline:
        return None
    m, b = model[key], baseline[key]
    return _finite(m / b) if b > 0 and math.isfinite(b) else None


def summary_json(
    model: dict[str, float], baseline: dict[str, float] | None, per_joint: dict[str, dict[str, float]],
    notes: list[str], info: dict[str, Any], protocol: str = "dualpm",
) -> dict[str, Any]:
    """The summary: the protocol and the ratio first, then means over samples (NaN and inf written as null,
    see notes)."""
    return {
        "protocol": protocol,
        "protocol_definition": PROTOCOL_NAMES[protocol],
        RATIO_KEY: _ratio(model, baseline, RATIO_METRICS[protocol]),
        "ratio_definition": RATIO_DEFINITIONS[protocol],
        RATIO_SURFACE_KEY: _ratio(model, baseline, "unit_chamfer_surface_sym") if protocol == "dualpm" else None,
        **info,
        "model": {k: _finite(v) for k, v in model.items()},
        "baseline": None if baseline is None else {k: _finite(v) for k, v in baseline.items()},
        "skeleton_per_joint": per_joint,
        "notes": notes,
    }


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.4g}"


def markdown_table(summary: dict[str, Any], layers: int) -> str:
    model, baseline = summary["model"], summary["baseline"]
    columns = ["metric", "model"] + (["baseline"] if baseline is not None else [])
    lines = [
        f"# DualPM evaluation, protocol {summary['protocol']}: {summary['samples']} samples of {summary['data']}",
        "",
        f"Protocol: {summary['protocol_definition']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    rows = TABLE + [(f"iou_l{k}", f"occupancy IoU, layer {k}") for k in range(1, layers + 1)]
    for key, label in rows:
        if key in model:
            cells = [label, _cell(model[key])] + ([_cell(baseline.get(key))] if baseline is not None else [])
            lines.append("| " + " | ".join(cells) + " |")
    ratio = summary[RATIO_KEY]
    if baseline is not None:
        what = ("symmetric unit-cube Chamfer to the GT layers" if summary["protocol"] == "dualpm"
                else "Animodel bidirectional unit-cube Chamfer")
        lines += ["", f"{RATIO_KEY} = {_cell(ratio)} (model / baseline, {what}; lower is better)"]
    if summary["notes"]:
        lines += ["", "Notes:"] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"


def metrics_csv(ids: list[str], model_rows: list[dict[str, float]], baseline_rows: list[dict[str, float]] | None) -> str:
    keys = list(dict.fromkeys(k for row in model_rows for k in row))
    header = ["id"] + keys + ([f"baseline_{k}" for k in keys] if baseline_rows is not None else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for i, sample_id in enumerate(ids):
        row = [sample_id] + [repr(model_rows[i].get(k, math.nan)) for k in keys]
        if baseline_rows is not None:
            row += [repr(baseline_rows[i].get(k, math.nan)) for k in keys]
        writer.writerow(row)
    return buffer.getvalue()


def evaluate_store(
    pred: Predictions, reader: GroundTruthReader, options: EvalOptions, baseline: ConstantBaseline | None,
    skeletons: bool,
) -> tuple[list[dict[str, float]], list[dict[str, float]] | None, dict[str, list[tuple[float, float]]], list[str]]:
    """Evaluate every sample of `pred`: (model rows, baseline rows or None, per-joint errors, notes), rows in
    the order of `pred.ids`."""
    index = {sid: i for i, sid in enumerate(pred.ids)}
    model_rows: list[dict[str, float]] = [{} for _ in pred.ids]
    baseline_rows = None if baseline is None else [{} for _ in pred.ids]
    per_joint: dict[str, list[tuple[float, float]]] = {}
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
                row, joints = skeleton_metrics(path, gt)
                model_rows[i].update(row)
                for name, errors in joints.items():
                    per_joint.setdefault(name, []).append(errors)
        if baseline is not None:
            canonical, posed, base_keep = baseline.predict(maps.mask)
            baseline_rows[i] = evaluate_prediction(canonical, posed, base_keep, base_keep, gt, options)
    return model_rows, baseline_rows, per_joint, notes


def _cloud(canonical: np.ndarray, posed: np.ndarray, keep: np.ndarray, view: np.ndarray | None, frame: str,
           yaw: float) -> np.ndarray:
    """(N, 3) float64 kept posed points of one prediction ((L, 3, H, W) maps, (L, H, W) keep) in `frame`."""
    points = np.moveaxis(posed, -3, -1)[keep].astype(np.float64)  # (L, H, W, 3)[keep] -> (N, 3)
    return to_frame(frame, points, np.moveaxis(canonical, -3, -1)[keep].astype(np.float64), view, yaw)


def _score_clouds(sample_id: str, clouds: list[np.ndarray], vertices: np.ndarray, faces: np.ndarray,
                  options: AnimodelOptions) -> list[dict[str, float]]:
    """`animodel_*` metrics of each cloud against one target mesh (runs in a worker process)."""
    target = trimesh.Trimesh(vertices, faces, process=False)
    try:
        scores = score_all(clouds, target, options)  # the target's volume, samples and trees made once
    except EvalError as err:
        raise EvalError(f"sample {sample_id!r}: {err}") from err
    return [{"points": float(len(cloud)), **{f"animodel_{k}": v for k, v in result.metrics().items()}}
            for cloud, result in zip(clouds, scores, strict=True)]


def animodel_store(
    pred: Predictions, options: EvalOptions, animodel: AnimodelOptions, frame: str, yaw: float,
    reader: GroundTruthReader | None, targets: TargetMeshes | None, baseline: ConstantBaseline | None,
    workers: int = 1,
) -> tuple[list[str], list[dict[str, float]], list[dict[str, float]] | None, list[str]]:
    """The Animodel protocol over a predictions store: (ids, model rows, baseline rows or None, notes).

    Targets come from `reader` (a prepared dataset: the posed mesh in its world frame, the sample's camera)
    or from `targets` (an Animodel-layout folder, matched by id). Each sample's samples are seeded with
    `animodel.seed` + crc32(id), so a sample's numbers do not depend on the others, nor on `workers`
    (processes scoring samples at once; 1: in this process).
    """
    index = {sid: i for i, sid in enumerate(pred.ids)}
    notes: list[str] = []

    def job(sample_id: str, target: trimesh.Trimesh, view: np.ndarray | None) -> tuple:
        maps = pred.sample(index[sample_id])
        keep = keep_mask(maps, options.occupancy_threshold, options.confidence_threshold)
        clouds = [_cloud(maps.canonical, maps.posed, keep, view, frame, yaw)]
        if baseline is not None:
            clouds.append(_cloud(*baseline.predict(maps.mask), view, frame, yaw))
        seeded = dataclasses.replace(animodel, seed=animodel.seed + zlib.crc32(sample_id.encode()))
        return sample_id, clouds, np.asarray(target.vertices), np.asarray(target.faces), seeded

    if targets is not None:
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
        ids = list(pred.ids)
        pairs = ((gt.sample_id, None if gt.world_vertices is None else
                  trimesh.Trimesh(gt.world_vertices, gt.faces, process=False), gt.view, gt.note)
                 for gt in reader.read(ids))
        pairs = _with_notes(pairs, notes)
    jobs = (job(*pair) for pair in pairs if pair[1] is not None)
    scored: dict[str, list[dict[str, float]]] = {}
    with tqdm(total=len(ids), desc="eval animodel", unit="sample", dynamic_ncols=True) as bar:
        for sample_id, rows in _run_jobs(jobs, workers):
            scored[sample_id] = rows
            bar.update(1)
    model_rows = [scored[i][0] if i in scored else {} for i in ids]
    baseline_rows = None if baseline is None else [scored[i][1] if i in scored else {} for i in ids]
    return ids, model_rows, baseline_rows, notes


def _run_jobs(jobs, workers: int):
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


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--pred", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Output folder of dualpm-infer (holding predictions.zarr). Required without a subcommand.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="dualpm",
              help="dualpm: our learning check (GT layers and surface, camera space). animodel: the Animodel "
                   "benchmark's protocol, comparable with published numbers (see the module docstring).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              show_default="the dataset recorded in the predictions", help="Prepared dataset with the ground truth.")
@click.option("--targets", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="animodel: an Animodel-layout folder (<category>/ with meshes/<id>.obj, or meshes/ itself): "
                   "target meshes matched to the predictions by id, instead of --data.")
@click.option("--frame", type=click.Choice(("auto",) + FRAMES), default="auto",
              show_default="world with --data, canonical with --targets",
              help="animodel: the frame the predicted posed points are scored in (dualpm.eval.targets).")
@click.option("--yaw", type=click.FloatRange(-360, 360), default=0.0,
              help="animodel: turn the predictions by this many degrees about +Y (frame conventions).")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=None,
              show_default="the dataset manifest's source",
              help="Source dataset (meshes, poses, cameras) for the surface Chamfer, skeleton errors and the "
                   "animodel protocol's target meshes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              show_default="--pred", help="Folder for metrics.csv, summary.json, summary.md.")
@click.option("--baseline", is_flag=True,
              help="Also evaluate the constant predictor (per-pixel mean of the training targets) on the same "
                   f"samples; summary.json then holds {RATIO_KEY} = model / baseline mean of the protocol's "
                   f"headline metric (dualpm: {RATIO_METRIC}, symmetric Chamfer to the GT points of all rendered "
                   "layers, unit cube, no ICP; animodel: animodel_unit_chamfer_sym; lower is better).")
@click.option("--baseline-split", type=str, default="train", help="Split the baseline is averaged over.")
@click.option("--icp", is_flag=True, help="dualpm: also measure after rigid ICP alignment (with the 180-degree flip).")
@click.option("--icp-iterations", type=click.IntRange(1, 1000), default=None,
              show_default="50 (dualpm), 200 (animodel)", help="ICP iterations per start.")
@click.option("--surface-points", type=click.IntRange(min=0), default=10000,
              help="dualpm: points sampled on each ground-truth mesh surface (0: skip the surface Chamfer).")
@animodel_sampling_options
@click.option("--workers", type=click.IntRange(1, 1024), default=None, show_default="all CPUs, at most 16",
              help="animodel: samples scored at once, each in its own process (the numbers do not depend on it).")
@click.option("--occupancy-threshold", type=click.FloatRange(0, 1), default=None,
              show_default="as used by dualpm-infer", help="Keep points with sigmoid(occupancy) above this.")
@click.option("--confidence-threshold", type=click.FloatRange(1, None), default=None,
              show_default="as used by dualpm-infer", help="Keep points with confidence at least this.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the surface sampling.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the sample count; write nothing.")
@click.pass_context
@handles_user_errors
def main(ctx: click.Context, pred: Path | None, protocol: str, data: Path | None, targets: Path | None,
         frame: str, yaw: float, source: Path | None, out: Path | None, baseline: bool, baseline_split: str,
         icp: bool, icp_iterations: int | None, surface_points: int, align_points: int, chamfer_points: int,
         min_cubes: int, workers: int | None,
         occupancy_threshold: float | None, confidence_threshold: float | None, seed: int, dry_run: bool) -> None:
    """Per-sample and summary metrics of the dualpm-infer predictions in --pred, under --protocol.

    dualpm (default): Chamfer distances to the GT layers and the GT mesh surface of a prepared dataset
    (scene units and unit cube, optional ICP), canonical / posed error at known pixels, occupancy IoU per
    layer, skeleton errors. animodel: the Animodel benchmark's per-sample protocol against the posed GT
    mesh of a prepared dataset (--data) or the meshes of an Animodel-layout folder (--targets). With
    --baseline the constant predictor is scored side by side.

    Writes metrics.csv (one row per sample), summary.md (the table printed at the end) and summary.json
    ("protocol" names the protocol; "chamfer_ratio_model_over_baseline" is the model's mean of the protocol's
    unit-cube Chamfer distance divided by the baseline's, null without --baseline; lower is better).
    `dualpm-eval pair PRED TARGET` scores one reconstruction file against one target mesh."""
    if ctx.invoked_subcommand is not None:
        return
    if pred is None:
        raise ConfigError("give --pred PRED (a dualpm-infer output folder), or a subcommand (pair)")
    if targets is not None and protocol != "animodel":
        raise ConfigError("--targets gives target meshes for --protocol animodel only")
    if targets is not None and frame == "world":
        raise ConfigError("--frame world needs each sample's camera (a prepared dataset, --data); "
                          "Animodel-layout targets have none: use --frame canonical (the default) or camera")
    frame = ("canonical" if targets is not None else "world") if frame == "auto" else frame
    predictions = open_predictions(pred)
    attrs = predictions.attrs
    if data is None and (targets is None or baseline):
        if not attrs.get("data"):
            raise ConfigError(f"{pred}: the predictions were made from images; give --data DATASET with their "
                              "ground truth" + (" (the baseline is fitted on it)" if targets is not None else
                                                 ", or --protocol animodel --targets DIR"))
        data = Path(attrs["data"])
    iterations = icp_iterations or ICP_ITERATIONS[protocol]
    options = EvalOptions(
        occupancy_threshold=attrs["occupancy_threshold"] if occupancy_threshold is None else occupancy_threshold,
        confidence_threshold=attrs["confidence_threshold"] if confidence_threshold is None else confidence_threshold,
        icp=icp, surface_points=surface_points, seed=seed, icp_iterations=iterations,
    )
    animodel = AnimodelOptions(align_points=align_points, icp_iterations=iterations,
                               chamfer_points=chamfer_points, min_cubes=min_cubes, seed=seed)
    out = pred if out is None else out
    layers = int(predictions.arrays["canonical"].shape[1])
    config = {
        "pred": str(predictions.path), "protocol": protocol, "data": str(data) if data else None,
        "targets": str(targets) if targets else None, "source": str(source) if source else None,
        "out": str(out), "samples": len(predictions), "layers": layers, "baseline": baseline,
        "baseline_split": baseline_split if baseline else None, "icp_iterations": iterations,
        "occupancy_threshold": options.occupancy_threshold,
        "confidence_threshold": options.confidence_threshold, "seed": seed,
        "prediction_mode": attrs.get("mode"),
    }
    if protocol == "dualpm":
        config.update({"icp": icp, "surface_points": surface_points, "skeleton": bool(attrs.get("skeleton"))})
    else:
        workers = workers or min(16, os.cpu_count() or 1)
        config.update({"frame": frame, "yaw": yaw, "align_points": align_points, "chamfer_points": chamfer_points,
                       "min_cubes": min_cubes, "workers": workers})
    if dry_run:
        show_and_save_config(config, None, "evaluation config (dry run)")
        click.echo(f"{len(predictions)} samples would be evaluated ({protocol} protocol) against {targets or data}")
        return
    out.mkdir(parents=True, exist_ok=True)
    show_and_save_config(config, out / "eval.config.yaml", "evaluation config")
    constant = None
    if baseline:
        resolution = tuple(predictions.arrays["mask"].shape[1:])
        constant = fit_constant_baseline(data, layers, resolution, baseline_split)
        click.echo(f"baseline: mean of {constant.samples} {baseline_split!r} samples")
    start = time.perf_counter()
    joints: dict[str, list[tuple[float, float]]] = {}
    ids = predictions.ids
    if protocol == "dualpm":
        reader = GroundTruthReader(data, source, surface_points, seed)
        model_rows, baseline_rows, joints, notes = evaluate_store(
            predictions, reader, options, constant, bool(attrs.get("skeleton")))
    else:
        reader = None if targets is not None else GroundTruthReader(data, source, 0, seed, world_mesh=True)
        if reader is not None and reader.source is None:
            raise ConfigError(f"{reader.source_note}; the animodel protocol scores against the posed meshes")
        ids, model_rows, baseline_rows, notes = animodel_store(
            predictions, options, animodel, frame, yaw, reader, None if targets is None else TargetMeshes(targets),
            constant, workers)
    seconds = time.perf_counter() - start
    model = mean_metrics(model_rows)
    base = mean_metrics(baseline_rows) if baseline_rows is not None else None
    empty = sum(row.get("points") == 0 for row in model_rows)
    if empty:
        notes.append(f"{empty} samples have no kept point: their Chamfer distances are inf, and so are the means")
    per_joint = {
        name: {"rotation_deg": float(np.mean([e[0] for e in errors])),
               "position_error": float(np.mean([e[1] for e in errors])), "samples": len(errors)}
        for name, errors in joints.items()
    }
    info = {"samples": len(ids), "data": str(targets or data), "split": attrs.get("split"),
            "predictions": str(predictions.path), "prediction_mode": attrs.get("mode"),
            "checkpoint": attrs.get("checkpoint"), "baseline_samples": constant.samples if constant else None,
            "seconds": seconds, "samples_per_s": len(ids) / seconds if seconds > 0 else None,
            "config": config}
    summary = summary_json(model, base, per_joint, notes, info, protocol)
    table = markdown_table(summary, layers)
    atomic_write_text(out / "metrics.csv", metrics_csv(ids, model_rows, baseline_rows))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table)
    click.echo(table)
    click.echo(f"eval ({protocol} protocol): {len(ids)} samples in {seconds:.1f} s -> {out / 'summary.json'}")


main.add_command(pair)


if __name__ == "__main__":
    main()
