"""CPU seconds per sample of the Animodel protocol (`dualpm-eval --protocol animodel --baseline`), issue 26.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_speed.py --pred demo_out/pred60 --data demo_out/data \\
        --samples 60 --out new.jsonl
    PYTHONPATH=/work/main .venv/bin/python bench/eval_speed.py ... --out old.jsonl   # another checkout's code
    .venv/bin/python bench/eval_speed.py --clouds c.npz --out new.jsonl \
        --reference /work/main/dualpm/eval/animodel.py --reference-out old.jsonl        # both, alternating
    .venv/bin/python bench/eval_speed.py --compare old.jsonl new.jsonl              # numbers only

For each of the first `--samples` predictions: the model's kept posed points and the constant baseline's,
in the world frame, against the posed target mesh, with the per-sample seed, exactly as `dualpm-eval
--protocol animodel --baseline` builds them (`dualpm.eval.protocols._animodel_store`). Each cloud is scored
on its own with `dualpm.eval.animodel.score` (which `score_all` equals, tested), so its CPU time
(`time.process_time`, one process: run it with OMP_NUM_THREADS=1) includes the target's volume and samples.
Prints CPU s per sample for the model and the baseline and their ratio to the 1.0 s target, and writes one
JSON line per sample and cloud (metrics and seconds) to `--out`. The clouds and targets are read once and
kept in `--clouds` (npz) so that two checkouts score the very same inputs. With `--reference` another
animodel.py (main's) scores every cloud too, alternating with this checkout's in the same process, so that
both are timed under the same load.

`--compare A.jsonl B.jsonl` prints, per reported number, the largest relative difference between the two
runs over the samples both hold, and the count of changed flip decisions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

TARGET_S = 1.0  # issue 26: CPU s per sample, model and baseline alike
NUMBERS = ("chamfer_pred_to_gt", "chamfer_gt_to_pred", "chamfer_sym", "unit_chamfer_pred_to_gt",
           "unit_chamfer_gt_to_pred", "unit_chamfer_sym", "volume_scale")


def read_clouds(pred: Path, data: Path, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Model and baseline clouds and targets of the first `samples` predictions, as `_animodel_store` makes
    them. Returns flat npz-ready arrays: ids, and per sample i: model_i, baseline_i (N, 3) float64,
    vertices_i (V, 3) float64, faces_i (F, 3) int64, seed_i."""
    from dualpm.eval.baseline import fit_constant_baseline
    from dualpm.eval.evaluate import GroundTruthReader
    from dualpm.eval.protocols import _cloud
    from dualpm.predictions import keep_mask, open_predictions
    from dualpm.store.access import open_store

    predictions = open_predictions(pred)
    attrs = predictions.attrs
    store = open_store(data)
    layers = int(predictions.arrays["canonical"].shape[1])
    constant = fit_constant_baseline(store, layers, tuple(predictions.arrays["mask"].shape[1:]), "train")
    ids = list(predictions.ids)[:samples]
    index = {sid: i for i, sid in enumerate(predictions.ids)}
    reader = GroundTruthReader(store, None, 0, seed, world_mesh=True)
    out: dict[str, np.ndarray] = {}
    kept = []
    for gt in reader.read(ids):
        if gt.world_vertices is None:
            continue
        maps = predictions.sample(index[gt.sample_id])
        keep = keep_mask(maps, attrs["occupancy_threshold"], attrs["confidence_threshold"])
        i = len(kept)
        out[f"model_{i}"] = _cloud(maps.canonical, maps.posed, keep, gt.view, "world", 0.0)
        out[f"baseline_{i}"] = _cloud(*constant.predict(maps.mask), gt.view, "world", 0.0)
        out[f"vertices_{i}"] = np.asarray(gt.world_vertices, dtype=np.float64)
        out[f"faces_{i}"] = np.asarray(gt.faces, dtype=np.int64)
        out[f"seed_{i}"] = np.asarray(seed + zlib.crc32(gt.sample_id.encode()))
        kept.append(gt.sample_id)
    out["ids"] = np.asarray(kept)
    return out


def load_reference(path: Path):
    """Another version of `dualpm/eval/animodel.py` (e.g. main's) as a module of its own, importing the rest
    of `dualpm` from this checkout: it times that file's own code with this checkout's `nearest`,
    `sampling`, `align` and `metrics`. To time another checkout as a whole, run this script twice with
    PYTHONPATH set to each (one process each, same `--clouds`) and `--compare` the two JSONL files."""
    spec = importlib.util.spec_from_file_location("animodel_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(clouds: dict[str, np.ndarray], outs: dict[str, Path], samples: int, modules: dict) -> None:
    """Score every sample's model and baseline cloud with each module in `modules` (name -> animodel
    module), alternating per cloud so that they run under the same load; one JSONL per module."""
    import trimesh

    seconds = {(name, kind): [] for name in modules for kind in ("model", "baseline")}
    files = {name: outs[name].open("w") for name in modules}
    for i, sample_id in enumerate(clouds["ids"].tolist()[:samples]):
        for kind in ("model", "baseline"):
            cloud = clouds[f"{kind}_{i}"]
            for name, module in modules.items():
                target = trimesh.Trimesh(clouds[f"vertices_{i}"], clouds[f"faces_{i}"], process=False)
                options = module.AnimodelOptions(seed=int(clouds[f"seed_{i}"]))
                start = time.process_time()
                result = module.score(cloud, target, options)
                spent = time.process_time() - start
                seconds[name, kind].append(spent)
                row = {"id": sample_id, "cloud": kind, "points": len(cloud), "cpu_s": spent,
                       "icp_iterations": result.icp_iterations, **result.metrics()}
                files[name].write(json.dumps(row) + "\n")
                files[name].flush()
        print(f"{sample_id}: " + ", ".join(f"{name} {kind} {values[-1]:.2f} s" for (name, kind), values
                                           in seconds.items()), flush=True)
    for file in files.values():
        file.close()
    load = os.getloadavg()
    for (name, kind), values in seconds.items():
        mean = float(np.mean(values))
        print(f"{name} {kind}: {mean:.3f} CPU s / sample over {len(values)} samples = "
              f"{mean / TARGET_S:.2f}x the {TARGET_S} s target (median {np.median(values):.3f}, "
              f"max {max(values):.3f})")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def compare(a: Path, b: Path) -> None:
    def rows(path: Path) -> dict[tuple[str, str], dict]:
        return {(r["id"], r["cloud"]): r for r in map(json.loads, path.read_text().splitlines())}

    first, second = rows(a), rows(b)
    common = sorted(set(first) & set(second))
    print(f"{len(common)} sample clouds in both ({len(first)} in {a.name}, {len(second)} in {b.name})")
    for kind in ("model", "baseline"):
        keys = [k for k in common if k[1] == kind]
        flips = sum(first[k]["flipped"] != second[k]["flipped"] for k in keys)
        print(f"{kind} ({len(keys)} samples): flip decisions changed: {flips}")
        for name in NUMBERS:
            worst, where = 0.0, None
            for k in keys:
                x, y = first[k][name], second[k][name]
                if x == y:
                    diff = 0.0
                else:
                    diff = abs(x - y) / max(abs(x), abs(y)) if math.isfinite(x - y) else math.inf
                if diff > worst:
                    worst, where = diff, k[0]
            print(f"  {name:24s} max relative difference {worst:.2e}" + (f" ({where})" if where else ""))
        times = [(first[k]["cpu_s"], second[k]["cpu_s"]) for k in keys]
        if times:
            ta, tb = np.mean(times, axis=0)
            print(f"  CPU s / sample: {a.name} {ta:.3f}, {b.name} {tb:.3f}, ratio {tb / ta:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, help="dualpm-infer output folder")
    parser.add_argument("--data", type=Path, help="prepared dataset (ground truth, baseline)")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="dualpm-eval --seed")
    parser.add_argument("--clouds", type=Path,
                        help="npz of the clouds and targets: read if it exists, else written")
    parser.add_argument("--out", type=Path, help="per-sample JSONL")
    parser.add_argument("--reference", type=Path, metavar="ANIMODEL_PY",
                        help="also score with this animodel.py (e.g. /work/main/dualpm/eval/animodel.py), "
                             "alternating with this checkout's, into --reference-out")
    parser.add_argument("--reference-out", type=Path, help="per-sample JSONL of --reference")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="compare two JSONL runs")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    if args.out is None:
        parser.error("--out is required (or --compare)")
    if args.clouds is not None and args.clouds.exists():
        with np.load(args.clouds) as stored:
            clouds = dict(stored)
    else:
        if args.pred is None or args.data is None:
            parser.error("--pred and --data are required without an existing --clouds file")
        clouds = read_clouds(args.pred, args.data, args.samples, args.seed)
        if args.clouds is not None:
            np.savez(args.clouds, **clouds)
    from dualpm.eval import animodel

    modules, outs = {"new": animodel}, {"new": args.out}
    if args.reference is not None:
        if args.reference_out is None:
            parser.error("--reference needs --reference-out")
        modules = {"reference": load_reference(args.reference), **modules}
        outs = {"reference": args.reference_out, **outs}
    run(clouds, outs, args.samples, modules)


if __name__ == "__main__":
    main()
