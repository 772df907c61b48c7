"""`dualpm-eval pair PRED TARGET`: one reconstruction, from any method, against one target mesh.

    dualpm-eval pair recon/000123.obj animodel/horse/meshes/000123.obj           # Animodel protocol
    dualpm-eval pair pred/samples/000123/posed.ply gt.obj --protocol dualpm --json

PRED is a point cloud (PLY without faces) or a triangle mesh (OBJ, PLY, GLB, OFF, STL); TARGET a triangle
mesh. Both must be in the same frame and units: for the Animodel protocol, the target's world frame with
+Y up (the benchmark's requirement); ICP, the 180-degree turn about Y and the volume rescale take care of
the rest. Files that lie are refused: an ASCII PLY whose body does not match its header, vertices that
are not finite; for the Animodel protocol, a target that encloses no volume at the voxel pitch (holes: its
volume would be meaningless; `--no-rescale` scores without the rescale). `target_watertight` in the output
says whether every edge of the target has two faces. Protocols:

* `animodel` (default here): `dualpm.eval.animodel.score`, the benchmark's numbers (a point cloud is meshed
  first, see `mesh_from_points`);
* `dualpm`: what `dualpm-eval --protocol dualpm` reports against a mesh surface: Chamfer from the points
  (a mesh prediction: `--surface-points` random points on it) to `--surface-points` random points on the
  target, plain and after ICP with the flip about the vertical through the centroid; unit cube by the
  target points' box.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dualpm.cliutils import handles_user_errors
from dualpm.eval.animodel import AnimodelOptions
from dualpm.eval.protocols import PROTOCOLS, Protocol, finite
from dualpm.eval.targets import load_geometry, load_target


def pair_metrics(pred: Path, target: Path, protocol: Protocol, options: AnimodelOptions, surface_points: int
                 ) -> dict[str, float]:
    """Metrics of one reconstruction file against one target mesh file, under `protocol`, and whether the
    target is watertight (`target_watertight`: a target with holes whose volume the voxel fill still closes
    is scored, and said so)."""
    reconstruction, mesh = load_geometry(pred), load_target(target)
    return protocol.score_pair(reconstruction, mesh, options, surface_points, target) | {
        "target_watertight": float(mesh.is_watertight)}


def describe(metrics: dict[str, float], protocol: Protocol) -> str:
    """Readable lines for the terminal."""
    lines = [f"protocol: {protocol.name} ({protocol.definition})"]
    for prefix, label in protocol.pair_frames:
        values = [metrics[f"{prefix}chamfer_{d}"] for d in ("sym", "pred_to_gt", "gt_to_pred")]
        lines.append(f"Chamfer ({label}): bidirectional {values[0]:.6f}, reconstruction->target {values[1]:.6f}, "
                     f"target->reconstruction {values[2]:.6f}")
    if "volume_scale" in metrics:
        lines.append(f"volume rescale x{metrics['volume_scale']:.4f}, flipped: {bool(metrics['flipped'])}, "
                     f"closed surface: {bool(metrics['enclosed'])}")
    if not metrics["target_watertight"]:
        lines.append("target: not watertight (some edges border one face only; the animodel volume is that of "
                     "the voxels its surface still encloses)")
    return "\n".join(lines)


# The Animodel sampling options of `dualpm-eval` and `dualpm-eval pair`, defined once.
_ANIMODEL_SAMPLING = (
    click.option("--align-points", type=click.IntRange(3, 1_000_000), default=8000,
                 help="animodel: even points per surface for ICP."),
    click.option("--chamfer-points", type=click.IntRange(1, 10_000_000), default=60000,
                 help="animodel: even points per surface for the Chamfer distance."),
    click.option("--min-cubes", type=click.IntRange(4, 1000), default=100,
                 help="animodel: voxel pitch = shortest side of a mesh's box / this (volume and remesh)."),
)


def animodel_sampling_options(fn):
    """Add --align-points, --chamfer-points and --min-cubes (in that order) to a command."""
    for option in reversed(_ANIMODEL_SAMPLING):
        fn = option(fn)
    return fn


@click.command("pair", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--protocol", "protocol_name", type=click.Choice(list(PROTOCOLS)), default="animodel",
              help="Which protocol scores the pair.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of every random surface sample.")
@animodel_sampling_options
@click.option("--icp-iterations", type=click.IntRange(1, 1000), default=None,
              show_default="200 (animodel), 50 (dualpm)", help="ICP iterations per start.")
@click.option("--surface-points", type=click.IntRange(min=1), default=10000,
              help="dualpm: random points on the target (and on a mesh prediction).")
@click.option("--flip/--no-flip", default=True, help="animodel: also try the 180-degree turn about world Y.")
@click.option("--rescale/--no-rescale", default=True, help="animodel: volume rescale and remesh before ICP.")
@handles_user_errors
def pair(pred: Path, target: Path, protocol_name: str, as_json: bool, seed: int, align_points: int,
         chamfer_points: int, min_cubes: int, icp_iterations: int | None, surface_points: int, flip: bool,
         rescale: bool) -> None:
    """Score the reconstruction PRED (points or mesh) against the target mesh TARGET, both in the target's
    frame (+Y up for animodel), and print the metrics. The same files, options and seed give the same
    numbers."""
    protocol = PROTOCOLS[protocol_name]
    options = AnimodelOptions(align_points=align_points, chamfer_points=chamfer_points, min_cubes=min_cubes,
                              seed=seed, flip=flip,
                              rescale=rescale, icp_iterations=icp_iterations or protocol.icp_iterations)
    metrics = pair_metrics(pred, target, protocol, options, surface_points)
    if as_json:
        report = {"protocol": protocol.name, "protocol_definition": protocol.definition, "prediction": str(pred),
                  "target": str(target), "metrics": {k: finite(v) for k, v in metrics.items()},
                  "options": {"seed": seed, "align_points": align_points, "chamfer_points": chamfer_points,
                              "min_cubes": min_cubes, "icp_iterations": options.icp_iterations, "surface_points": surface_points,
                              "flip": flip, "rescale": rescale}}
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(describe(metrics, protocol))

