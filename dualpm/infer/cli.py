"""`dualpm-infer`: run a trained DualPM model on a prepared dataset split or on a folder of images.

    dualpm-infer --checkpoint runs/demo --data out/demo --split val --out pred/demo
    dualpm-infer --checkpoint runs/demo/checkpoints/latest.pt --images photos/ --masks masks/ --out pred/photos
    dualpm-infer --oracle --data out/demo --out pred/oracle    # ground truth as the prediction: checks eval

Outputs, in OUT:

    predictions.zarr/               every prediction, dense (what dualpm-eval reads; see `PredictionsWriter`)
    samples/<id>/canonical.ply      kept points in canonical space, coloured by their canonical xyz
    samples/<id>/posed.ply          the same points posed (camera space, depth subtracted), same colours
    samples/<id>/sheet.png          input, mask, then per layer: canonical colours, depth, confidence
    samples/<id>/skeleton.json      with --skeleton: per-joint canonical -> posed transforms
    samples/<id>/reposed.ply        with --skeleton: the template mesh posed by those transforms
    failures.jsonl                  samples (or steps of them) that could not be done, and why
    infer.config.yaml               the resolved configuration

Kept points follow the reference rule: sigmoid(occupancy) > 0.5, inside the mask, confidence >= 2.0
(both thresholds configurable), and finite. A model trained with left-right mirroring predicts each image
twice, directly and mirrored, and stores the mean (`--mirror-average`, on by default for such models).
Every kept point, PLY and sheet is derived from the float16 values stored in the Zarr, so the files and
what dualpm-eval measures agree exactly.

Inputs: `--data` reads the dataset's stored features (the model's training resolution, as the trainer
decodes them). `--images/--masks` pairs files by stem (`<id>.png` or `<id>_rgb.png` with `<id>.png` or
`<id>_mask.png`), runs the feature extractor of the checkpoint's feature spec with the PCA basis carried
by the checkpoint, and upsamples the features as the trainer does; a sample whose mask is missing or whose
image cannot be read is listed in failures.jsonl and the others are processed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
from tqdm import tqdm

from dualpm.cliutils import StoreLocation, cache_option, handles_user_errors, show_and_save_config
from dualpm.data.reader import open_dataset
from dualpm.errors import BackendUnavailable, ConfigError, DatasetError
from dualpm.fileio import atomic_directory, atomic_write_text, safe_join
from dualpm.infer import InferError
from dualpm.infer.batches import Batch, dataset_batches, image_batches, pair_images, prefetch
from dualpm.infer.predictors import (
    ModelPredictor,
    OraclePredictor,
    build_image_features,
    feature_differences,
    load_model,
    resolve_checkpoint,
)
from dualpm.infer.writers import MeshSource, OutputOptions, write_sample
from dualpm.model import describe
from dualpm.predictions import (
    CONFIDENCE_THRESHOLD,
    MAP_NAMES,
    OCCUPANCY_THRESHOLD,
    PREDICTIONS,
    SAMPLES,
    PredictedMaps,
    PredictionsWriter,
)
from dualpm.train.checkpoint import load_checkpoint

FAILURES = "failures.jsonl"


def local_device(requested: str) -> torch.device:
    """The torch device of this process for --device auto|cpu|cuda (auto: cuda where torch sees a GPU)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _check_inputs(checkpoint: Path | None, oracle: bool, data: Path | None, images: Path | None,
                  masks: Path | None, skeleton: bool, mesh: Path | None) -> None:
    if (checkpoint is None) == (not oracle):
        raise ConfigError("give exactly one of --checkpoint (a trained model) and --oracle (the ground truth)")
    if (data is None) == (images is None):
        raise ConfigError("give exactly one input: --data DATASET (a prepared dataset) or --images DIR --masks DIR")
    if (images is None) != (masks is None):
        raise ConfigError("--images and --masks go together: every image needs its object mask")
    if oracle and data is None:
        raise ConfigError("--oracle reads the ground truth of a prepared dataset: give --data")
    if skeleton and images is not None and mesh is None:
        raise ConfigError("--skeleton on raw images needs the template: --mesh PATH (a skinned glTF/GLB)")


def _summary_line(done: int, failures: list[dict[str, str]], seconds: float, out: Path) -> str:
    rate = done / seconds if seconds > 0 else math.inf
    failed = sorted({f["id"] for f in failures if "step" not in f})
    skeletons = sorted({f["id"] for f in failures if f.get("step") == "skeleton"})
    shown = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
    line = f"infer: {done} samples predicted, {len(failed)} failed" + (f" ({shown})" if failed else "")
    if skeletons:
        line += f", {len(skeletons)} skeleton fits failed"
    line += f" in {seconds:.1f} s ({rate:.2f} samples/s) -> {out / PREDICTIONS}"
    if failures:
        line += f"; reasons in {out / FAILURES}"
    return line


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training checkpoint (.pt), or a run folder meaning its checkpoints/latest.pt.")
@click.option("--oracle", is_flag=True,
              help="Use the dataset's ground truth (all stored layers) as the prediction instead of a model: "
                   "checks evaluation and skeleton fitting.")
@click.option("--oracle-noise", type=click.FloatRange(0, 10), default=0.0,
              help="--oracle: Gaussian noise added to every point, scene units (seeded by --seed).")
@click.option("--data", type=StoreLocation(), default=None,
              help="Prepared dataset (dualpm-prep output; a folder or an s3:// gs:// https:// URL): predict "
                   "from its stored features.")
@cache_option
@click.option("--split", type=str, default="val", help="--data: the split to predict.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of images (<id>.png or <id>_rgb.png; also jpg, bmp, webp, tif).")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of object masks, paired by id (<id>.png or <id>_mask.png).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--batch", type=click.IntRange(1, 4096), default=8, help="Samples per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="auto: CUDA when torch sees a GPU.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--occupancy-threshold", type=click.FloatRange(0, 1), default=OCCUPANCY_THRESHOLD,
              help="Keep points with sigmoid(occupancy) above this.")
@click.option("--confidence-threshold", type=click.FloatRange(1, None), default=CONFIDENCE_THRESHOLD,
              help="Keep points with confidence c = 1 + exp(raw) at least this.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Predict at most this many samples (0: all).")
@click.option("--skeleton", is_flag=True,
              help="Also fit every joint's transform from the kept point pairs: skeleton.json, reposed.ply.")
@click.option("--mesh", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--skeleton: the template mesh (skinned glTF/GLB) for every sample.")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              show_default="the dataset manifest's source",
              help="--skeleton with --data: source dataset holding the templates (shapes/<model>/).")
@click.option("--sd-model", type=str, default=None, show_default="as recorded in the checkpoint",
              help="Raw images, sd-dino features: where the Stable Diffusion folder is on this machine.")
@click.option("--dino-model", type=str, default=None, show_default="as recorded in the checkpoint",
              help="Raw images, sd-dino/dino features: where the DINOv2 folder is on this machine.")
@click.option("--mirror-average/--no-mirror-average", default=None,
              show_default="on when the checkpoint was trained with data.hflip_canonical_axis",
              help="Average each prediction with that of the left-right mirrored image, mirrored back.")
@click.option("--no-ply", is_flag=True, help="Do not write the PLY point clouds.")
@click.option("--no-sheets", is_flag=True, help="Do not write the PNG sheets.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="--oracle-noise seed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/predictions.zarr.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the sample count; write nothing.")
@handles_user_errors
def main(checkpoint: Path | None, oracle: bool, oracle_noise: float, data: Path | str | None, split: str,
         cache: Path | None, cache_gib: float,
         images: Path | None, masks: Path | None, out: Path, batch: int, device: str, precision: str,
         occupancy_threshold: float, confidence_threshold: float, limit: int, skeleton: bool,
         mesh: Path | None, source: Path | None, sd_model: str | None, dino_model: str | None,
         mirror_average: bool | None, no_ply: bool, no_sheets: bool, seed: int, overwrite: bool,
         dry_run: bool) -> None:
    """Predict dual point maps with a trained DualPM model: per sample, point clouds (PLY), a picture sheet
    and (optionally) the skeleton; all dense predictions in OUT/predictions.zarr for dualpm-eval."""
    _check_inputs(checkpoint, oracle, data, images, masks, skeleton, mesh)
    torch_device = local_device(device)
    state, model_config, where = None, None, None
    if checkpoint is not None:
        where = resolve_checkpoint(checkpoint)
        state = load_checkpoint(where)
        model, model_config = load_model(state, where)
    info = open_dataset(data, cache, int(cache_gib * 2**30)) if data is not None else None
    mirror_axis = None
    if oracle:
        layers, resolution = info.stored_layers, info.resolution
        if mirror_average:
            raise InferError("--mirror-average needs a model (--checkpoint), not --oracle")
    else:
        layers, resolution = model_config.model.num_layers, tuple(model_config.data.resolution)
        trained_axis = model_config.data.hflip_canonical_axis
        if mirror_average and trained_axis is None:
            raise InferError(f"--mirror-average: {where} was trained without mirroring "
                             "(data.hflip_canonical_axis), so its canonical mirror axis is unknown")
        mirror_axis = None if mirror_average is False else trained_axis  # None (unset): as trained
        if info is not None:
            diffs = feature_differences(state.get("features") or {}, info.feature_config)
            if diffs:
                raise InferError(f"{where} was trained on other features than {data} holds: {'; '.join(diffs)}")
    pairs, failures = ([], []) if images is None else pair_images(images, masks)
    total = (info.count(split) if split in info.shards else 0) if info is not None else len(pairs)
    total = min(total, limit) if limit else total
    if source is None and info is not None and skeleton and mesh is None:
        source = Path(info.manifest.source)
    bf16 = precision == "bf16" or (precision == "auto" and torch_device.type == "cuda")
    config = {
        "mode": "oracle" if oracle else "model",
        "checkpoint": str(where) if where else None,
        "step": int(state["step"]) if state else None,
        "oracle_noise": oracle_noise if oracle else None,
        "data": (str(data.resolve()) if isinstance(data, Path) else data) if data else None, "split": split if data else None,
        "images": str(images.resolve()) if images else None, "masks": str(masks.resolve()) if masks else None,
        "out": str(out), "samples": total, "batch": batch, "device": str(torch_device),
        "precision": "bf16" if bf16 else "fp32", "layers": layers, "resolution": list(resolution),
        "occupancy_threshold": occupancy_threshold, "confidence_threshold": confidence_threshold,
        "mirror_average_axis": mirror_axis,
        "skeleton": skeleton, "mesh": str(mesh) if mesh else None, "source": str(source) if source else None,
        "ply": not no_ply, "sheets": not no_sheets, "seed": seed,
        "model": state["config"]["model"] if state else None,
        "features": (state.get("features") if state else (info.feature_config if info else None)),
    }
    if dry_run:
        show_and_save_config(config, None, "inference config (dry run)")
        if state is not None:
            click.echo(describe(model))
        click.echo(f"{total} samples would be predicted into {out / PREDICTIONS}")
        return
    if (out / PREDICTIONS).exists() and not overwrite:
        raise InferError(f"{out / PREDICTIONS} exists; pass --overwrite to replace it (or choose another --out)")
    if data is not None and split not in info.shards:
        raise DatasetError(f"{data}: split {split!r} has no finished shards (splits: {sorted(info.shards)})")

    if oracle:
        predictor: Callable[[Batch], PredictedMaps] = OraclePredictor(oracle_noise, seed)
    else:
        predictor = ModelPredictor(model, torch_device, bf16, mirror_axis)
    if info is not None:
        batches = prefetch(dataset_batches(info, split, layers, resolution, batch, limit, with_target=oracle))
    else:
        extractor, basis = build_image_features(state, where, torch_device, sd_model, dino_model)
        batches = image_batches(pairs[:limit] if limit else pairs, extractor, basis, resolution, batch, failures)
    options = OutputOptions(not no_ply, not no_sheets, skeleton, occupancy_threshold, confidence_threshold)
    meshes = MeshSource(mesh, source) if skeleton else None

    out.mkdir(parents=True, exist_ok=True)
    show_and_save_config(config, out / "infer.config.yaml", "inference config")
    if state is not None:
        click.echo(describe(model))
    start = time.perf_counter()
    done = 0
    with atomic_directory(out / PREDICTIONS, overwrite=True) as tmp:
        store = PredictionsWriter(tmp, layers, resolution)
        with tqdm(total=total, desc="infer", unit="sample", dynamic_ncols=True) as bar:
            for inputs in batches:
                maps = predictor(inputs)
                store.append(inputs.ids, maps)
                for i, sample_id in enumerate(inputs.ids):
                    one = PredictedMaps(*(getattr(maps, name)[i] for name in MAP_NAMES))
                    folder = safe_join(out, f"{SAMPLES}/{sample_id}")
                    failures += write_sample(folder, sample_id, one, inputs.images[i], inputs.meta[i], options, meshes)
                done += len(inputs.ids)
                bar.update(len(inputs.ids))
        atomic_write_text(out / FAILURES, "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
        if done == 0:
            reasons = "; ".join(f"{f['id']}: {f['reason']}" for f in failures[:3])
            raise InferError(f"no sample could be predicted{': ' + reasons if reasons else ''}")
        store.finish(config | {"failed": sorted({f["id"] for f in failures if "step" not in f})})
    click.echo(_summary_line(done, failures, time.perf_counter() - start, out))


if __name__ == "__main__":
    main()
