"""Does training on a rig's own look help? Demo config trained on `--appearance procedural` vs `asset`.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 flock /tmp/dualpm-heavy.lock \\
        .venv/bin/python bench/appearance_learning.py --out /tmp/applearn

The rig: a procedural quadruped (`--faces`, 5,000 like the demo) saved as a user rig with TEXCOORD_0, a
made texture (orange stripes, white belly) and a clip, exactly as `bench/synth_appearance.py` builds it.

Training sets, same seed (so the same poses, clips and cameras sample by sample; only the images differ),
the demo's sizes (`--samples` 3,000, 128 px images, 32 px dual point maps, 4 layers, 10% held out):
- `procedural`: `--appearance procedural`: the fur coat, one Lambert light, the smooth gradient background;
- `asset`: `--appearance asset`: the rig's texture, 2-3 lights with shadows, the same gradient backgrounds.

Test sets, another seed (other poses and cameras), `--appearance asset`, light and background unlike
either training set (`--test-samples`, half of them scored, the other half is the `train` split the
constant baseline is averaged over; both test sets share their geometry, so their baseline is the same):
- `hdri`: `--hdri` with six panoramas made here (sunset, overcast, deep blue noon, dusk, a desert and a
  room with windows: a coloured sky with a bright sun or lamps, a mountain or wall silhouette at the
  horizon, a textured ground) that light the animal (spherical-harmonic irradiance plus a shadowing key
  light from the brightest direction) and are seen behind it;
- `photos`: `--backgrounds` with eight "photos" made here (buildings, trees, leaves, tiles: hard edges,
  saturated colours, high-frequency texture, none of which the training gradients have); the lights are
  the asset set's kind. (`synth` shows the HDRI behind the animal when both folders are given, so the two
  are separate test sets.)

Then `configs/demo.yaml` (unchanged but for `--steps`, with the learning-rate halving at a third of
them as in the config) is trained on both training sets at once (one thread each), every model predicts
its own held-out split and both test sets (`dualpm-infer` as in the demo, without PLYs and sheets)
and `dualpm-eval --baseline` scores them with the default dualpm protocol: model / constant-baseline
mean symmetric unit-cube Chamfer to the GT layer points, the demo's learning check. Every stage is the
real console command, run as a subprocess; `OUT/state.json` records finished stages, so a rerun resumes.
Prints the table and writes `OUT/results.json`, including the paired per-sample comparison of the two
models on each test set (same samples: mean difference of Chamfer and its standard error, share of
samples won).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synth_appearance import _rig  # noqa: E402
from dualpm.fileio import atomic_write_text  # noqa: E402
from pipeline.demo import _script  # noqa: E402
from pipeline.demo_config import DEFAULT_CONFIG  # noqa: E402
from tests.rigs import png_bytes  # noqa: E402

TRAININGS = ("procedural", "asset")
TESTS = ("hdri", "photos")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- light and background sets unlike the training ones (made here, seeded) ---------------------------


def _noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) smooth value noise in [0, 1]: a random `cells` grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1))
    y, x = np.linspace(0, cells, h)[:, None], np.linspace(0, cells, w)[None, :]
    y0, x0 = np.minimum(y.astype(int), cells - 1), np.minimum(x.astype(int), cells - 1)
    fy, fx = y - y0, x - x0
    return ((grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx) * (1 - fy)
            + (grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx) * fy)


PANORAMAS = {  # sky top, sky at the horizon, ground, horizon silhouette colour, sun (u, v, radius, colour)
    "sunset": ((40, 40, 110), (250, 140, 60), (60, 50, 40), (30, 25, 35), (0.2, 0.46, 0.03, (255, 230, 170))),
    "overcast": ((150, 155, 165), (200, 200, 205), (90, 100, 80), (70, 80, 70),
                 (0.6, 0.15, 0.12, (245, 245, 245))),
    "noon": ((10, 60, 200), (120, 180, 250), (50, 120, 30), (40, 70, 40),
             (0.75, 0.1, 0.025, (255, 255, 250))),
    "dusk": ((5, 5, 30), (60, 40, 90), (20, 20, 30), (10, 10, 15), (0.45, 0.3, 0.02, (220, 220, 255))),
    "desert": ((90, 150, 230), (230, 220, 200), (210, 170, 110), (160, 100, 60),
               (0.05, 0.2, 0.03, (255, 250, 230))),
    "room": ((110, 90, 70), (170, 150, 120), (120, 80, 50), (90, 70, 50), (0.9, 0.35, 0.06, (255, 240, 200))),
}


def panorama(name: str, width: int = 512) -> np.ndarray:
    """(width / 2, width, 3) uint8 equirectangular image (v = 0 up): sky, horizon silhouette, ground, sun."""
    top, horizon, ground, hill, (su, sv, sr, sun) = PANORAMAS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    h = width // 2
    v, u = np.mgrid[0:h, 0:width] / np.array([h, width])[:, None, None]
    t = np.clip(v / 0.5, 0, 1)[..., None] ** 1.5
    image = np.array(top, float) * (1 - t) + np.array(horizon, float) * t
    phase = rng.random(3) * 2 * np.pi
    ridge = 0.5 - 0.04 - 0.05 * sum(np.sin(2 * np.pi * k * u[0] + p) / k for k, p in zip((2, 5, 11), phase,
                                                                                          strict=True))
    if name == "room":  # walls to the ceiling with lit windows
        ridge = np.full(width, 0.15)
        window = (np.sin(2 * np.pi * 6 * u) > 0.6) & (v > 0.22) & (v < 0.4)
    else:
        window = np.zeros_like(u, bool)
    image[v > ridge[None, :]] = hill
    texture = _noise(rng, h, width, 64) * 0.6 + _noise(rng, h, width, 8) * 0.4
    below = v > 0.5
    image[below] = np.array(ground, float) * (0.6 + 0.8 * texture[below, None])
    image[window] = (255, 245, 215)
    sun_mask = ((u - su) * 2) ** 2 + (v - sv) ** 2 < sr * sr
    image[sun_mask] = sun
    return np.clip(image, 0, 255).astype(np.uint8)


def photo(index: int, size: int = 384) -> np.ndarray:
    """(size, size, 3) uint8 cluttered scene: a skyline, trees, leaves or tiles (hard edges, saturated)."""
    rng = np.random.default_rng(100 + index)
    y, x = np.mgrid[0:size, 0:size] / size
    kind = index % 4
    image = np.ones((size, size, 3)) * rng.uniform(60, 200, 3)
    if kind == 0:  # skyline: a sky, rectangles with window grids
        t = y[..., None]
        image[:] = np.array([120, 170, 230.0]) * (1 - t) + np.array([220, 200, 180.0]) * t
        for _ in range(14):
            x0, w, top = rng.random(), rng.uniform(0.05, 0.2), rng.uniform(0.2, 0.8)
            block = (x > x0) & (x < x0 + w) & (y > top)
            image[block] = rng.uniform(30, 200, 3)
            image[block & (np.sin(80 * x) > 0.3) & (np.sin(90 * y) > 0.3)] = (250, 230, 120)
    elif kind == 1:  # trees in a meadow
        image[:] = np.where((y < 0.45)[..., None], np.array([150, 200, 240.0]), np.array([70, 140, 50.0]))
        for _ in range(30):
            cx, cy, r = rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.03, 0.12)
            image[(np.abs(x - cx) < r / 5) & (y > cy)] = (70, 45, 25)  # trunk
            image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform([10, 60, 10], [80, 160, 60])
    elif kind == 2:  # leaves: dense high-frequency texture
        image = np.stack([40 + 120 * _noise(rng, size, size, 48), 80 + 150 * _noise(rng, size, size, 64),
                          20 + 60 * _noise(rng, size, size, 32)], axis=-1)
        for _ in range(60):
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.01, 0.04)
            image[((x - cx) / 2) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(120, 255, 3)
    else:  # tiles and a carpet
        tiles = (np.floor(x * rng.integers(6, 14)) + np.floor(y * rng.integers(6, 14))) % 2
        image = np.where(tiles[..., None] > 0, rng.uniform(150, 250, 3), rng.uniform(10, 100, 3))
        carpet = (np.abs(x - 0.5) < 0.25) & (y > 0.55)
        image[carpet] = np.array([170, 30, 40.0]) * (0.7 + 0.3 * np.sin(60 * x[carpet])[:, None])
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_inputs(out: Path, faces: int) -> tuple[Path, Path, Path]:
    """The textured rig, the HDRI folder and the photo folder under OUT (made once)."""
    rig, hdri, photos = out / "rig" / "fox.gltf", out / "scenes" / "hdri", out / "scenes" / "photos"
    if not rig.exists():
        rig.parent.mkdir(parents=True, exist_ok=True)
        _rig(rig.parent, faces)
    for folder, images in ((hdri, {n: panorama(n) for n in PANORAMAS}),
                           (photos, {f"photo{i}": photo(i) for i in range(8)})):
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in images.items():
            if not (folder / f"{name}.png").exists():
                (folder / f"{name}.png").write_bytes(png_bytes(image))
    return rig, hdri, photos


# ---- stages: the real commands, resumable ------------------------------------------------------------


class Stages:
    """Runs named commands (several at once where asked); `OUT/state.json` remembers finished ones."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, batch: dict[str, list[str]], env: dict[str, str] | None = None) -> None:
        todo = {n: c for n, c in batch.items() if self.state.get(n, {}).get("command") != c}
        for name in batch.keys() - todo.keys():
            click.secho(f"{name}: done before ({self.state[name]['seconds']:.0f} s)", fg="green")
        if not todo:
            return
        running = {}
        for name, command in todo.items():
            click.secho(f"{name}: {' '.join(command)}", fg="cyan", bold=True)
            log = (self.path.parent / "logs" / f"{name}.log")
            log.parent.mkdir(exist_ok=True)
            handle = log.open("w")
            running[name] = (subprocess.Popen([_script(command[0]), *command[1:]], stdout=handle,
                                              stderr=subprocess.STDOUT, env=os.environ | (env or {})),
                             handle, time.perf_counter())
        failed = []
        for name, (process, handle, start) in running.items():
            code = process.wait()
            handle.close()
            seconds = time.perf_counter() - start
            click.echo(f"{name}: exit {code} after {seconds:.0f} s (log: logs/{name}.log)")
            if code:
                failed.append(name)
            else:
                self.state[name] = {"command": todo[name], "seconds": round(seconds, 1)}
                atomic_write_text(self.path, json.dumps(self.state, indent=2) + "\n")
        if failed:
            raise click.ClickException(f"{', '.join(failed)} failed: see {self.path.parent / 'logs'}")


def _paired(path_a: Path, path_b: Path) -> dict[str, float]:
    """Per-sample unit-cube layer Chamfer of two evaluations of the same samples: B - A and B's wins."""
    def read(path: Path) -> dict[str, float]:
        with path.open() as f:
            return {row["id"]: float(row["unit_chamfer_layers_sym"]) for row in csv.DictReader(f)}
    a, b = read(path_a), read(path_b)
    ids = sorted(a)
    if sorted(b) != ids:
        raise click.ClickException(f"{path_a} and {path_b} score different samples")
    diff = np.array([b[i] - a[i] for i in ids])
    return {"samples": len(ids), "mean_b_minus_a": float(diff.mean()),
            "stderr": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "share_b_better": float((diff < 0).mean())}


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("applearn_out"),
              show_default=True, help="Folder for the rig, the datasets, runs, predictions and evaluations.")
@click.option("--samples", type=click.IntRange(min=20), default=3000, show_default=True,
              help="Samples of each training set (10% held out: the 'own val' column).")
@click.option("--test-samples", type=click.IntRange(min=4), default=400, show_default=True,
              help="Samples of each test set (half scored, half for the constant baseline).")
@click.option("--steps", type=click.IntRange(min=1), default=2400, show_default=True,
              help="Training steps (configs/demo.yaml: 2400); lr halves every steps/3.")
@click.option("--faces", type=click.IntRange(min=500), default=5000, show_default=True)
@click.option("--image-size", type=click.IntRange(32, 4096), default=128, show_default=True)
@click.option("--resolution", type=click.IntRange(16, 4096), default=32, show_default=True)
@click.option("--layers", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Training sets' seed.")
@click.option("--test-seed", type=click.IntRange(min=0), default=1, show_default=True,
              help="Test sets' seed.")
@click.option("--dry-run", is_flag=True, help="Print the commands, run nothing.")
def main(out: Path, samples: int, test_samples: int, steps: int, faces: int, image_size: int, resolution: int,
         layers: int, seed: int, test_seed: int, dry_run: bool) -> None:
    out = out.resolve()
    rig, hdri, photos = out / "rig" / "fox.gltf", out / "scenes" / "hdri", out / "scenes" / "photos"
    common = ["--mesh", str(rig), "--num-models", "1", "--image-size", str(image_size), "--workers", "2"]
    synth = {
        f"synth-{name}": ["dualpm-prep", "synth", str(out / name / "source"), *common, "--num-samples",
                          str(samples), "--seed", str(seed), "--appearance", name] for name in TRAININGS
    } | {
        f"synth-{name}": ["dualpm-prep", "synth", str(out / name / "source"), *common, "--num-samples",
                          str(test_samples), "--seed", str(test_seed), "--val-fraction", "0.5",
                          "--appearance", "asset", f"--{'hdri' if name == 'hdri' else 'backgrounds'}",
                          str(folder)]
        for name, folder in (("hdri", hdri), ("photos", photos))
    }
    sets = (*TRAININGS, *TESTS)
    render = {f"render-{s}": ["dualpm-prep", "render", str(out / s / "source"), str(out / s / "data"),
                              "--resolution", str(resolution), "--layers", str(layers), "--shard-size", "64"]
              for s in sets}
    features = {f"features-{s}": ["dualpm-prep", "features", str(out / s / "source"), str(out / s / "data"),
                                  "--extractor", "rgb", "--device", "cpu", "--grid", str(resolution)]
                for s in sets}
    train = {f"train-{t}": ["dualpm-train", str(DEFAULT_CONFIG), "--data", str(out / t / "data"), "--out",
                            str(out / "runs" / t), "--set", f"model.num_layers={layers}", "--set",
                            f"train.steps={steps}", "--set", f"train.lr_step={max(1, steps // 3)}",
                            "--resume", "auto"] for t in TRAININGS}
    infer_eval: dict[str, dict[str, list[str]]] = {t: {} for t in TRAININGS}
    for t in TRAININGS:
        for s in (t, *TESTS):
            pred, evaluation = out / "pred" / f"{t}-on-{s}", out / "eval" / f"{t}-on-{s}"
            infer_eval[t][f"infer-{t}-on-{s}"] = [
                "dualpm-infer", "--checkpoint", str(out / "runs" / t), "--data", str(out / s / "data"),
                "--split", "val", "--out", str(pred), "--device", "cpu", "--no-ply", "--no-sheets",
                "--overwrite"]
            infer_eval[t][f"eval-{t}-on-{s}"] = [
                "dualpm-eval", "--pred", str(pred), "--data", str(out / s / "data"), "--baseline", "--out",
                str(evaluation)]
    if dry_run:
        for batch in (synth, render, features, train, *infer_eval.values()):
            for name, command in batch.items():
                click.echo(f"{name}: {' '.join(command)}")
        return
    out.mkdir(parents=True, exist_ok=True)
    make_inputs(out, faces)
    stages = Stages(out)
    start = time.perf_counter()
    for batch in (synth, render, features):
        for name, command in batch.items():
            stages.run({name: command})
    stages.run(train, ONE_THREAD)  # both at once, one thread each (2 cores)
    # infer and eval: the two models' chains side by side, stage by stage
    for k in range(len(infer_eval[TRAININGS[0]])):
        stages.run({n: c for t in TRAININGS for n, c in [list(infer_eval[t].items())[k]]}, ONE_THREAD)
    results = report(out, samples, test_samples, steps)
    results["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    click.echo(f"results: {out / 'results.json'}")


def report(out: Path, samples: int, test_samples: int, steps: int) -> dict:
    """Print the table of ratios (and model / baseline Chamfer) and return it with the paired comparison."""
    results: dict = {"samples": samples, "test_samples": test_samples, "steps": steps, "ratios": {},
                     "paired": {}}
    click.echo(f"\n{samples} training samples, {steps} steps; "
               "model / baseline unit-cube Chamfer (layers, sym.)")
    click.echo(f"{'trained on':>12} | {'own val':>22} | " + " | ".join(f"{'test ' + s:>22}" for s in TESTS))
    for t in TRAININGS:
        cells, row = [], {}
        for s in (t, *TESTS):
            summary = json.loads((out / "eval" / f"{t}-on-{s}" / "summary.json").read_text())
            ratio = summary["chamfer_ratio_model_over_baseline"]
            model, base = (summary[k]["unit_chamfer_layers_sym"] for k in ("model", "baseline"))
            row["own val" if s == t else s] = {"ratio": ratio, "model": model, "baseline": base,
                                               "samples": summary["config"]["samples"]}
            cells.append(f"{ratio:.3f} ({model:.4f}/{base:.4f})")
        results["ratios"][t] = row
        click.echo(f"{t:>12} | " + " | ".join(f"{c:>22}" for c in cells))
    for s in TESTS:
        paired = _paired(*(out / "eval" / f"{t}-on-{s}" / "metrics.csv" for t in TRAININGS))
        results["paired"][s] = paired
        click.echo(f"test {s}: asset - procedural Chamfer per sample {paired['mean_b_minus_a']:+.4f} "
                   f"+- {paired['stderr']:.4f} (s.e.), asset better on {100 * paired['share_b_better']:.0f}% "
                   f"of {paired['samples']}")
    return results


if __name__ == "__main__":
    main()
