"""The demo's report folder: report.md, training_curve.png, predictions.png, animation.png (see
pipeline/demo.py).

Everything here reads what the stages wrote (manifest.json, the run's metrics.jsonl, the predictions
store, dualpm-eval's summary) and never recomputes a metric: the report shows the pipeline's numbers.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dualpm.cliutils import describe_machine  # noqa: E402
from dualpm.errors import DatasetError  # noqa: E402
from dualpm.eval.summary import RATIO_KEY  # noqa: E402
from dualpm.fileio import atomic_output, atomic_write_text  # noqa: E402
from dualpm.predictions import keep_mask, open_predictions  # noqa: E402
from dualpm.store import load_manifest  # noqa: E402
from dualpm.viz import canonical_to_rgb, image_grid  # noqa: E402
from dualpm.pointmaps import CANONICAL, hits
from pipeline.demo_config import LEARNING_BAR, DemoConfig, Paths  # noqa: E402
from pipeline.store_commands import find_sample  # noqa: E402

SHEET_SAMPLES = 6


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl lines (a torn last line from a killed writer is skipped)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):  # only the last line can be torn; anything else is a damaged log
                raise DatasetError(f"{path}: line {number} is not JSON ({err})") from err
    return rows


def training_curve(rows: list[dict[str, Any]], png: Path) -> None:
    """Plot train and validation losses against the step, one panel per loss term."""
    terms = ["loss/total", "loss/canonical", "loss/posed", "loss/occupancy"]
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), constrained_layout=True)
    for ax, term in zip(axes, terms, strict=True):
        for split, style in (("train", "-"), ("val", "o-")):
            points = [(r["step"], r[term]) for r in rows if r.get("split") == split and term in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, label=split, markersize=4)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def dataset_summary(data: Path) -> dict[str, Any]:
    """Sample counts per split, stored bytes and failures per column of the prepared store."""
    manifest = load_manifest(data)
    splits: dict[str, int] = {}
    for plan in manifest.plan:
        splits[plan.split] = splits.get(plan.split, 0) + len(plan.ids)
    columns = {
        name: {
            "bytes": sum(r.bytes for r in info.shards.values()),
            "samples": sum(len(r.ids) for r in info.shards.values()),
            "failures": sum(len(r.failures) for r in info.shards.values()),
        }
        for name, info in manifest.columns.items()
    }
    return {"splits": splits, "shards": len(manifest.plan), "columns": columns}


def prediction_sheet(paths: Paths, png: Path, count: int = SHEET_SAMPLES) -> int:
    """One row per held-out sample: input image, then per layer the ground-truth canonical colours and
    the predicted ones (kept points only, by the thresholds inference used). Returns the rows drawn.

    One colour box per sample (the ground truth's canonical bounds), so equal colours mean equal points.
    """
    predictions = open_predictions(paths.pred)
    occupancy, confidence = predictions.attrs["occupancy_threshold"], predictions.attrs["confidence_threshold"]
    tiles: list[np.ndarray] = []
    labels: list[str] = []
    rows = min(count, len(predictions))
    for index in range(rows):
        sample_id = predictions.ids[index]
        maps = predictions.sample(index)
        keep = keep_mask(maps, occupancy, confidence)  # (L, H, W)
        render = find_sample(paths.data, "render", sample_id)
        gt = render["dpm"]  # (H, W, L_stored, 7)
        layers = maps.canonical.shape[0]
        gt_canon, gt_alpha = gt[:, :, :layers, CANONICAL], hits(gt[:, :, :layers])  # (H, W, L, 3), (H, W, L)
        bbox = np.stack([gt_canon[gt_alpha].min(0), gt_canon[gt_alpha].max(0)])
        image = render["rgb"] if "rgb" in render else render_mask(render)
        tiles.append(image[..., :3] if image.ndim == 3 else image)
        labels.append(sample_id)
        for layer in range(layers):
            tiles.append(canonical_to_rgb(gt_canon[:, :, layer], bbox, gt_alpha[:, :, layer]))
            labels.append(f"GT layer {layer + 1}")
        pred_canon = np.moveaxis(maps.canonical.astype(np.float32), 1, -1)  # (L, H, W, 3)
        for layer in range(layers):
            tiles.append(canonical_to_rgb(pred_canon[layer], bbox, keep[layer]))
            labels.append(f"pred layer {layer + 1}")
    if rows:
        sheet = image_grid(tiles, labels, columns=1 + 2 * layers, cell=96)
        with atomic_output(png) as tmp:
            sheet.save(tmp, format="PNG")
    return rows


def render_mask(render: Mapping[str, Any]) -> np.ndarray:
    return (render["mask"] * 255).astype(np.uint8)


def animation_section(paths: Paths, state: dict[str, Any], png: Path) -> list[str]:
    """The report's lines on the animated held-out sequence (dualpm-animate's fit.json and preview.png,
    copied into the report as `png`)."""
    skipped = state["stages"]["animate"].get("skipped")
    if skipped:
        return ["## Animation (dualpm-animate, held-out sequence)", "", f"**Not animated**: {skipped}.", ""]
    fit_path = paths.animation / "fit.json"
    try:
        fit = json.loads(fit_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{fit_path}: unreadable ({err}); rerun the demo to redo its animate stage") from err
    statuses = [joint["status"] for frame in fit["frames"] for joint in frame["joints"]]
    with atomic_output(png) as tmp:
        tmp.write_bytes((paths.animation / "preview.png").read_bytes())
    lines = [
        "## Animation (dualpm-animate, held-out sequence)",
        "",
        f"The first animal, in {len(fit['frames'])} frames of poses and camera path it was not trained on, "
        f"predicted by the model and fitted with the rig's skeleton (`{fit['method']}`): "
        f"{statuses.count('fitted') / max(len(statuses), 1):.0%} of the joint-frames had points of their own "
        "(the others are interpolated in time or stay at rest).",
        "",
        f"- [{paths.animation / 'animation.glb'}]({paths.animation / 'animation.glb'}): the rig as synth wrote "
        "it, with the animation and a camera that sees it as the frames do: open it in Blender "
        "(File > Import > glTF 2.0) or any three.js viewer.",
        f"- `{paths.animation / 'animation.bvh'}` (skeleton only), `{paths.animation / 'fit.json'}` (per frame "
        "and joint: points, residual, status).",
    ]
    if "jitter" in fit:
        jitter = fit["jitter"]
        lines.append(f"- smoothing ({jitter['method']}): jitter (mean joint acceleration) {jitter['before']:.3g} "
                     f"-> {jitter['after']:.3g}.")
    lines += ["", f"![frames above the fitted rig re-rendered through their cameras]({png.name})", ""]
    return lines


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def write_report(
    paths: Paths, config: DemoConfig, state: dict[str, Any], commands: dict[str, list[str]], seconds: float
) -> tuple[bool, float]:
    """Write OUT/report/{report.md, training_curve.png, predictions.png}; returns (learning check passed, ratio)."""
    summary_path = paths.eval / "summary.json"
    summary = json.loads(summary_path.read_text())
    if RATIO_KEY not in summary:
        raise DatasetError(f"{summary_path}: no {RATIO_KEY!r} (was dualpm-eval run with --baseline?)")
    # null when some sample kept no predicted point (an infinite Chamfer distance): a failed check
    ratio = math.inf if summary[RATIO_KEY] is None else float(summary[RATIO_KEY])
    passed = ratio <= LEARNING_BAR
    rows = read_metrics(paths.run)
    training_curve(rows, paths.report / "training_curve.png")
    shown = prediction_sheet(paths, paths.report / "predictions.png")
    data = dataset_summary(paths.data)
    train_rows = [r for r in rows if r.get("split") == "train"]
    val_rows = [r for r in rows if r.get("split") == "val"]

    lines = [
        "# DualPM demo report",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} on {describe_machine()}. "
        f"Everything below was made by the commands listed, in `{paths.out}`.",
        "",
        "## Learning check",
        "",
        f"Model / constant-baseline symmetric Chamfer distance (unit-cube scaled, held-out samples): "
        f"**{ratio:.3f}** (must be <= {LEARNING_BAR}): **{'PASS' if passed else 'FAIL'}**.",
        "",
        "## Stages",
        "",
        "| stage | seconds | command |",
        "|---|---:|---|",
    ]
    for name, command in commands.items():
        done = state["stages"][name]
        lines.append(f"| {name} | {done['seconds']:.1f} | `{' '.join(command)}` |")
    lines += [f"| all (this run, with reused stages) | {seconds:.1f} | `dualpm-demo --out {paths.out}` |", ""]
    features_note = ("RGB pixels (`--extractor rgb`): no Stable Diffusion / DINOv2 weights were configured"
                     if config.extractor == "rgb" else "ODISE-DINO (`--extractor sd-dino`)")
    lines += [
        "## Dataset",
        "",
        f"- {config.models} procedural quadruped{'' if config.models == 1 else 's'}, {config.samples} samples: "
        f"{data['splits'].get('train', 0)} train / {data['splits'].get('val', 0)} val samples, "
        f"{data['shards']} shards; images {config.image_size} px, dual point maps {config.resolution} px x "
        f"{config.layers} layers.",
    ]
    for name, column in data["columns"].items():
        lines.append(f"- column `{name}`: {column['samples']} samples, {_fmt_bytes(column['bytes'])}, "
                     f"{column['failures']} failed")
    lines += [f"- features: {features_note}.", ""]
    lines += ["## Training", ""]
    if train_rows:
        last = train_rows[-1]
        lines.append(f"- {last['step']} steps; last logged train loss {last['loss/total']:.4f}; "
                     f"{last.get('samples_per_s', float('nan')):.1f} samples/s.")
    if val_rows:
        val = val_rows[-1]
        lines.append("- last validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()
                                                       if k.startswith("loss/")) + ".")
    lines += ["- curve: [training_curve.png](training_curve.png)", ""]
    lines += ["## Metrics (dualpm-eval, held-out samples)", "", (paths.eval / "summary.md").read_text().strip(), ""]
    lines += [
        "## Pictures and point clouds",
        "",
        f"- [predictions.png](predictions.png): {shown} held-out samples; per row the input, then per layer "
        "the ground-truth and the predicted canonical coordinates as colours.",
        f"- PLY point clouds (open in MeshLab, Blender, CloudCompare): `{paths.pred}`; posed points are "
        "coloured by their predicted canonical coordinates.",
        f"- metrics per sample: `{paths.eval / 'metrics.csv'}`",
        "",
    ]
    if config.sequence_frames:
        lines += animation_section(paths, state, paths.report / "animation.png")
    atomic_write_text(paths.report / "report.md", "\n".join(lines))
    return passed, ratio
