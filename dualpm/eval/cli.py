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
    summary.json    "protocol", means over samples (`dualpm.eval.summary`); "chamfer_ratio_model_over_baseline"
    summary.md      the markdown table printed at the end
    eval.config.yaml
A protocol is a `dualpm.eval.protocols.Protocol`; `dualpm.eval.evaluate` (dualpm) and `dualpm.eval.animodel`
(animodel) hold their metrics.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import click
import numpy as np

from dualpm.cliutils import StoreLocation, cache_option, handles_user_errors, show_and_save_config
from dualpm.errors import ConfigError
from dualpm.eval.animodel import AnimodelOptions
from dualpm.eval.baseline import fit_constant_baseline
from dualpm.eval.evaluate import EvalOptions, mean_metrics
from dualpm.eval.pair import animodel_sampling_options, pair
from dualpm.eval.protocols import PROTOCOLS, StoreJob
from dualpm.eval.summary import RATIO_KEY, markdown_table, metrics_csv, summary_json
from dualpm.eval.targets import FRAMES
from dualpm.fileio import atomic_write_json, atomic_write_text
from dualpm.predictions import open_predictions
from dualpm.store.access import open_store
from dualpm.store.remote import is_url

HEADLINES = ", ".join(f"{p.name}: {p.headline}" for p in PROTOCOLS.values())


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--pred", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Output folder of dualpm-infer (holding predictions.zarr). Required without a subcommand.")
@click.option("--protocol", "protocol_name", type=click.Choice(list(PROTOCOLS)), default="dualpm",
              help="dualpm: our learning check (GT layers and surface, camera space). animodel: the Animodel "
                   "benchmark's protocol, comparable with published numbers (see the module docstring).")
@click.option("--data", type=StoreLocation(), default=None, show_default="the dataset recorded in the predictions",
              help="Prepared dataset with the ground truth (a folder or an s3:// gs:// https:// URL).")
@cache_option
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
                   f"headline metric ({HEADLINES}; lower is better).")
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
def main(ctx: click.Context, pred: Path | None, protocol_name: str, data: Path | str | None,
         cache: Path | None, cache_gib: float, targets: Path | None,
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
    protocol = PROTOCOLS[protocol_name]
    if pred is None:
        raise ConfigError("give --pred PRED (a dualpm-infer output folder), or a subcommand (pair)")
    if targets is not None and not protocol.mesh_targets:
        with_targets = " or ".join(p.name for p in PROTOCOLS.values() if p.mesh_targets)
        raise ConfigError(f"--targets gives target meshes for --protocol {with_targets} only")
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
        data = attrs["data"] if is_url(attrs["data"]) else Path(attrs["data"])
    if data is not None:  # read by the ground truth and the baseline alike (one cache)
        data = open_store(data, cache, int(cache_gib * 2**30))
    iterations = icp_iterations or protocol.icp_iterations
    options = EvalOptions(
        occupancy_threshold=attrs["occupancy_threshold"] if occupancy_threshold is None else occupancy_threshold,
        confidence_threshold=attrs["confidence_threshold"] if confidence_threshold is None else confidence_threshold,
        icp=icp, surface_points=surface_points, seed=seed, icp_iterations=iterations,
    )
    animodel = AnimodelOptions(align_points=align_points, icp_iterations=iterations,
                               chamfer_points=chamfer_points, min_cubes=min_cubes, seed=seed)
    out = pred if out is None else out
    layers = int(predictions.arrays["canonical"].shape[1])
    job = StoreJob(predictions=predictions, options=options, animodel=animodel, data=data, source=source,
                   targets=targets, frame=frame, yaw=yaw, workers=workers or min(16, os.cpu_count() or 1),
                   baseline=None)
    config = {
        "pred": str(predictions.path), "protocol": protocol.name, "data": str(data) if data else None,
        "targets": str(targets) if targets else None, "source": str(source) if source else None,
        "out": str(out), "samples": len(predictions), "layers": layers, "baseline": baseline,
        "baseline_split": baseline_split if baseline else None, "icp_iterations": iterations,
        "occupancy_threshold": options.occupancy_threshold,
        "confidence_threshold": options.confidence_threshold, "seed": seed,
        "prediction_mode": attrs.get("mode"), **protocol.store_config(job),
    }
    if dry_run:
        show_and_save_config(config, None, "evaluation config (dry run)")
        click.echo(f"{len(predictions)} samples would be evaluated ({protocol.name} protocol) against "
                   f"{targets or data}")
        return
    out.mkdir(parents=True, exist_ok=True)
    show_and_save_config(config, out / "eval.config.yaml", "evaluation config")
    constant = None
    if baseline:
        resolution = tuple(predictions.arrays["mask"].shape[1:])
        constant = fit_constant_baseline(data, layers, resolution, baseline_split)
        click.echo(f"baseline: mean of {constant.samples} {baseline_split!r} samples")
    start = time.perf_counter()
    scores = protocol.score_store(dataclasses.replace(job, baseline=constant))
    seconds = time.perf_counter() - start
    model = mean_metrics(scores.model)
    base = mean_metrics(scores.baseline) if scores.baseline is not None else None
    notes = list(scores.notes)
    empty = sum(row.get("points") == 0 for row in scores.model)
    if empty:
        notes.append(f"{empty} samples have no kept point: their Chamfer distances are inf, and so are the means")
    per_joint = {
        name: {"rotation_deg": float(np.mean([e[0] for e in errors])),
               "position_error": float(np.mean([e[1] for e in errors])), "samples": len(errors)}
        for name, errors in scores.joints.items()
    }
    ids = scores.ids
    info = {"samples": len(ids), "data": str(targets or data), "split": attrs.get("split"),
            "predictions": str(predictions.path), "prediction_mode": attrs.get("mode"),
            "checkpoint": attrs.get("checkpoint"), "baseline_samples": constant.samples if constant else None,
            "seconds": seconds, "samples_per_s": len(ids) / seconds if seconds > 0 else None,
            "config": config}
    summary = summary_json(protocol, model, base, per_joint, notes, info)
    table = markdown_table(protocol, summary, layers)
    atomic_write_text(out / "metrics.csv", metrics_csv(ids, scores.model, scores.baseline))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table)
    click.echo(table)
    click.echo(f"eval ({protocol.name} protocol): {len(ids)} samples in {seconds:.1f} s -> {out / 'summary.json'}")


main.add_command(pair)


if __name__ == "__main__":
    main()
