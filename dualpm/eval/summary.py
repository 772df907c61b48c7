"""What `dualpm-eval` writes: summary.json, the markdown table (summary.md) and metrics.csv.

summary.json starts with the protocol (`Protocol.name`, `.definition`) and its headline ratio `RATIO_KEY`:
the model's mean of the protocol's headline metric divided by the constant baseline's (null without
--baseline; lower is better), then the means over samples (NaN and inf written as null, see the notes).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from dualpm.eval.protocols import Protocol, finite

RATIO_KEY = "chamfer_ratio_model_over_baseline"
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


def summary_json(
    protocol: Protocol, model: dict[str, float], baseline: dict[str, float] | None,
    per_joint: dict[str, dict[str, float]], notes: list[str], info: dict[str, Any],
) -> dict[str, Any]:
    """The summary: the protocol and its ratios first, then means over samples."""
    ratio, surface_ratio = protocol.ratios(model, baseline)
    return {
        "protocol": protocol.name,
        "protocol_definition": protocol.definition,
        RATIO_KEY: ratio,
        "ratio_definition": protocol.ratio_definition(),
        RATIO_SURFACE_KEY: surface_ratio,
        **info,
        "model": {k: finite(v) for k, v in model.items()},
        "baseline": None if baseline is None else {k: finite(v) for k, v in baseline.items()},
        "skeleton_per_joint": per_joint,
        "notes": notes,
    }


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.4g}"


def markdown_table(protocol: Protocol, summary: dict[str, Any], layers: int) -> str:
    """summary.md: a title naming the protocol, one row per metric present, the headline ratio, the notes."""
    model, baseline = summary["model"], summary["baseline"]
    columns = ["metric", "model"] + (["baseline"] if baseline is not None else [])
    lines = [
        f"# DualPM evaluation, protocol {protocol.name}: {summary['samples']} samples of {summary['data']}",
        "",
        f"Protocol: {protocol.definition}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    rows = TABLE + [(f"iou_l{k}", f"occupancy IoU, layer {k}") for k in range(1, layers + 1)]
    for key, label in rows:
        if key in model:
            cells = [label, _cell(model[key])] + ([_cell(baseline.get(key))] if baseline is not None else [])
            lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        lines += ["", f"{RATIO_KEY} = {_cell(summary[RATIO_KEY])} (model / baseline, {protocol.headline_words}; "
                      "lower is better)"]
    if summary["notes"]:
        lines += ["", "Notes:"] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"


def metrics_csv(ids: list[str], model_rows: list[dict[str, float]], baseline_rows: list[dict[str, float]] | None) -> str:
    """metrics.csv: one row per sample id, every model metric, then `baseline_<metric>` with a baseline."""
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
