"""Protocol objects and the summary writers on hand-made numbers (no evaluation runs here)."""

from __future__ import annotations

import math

from dualpm.eval.protocols import ANIMODEL, DUALPM, PROTOCOLS, finite
from dualpm.eval.summary import RATIO_KEY, RATIO_SURFACE_KEY, TABLE, markdown_table, metrics_csv, summary_json


def test_registry_and_headlines():
    assert list(PROTOCOLS) == ["dualpm", "animodel"] and PROTOCOLS["animodel"] is ANIMODEL
    labels = dict(TABLE)
    for protocol in PROTOCOLS.values():
        assert protocol.headline in labels  # the headline metric is a row of every table
        assert protocol.ratio_definition().startswith(f"mean {protocol.headline} of the model / that of the constant")
    assert (DUALPM.icp_iterations, ANIMODEL.icp_iterations) == (50, 200)
    assert (DUALPM.mesh_targets, ANIMODEL.mesh_targets) == (False, True)


def test_ratios_by_hand():
    model = {"unit_chamfer_layers_sym": 0.02, "unit_chamfer_surface_sym": 0.03, "animodel_unit_chamfer_sym": 0.01}
    base = {"unit_chamfer_layers_sym": 0.08, "unit_chamfer_surface_sym": 0.06, "animodel_unit_chamfer_sym": 0.04}
    assert DUALPM.ratios(model, base) == (0.25, 0.5)
    assert ANIMODEL.ratios(model, base) == (0.25, None)  # no surface ratio in this protocol
    assert DUALPM.ratios(model, None) == (None, None)
    assert DUALPM.ratios(model, {**base, "unit_chamfer_layers_sym": 0.0})[0] is None  # no division by 0
    assert DUALPM.ratios({**model, "unit_chamfer_layers_sym": math.inf}, base)[0] is None  # JSON has no inf
    assert (finite(1.5), finite(math.nan), finite(-math.inf), finite(3)) == (1.5, None, None, None)


def test_summary_and_table_name_the_protocol():
    model = {"animodel_unit_chamfer_sym": 0.01, "points": 100.0, "iou_l1": math.nan}
    base = {"animodel_unit_chamfer_sym": 0.04, "points": 400.0, "iou_l1": 0.5}
    summary = summary_json(ANIMODEL, model, base, {}, ["a note"], {"samples": 2, "data": "D"})
    assert list(summary)[:5] == ["protocol", "protocol_definition", RATIO_KEY, "ratio_definition", RATIO_SURFACE_KEY]
    assert summary["protocol"] == "animodel" and summary[RATIO_KEY] == 0.25 and summary[RATIO_SURFACE_KEY] is None
    assert summary["model"]["iou_l1"] is None  # NaN written as null
    assert markdown_table(ANIMODEL, summary, layers=1).splitlines() == [
        "# DualPM evaluation, protocol animodel: 2 samples of D",
        "",
        f"Protocol: {ANIMODEL.definition}.",
        "",
        "| metric | model | baseline |",
        "|---|---:|---:|",
        "| Animodel Chamfer bidir., unit cube | 0.01 | 0.04 |",
        "| kept points per sample | 100 | 400 |",
        "| occupancy IoU, layer 1 | n/a | 0.5 |",
        "",
        f"{RATIO_KEY} = 0.25 (model / baseline, {ANIMODEL.headline_words}; lower is better)",
        "",
        "Notes:",
        "- a note",
    ]


def test_metrics_csv_rows():
    text = metrics_csv(["a", "b"], [{"x": 1.0}, {"x": 2.0, "y": 0.5}], [{"x": 3.0}, {"x": 4.0}])
    assert text == "id,x,y,baseline_x,baseline_y\na,1.0,nan,3.0,nan\nb,2.0,0.5,4.0,nan\n"
