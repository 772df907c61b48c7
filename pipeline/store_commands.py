"""`dualpm-prep verify` (is the store complete and sound?) and `dualpm-prep show` (a picture of a sample)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image

from dualpm.cliutils import StoreLocation, handles_user_errors
from dualpm.errors import DatasetError
from dualpm.fileio import atomic_output
from dualpm.pointmaps import CANONICAL, POSED_Z, hits
from dualpm.store import StoredSample, check_shard, column_dir, load_manifest, read_shard, verify_store
from dualpm.store.access import open_store
from dualpm.viz import canonical_to_rgb, depth_to_rgb, image_grid


@click.command()
@click.argument("out", type=StoreLocation())
@click.option("--column", "columns", multiple=True, help="Column to check (repeatable).", show_default="all")
@click.option("--quick", is_flag=True, help="Check records and sizes only: no checksums, no decoding.")
@handles_user_errors
def verify(out: Path | str, columns: tuple[str, ...], quick: bool) -> None:
    """Check the store OUT (a folder, or an s3:// gs:// https:// URL): manifest, every planned shard's
    count, checksum, decodability and schema.

    Prints every problem found; the exit code is non-zero if there is any.
    """
    store = open_store(out)
    if store.is_remote:  # each shard is fetched (a few ahead), checked, and deleted again
        manifest = store.load_manifest()
        names = [n for n in (columns or manifest.columns) if n in manifest.columns]
        stage = store.stage_for_verify(names)
        store.prefetch([(manifest.columns[n], p.index) for n in names for p in manifest.plan], verify=False)
        found = verify_store(stage, list(columns) or None, deep=not quick,
                             shard_data=lambda name, index: store.staged(name, [index], records=False))
        problems = [store.name(str(problem)) for problem in found]
    else:
        problems = [str(problem) for problem in verify_store(out, list(columns) or None, deep=not quick)]
    for problem in problems:
        click.echo(f"PROBLEM {problem}", err=True)
    if problems:
        raise click.ClickException(f"{store.where}: {len(problems)} problems found")
    manifest = store.load_manifest()
    for name in columns or manifest.columns:
        records = manifest.columns[name].shards.values()
        samples, failed = sum(r.count for r in records), sum(len(r.failures) for r in records)
        size = sum(r.bytes for r in records)
        click.echo(f"{name}: {len(records)} shards, {samples} samples, {failed} failed, "
                   f"{size / 2**20:.1f} MiB: OK")
    click.echo(f"{store.where}: OK")


def find_sample(out: Path, column: str, sample_id: str) -> StoredSample:
    """The stored fields of `sample_id` in `column` of the store `out` (DatasetError if not there).

    The shard's checksum is not checked (so a picture of a sound sample of a damaged shard can be made);
    each field is checked as it decodes, and its errors name the shard and the sample."""
    manifest = load_manifest(out)
    info = manifest.columns.get(column)
    if info is None:
        raise DatasetError(f"{out}: no column {column!r} (columns: {', '.join(manifest.columns) or 'none'})")
    plan = next((p for p in manifest.plan if sample_id in p.ids), None)
    if plan is None:
        raise DatasetError(f"{out}: sample {sample_id!r} is not in the shard plan")
    record, problem = check_shard(column_dir(out, column), plan.index, info.format, check_checksum=False)
    if problem is not None:
        raise DatasetError(f"{out}: shard {plan.index} of column {column!r} is not usable: {problem}")
    failure = next((f for f in record.failures if f.sample_id == sample_id), None)
    if failure is not None:
        raise DatasetError(f"{out}: sample {sample_id!r} failed in column {column!r}: {failure.reason}")
    for stored_id, fields in read_shard(out, info, plan.index, verify=False):
        if stored_id == sample_id:
            return fields
    raise DatasetError(f"{out}: sample {sample_id!r} is missing from shard {plan.index} of column {column!r}")


def sample_sheet(fields: Mapping[str, Any], title: str) -> Image.Image:
    """Picture of one render sample: RGB and mask, then canonical xyz colours and posed depth per layer."""
    dpm = fields["dpm"]  # (H, W, L, 7) float32
    hit = hits(dpm)  # (H, W, L)
    used = max(1, int(hit.any(axis=(0, 1)).nonzero()[0].max(initial=0)) + 1)  # layers up to the last hit
    points = dpm[..., CANONICAL][hit]  # (N, 3) every hit of every layer: one colour box for all layers
    bbox = np.stack([points.min(0), points.max(0)]) if len(points) else None
    depth = dpm[..., POSED_Z]
    limits = (float(depth[hit].min()), float(depth[hit].max())) if hit.any() else None
    columns = max(used, 2)
    blank = np.full(dpm.shape[:2], 255, np.uint8)
    mask = (fields["mask"] * 255).astype(np.uint8)
    top = [fields["rgb"] if "rgb" in fields else blank, mask]
    top_labels = [f"{title} rgb" if "rgb" in fields else f"{title} (no rgb)", "mask"]
    tiles = top + [blank] * (columns - 2)
    labels = top_labels + [""] * (columns - 2)
    for row, label in (("canonical", "canonical"), ("depth", "depth")):
        for layer in range(columns):
            if layer >= used:
                tiles.append(blank)
                labels.append("")
            elif row == "canonical":
                tiles.append(canonical_to_rgb(dpm[:, :, layer, :3], bbox, hit[:, :, layer]))
                labels.append(f"{label} L{layer + 1}")
            else:
                tiles.append(depth_to_rgb(depth[:, :, layer], hit[:, :, layer], limits=limits))
                labels.append(f"{label} L{layer + 1}")
    return image_grid(tiles, labels, columns=columns, cell=max(128, *dpm.shape[:2]))  # room for labels


@click.command()
@click.argument("out", type=StoreLocation())
@click.option("--sample", "sample_id", required=True, help="Sample id, e.g. 000123.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG to write.")
@click.option("--column", default="render", show_default=True, help="Render column to read.")
@handles_user_errors
def show(out: Path | str, sample_id: str, output: Path, column: str) -> None:
    """Write a picture of one sample of OUT (a folder or a store URL): RGB, mask, and per layer canonical
    xyz and posed depth."""
    store = open_store(out)
    plan = next((p for p in store.load_manifest().plan if sample_id in p.ids), None)
    with store.staged(column, [plan.index] if plan is not None else []) as local, store.named():
        fields = find_sample(local, column, sample_id)
        missing = [f for f in ("dpm", "mask") if f not in fields]
        if missing:
            raise DatasetError(f"{local}: sample {sample_id!r} of column {column!r} has no {', '.join(missing)}")
        sheet = sample_sheet(fields, sample_id)
    with atomic_output(output) as tmp:
        sheet.save(tmp, format="PNG")
    click.echo(f"wrote {output} ({sheet.width}x{sheet.height})")
