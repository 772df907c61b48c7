"""`dualpm-eval`: measure dualpm-infer predictions against a prepared dataset, Animodel-style.

    dualpm-eval --pred pred/demo --data out/demo --baseline            # writes into pred/demo
    dualpm-eval --pred pred/demo --icp --surface-points 20000 --out reports/demo

Outputs (in --out, default the predictions folder), each written atomically:
    metrics.csv     one row per sample: every metric of the model (and `baseline_...` with --baseline)
    summary.json    means over samples (see `summary_json`); top-level "chamfer_ratio_model_over_baseline"
    summary.md      the markdown table printed at the end
    eval.config.yaml
See `dualpm.eval.evaluate` for the metrics.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from dualpm.cliutils import handles_user_errors, show_and_save_config
from dualpm.errors import ConfigError
from dualpm.eval.baseline import ConstantBaseline, fit_constant_baseline
from dualpm.eval.evaluate import (
    EvalOptions,
    GroundTruthReader,
    evaluate_prediction,
    mean_metrics,
    skeleton_metrics,
)
from dualpm.fileio import atomic_write_json, atomic_write_text
from dualpm.predictions import SAMPLES, Predictions, keep_mask, open_predictions

RATIO_KEY = "chamfer_ratio_model_over_baseline"
RATIO_METRIC = "unit_chamfer_layers_sym"
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
    notes: list[str], info: dict[str, Any],
) -> dict[str, Any]:
    """The summary: the ratio first, then means over samples (NaN and inf written as null, see notes)."""
    return {
        RATIO_KEY: _ratio(model, baseline, RATIO_METRIC),
        "ratio_definition": (
            f"mean {RATIO_METRIC} of the model / that of the constant baseline: symmetric Chamfer distance "
            "from the kept posed points to the ground-truth points of all rendered layers, target scaled "
            "to a unit cube, no ICP; lower is better, null without --baseline"
        ),
        RATIO_SURFACE_KEY: _ratio(model, baseline, "unit_chamfer_surface_sym"),
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
        f"# DualPM evaluation: {summary['samples']} samples of {summary['data']}",
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
        lines += ["", f"{RATIO_KEY} = {_cell(ratio)} (model / baseline, symmetric unit-cube Chamfer to the GT "
                      "layers; lower is better)"]
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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--pred", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Output folder of dualpm-infer (holding predictions.zarr).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              show_default="the dataset recorded in the predictions", help="Prepared dataset with the ground truth.")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=None,
              show_default="the dataset manifest's source",
              help="Source dataset (meshes, poses, cameras) for the surface Chamfer and skeleton errors.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              show_default="--pred", help="Folder for metrics.csv, summary.json, summary.md.")
@click.option("--baseline", is_flag=True,
              help="Also evaluate the constant predictor (per-pixel mean of the training targets) on the same "
                   f"samples; summary.json then holds {RATIO_KEY} = model / baseline mean {RATIO_METRIC} "
                   "(symmetric Chamfer to the GT points of all rendered layers, unit cube, no ICP; lower is better).")
@click.option("--baseline-split", type=str, default="train", help="Split the baseline is averaged over.")
@click.option("--icp", is_flag=True, help="Also measure after rigid ICP alignment (with the 180-degree flip).")
@click.option("--icp-iterations", type=click.IntRange(1, 1000), default=50, help="ICP iterations per start.")
@click.option("--surface-points", type=click.IntRange(min=0), default=10000,
              help="Points sampled on each ground-truth mesh surface (0: skip the surface Chamfer).")
@click.option("--occupancy-threshold", type=click.FloatRange(0, 1), default=None,
              show_default="as used by dualpm-infer", help="Keep points with sigmoid(occupancy) above this.")
@click.option("--confidence-threshold", type=click.FloatRange(1, None), default=None,
              show_default="as used by dualpm-infer", help="Keep points with confidence at least this.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the surface sampling.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the sample count; write nothing.")
@handles_user_errors
def main(pred: Path, data: Path | None, source: Path | None, out: Path | None, baseline: bool,
         baseline_split: str, icp: bool, icp_iterations: int, surface_points: int,
         occupancy_threshold: float | None, confidence_threshold: float | None, seed: int, dry_run: bool) -> None:
    """Per-sample and summary metrics of the dualpm-infer predictions in --pred against the ground truth of a
    prepared dataset: Chamfer distances to the GT layers and the GT mesh surface (scene units and unit cube,
    optional ICP), canonical / posed error at known pixels, occupancy IoU per layer, skeleton errors; with
    --baseline the constant predictor side by side.

    Writes metrics.csv (one row per sample), summary.md (the table printed at the end) and summary.json,
    whose top-level "chamfer_ratio_model_over_baseline" is the model's mean symmetric unit-cube Chamfer
    distance to the GT layers divided by the baseline's (null without --baseline; lower is better)."""
    predictions = open_predictions(pred)
    attrs = predictions.attrs
    if data is None:
        if not attrs.get("data"):
            raise ConfigError(f"{pred}: the predictions were made from images; give --data DATASET with their ground truth")
        data = Path(attrs["data"])
    options = EvalOptions(
        occupancy_threshold=attrs["occupancy_threshold"] if occupancy_threshold is None else occupancy_threshold,
        confidence_threshold=attrs["confidence_threshold"] if confidence_threshold is None else confidence_threshold,
        icp=icp, surface_points=surface_points, seed=seed, icp_iterations=icp_iterations,
    )
    out = pred if out is None else out
    layers = int(predictions.arrays["canonical"].shape[1])
    config = {
        "pred": str(predictions.path), "data": str(data), "source": str(source) if source else None,
        "out": str(out), "samples": len(predictions), "layers": layers, "baseline": baseline,
        "baseline_split": baseline_split if baseline else None, "icp": icp, "icp_iterations": icp_iterations,
        "surface_points": surface_points, "occupancy_threshold": options.occupancy_threshold,
        "confidence_threshold": options.confidence_threshold, "seed": seed,
        "skeleton": bool(attrs.get("skeleton")), "prediction_mode": attrs.get("mode"),
    }
    if dry_run:
        show_and_save_config(config, None, "evaluation config (dry run)")
        click.echo(f"{len(predictions)} samples would be evaluated against {data}")
        return
    out.mkdir(parents=True, exist_ok=True)
    show_and_save_config(config, out / "eval.config.yaml", "evaluation config")
    reader = GroundTruthReader(data, source, surface_points, seed)
    constant = None
    if baseline:
        resolution = tuple(predictions.arrays["mask"].shape[1:])
        constant = fit_constant_baseline(data, layers, resolution, baseline_split)
        click.echo(f"baseline: mean of {constant.samples} {baseline_split!r} samples")
    start = time.perf_counter()
    model_rows, baseline_rows, joints, notes = evaluate_store(
        predictions, reader, options, constant, bool(attrs.get("skeleton"))
    )
    seconds = time.perf_counter() - start
    model = mean_metrics(model_rows)
    base = mean_metrics(baseline_rows) if baseline_rows is not None else None
    empty = sum(row["points"] == 0 for row in model_rows)
    if empty:
        notes.append(f"{empty} samples have no kept point: their Chamfer distances are inf, and so are the means")
    per_joint = {
        name: {"rotation_deg": float(np.mean([e[0] for e in errors])),
               "position_error": float(np.mean([e[1] for e in errors])), "samples": len(errors)}
        for name, errors in joints.items()
    }
    info = {"samples": len(predictions), "data": str(data), "split": attrs.get("split"),
            "predictions": str(predictions.path), "prediction_mode": attrs.get("mode"),
            "checkpoint": attrs.get("checkpoint"), "baseline_samples": constant.samples if constant else None,
            "seconds": seconds, "samples_per_s": len(predictions) / seconds if seconds > 0 else None,
            "config": config}
    summary = summary_json(model, base, per_joint, notes, info)
    table = markdown_table(summary, layers)
    atomic_write_text(out / "metrics.csv", metrics_csv(predictions.ids, model_rows, baseline_rows))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table)
    click.echo(table)
    click.echo(f"eval: {len(predictions)} samples in {seconds:.1f} s -> {out / 'summary.json'}")


if __name__ == "__main__":
    main()
