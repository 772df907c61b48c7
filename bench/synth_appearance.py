"""Synth speed with a rig's own texture and shadows, against the procedural coat in the same run.

    PYTHONPATH=. .venv/bin/python bench/synth_appearance.py --samples 16 --picture docs/appearance.png

A procedural quadruped (`--faces` triangles) is saved as a user rig with TEXCOORD_0 (a spherical
projection of its rest shape), a 512 x 512 texture (stripes, a white belly: made here), and a clip.
One core, in process (no Ray), `make_sample` per sample (pose, skin, frame, render, shade, write five
files) at `--image-size`, the four looks in turn sample by sample: samples per second of this
process's CPU time (wall-clock rates are printed too; on a shared machine they mostly measure the
other processes) for --appearance procedural, asset (2-3 lights, the key light's shadows by Embree
occlusion rays, mip-mapped texture), asset + HDRI and asset + photo backgrounds (a small procedural
sky panorama and a procedural "photo", made here), and the ratio of each to the procedural path.
`--picture`: the same rig, pose and camera in the four looks side by side (the README picture).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualpm.cliutils import describe_machine, record_benchmark  # noqa: E402
from pipeline.synth.generate import SynthConfig, _model_state, build_model, make_plan, make_sample  # noqa: E402
from pipeline.synth.generate import prepare_output  # noqa: E402
from pipeline.synth.quadruped import make_quadruped  # noqa: E402
from tests.rigs import png_bytes, texture_rig  # noqa: E402

TARGET_PER_CORE = 20.0


def _texture(size: int = 512) -> np.ndarray:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.array([200, 110, 40.0])
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (12 * x + 2 * np.sin(6 * np.pi * y)))
    image = base * (0.55 + 0.45 * stripes[..., None])
    image[y > 0.75] = (235, 230, 220)  # belly
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _sky(width: int = 256) -> np.ndarray:
    h = width // 2
    v = np.linspace(0, 1, h)[:, None, None]
    top = np.array([70, 120, 230.0]) * (1 - v) + np.array([230, 235, 250.0]) * v
    ground = np.array([70, 95, 40.0])
    image = np.where(v < 0.5, top, ground) * np.ones((1, width, 1))
    u = np.linspace(0, 1, width)
    image[int(0.2 * h) : int(0.26 * h), (u > 0.3) & (u < 0.33)] = 255  # a small sun
    return image.astype(np.uint8)


def _photo(size: int = 320) -> np.ndarray:
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([90 + 60 * x, 120 + 50 * y, 70 + 30 * np.sin(9 * x * y)], axis=-1)
    for _ in range(25):  # "trees"
        cx, cy, r = rng.random(), rng.random() * 0.6, rng.uniform(0.03, 0.1)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(20, 90, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _rig(folder: Path, faces: int) -> Path:
    mesh = make_quadruped("fox", np.random.default_rng(7), faces)
    v = mesh.vertices - mesh.vertices.mean(0)
    uv = np.stack([0.5 + np.arctan2(v[:, 0], v[:, 2]) / (2 * np.pi), np.arccos(np.clip(
        v[:, 1] / np.linalg.norm(v, axis=1).clip(1e-9), -1, 1)) / np.pi], axis=1)
    neck = next(i for i, n in enumerate(mesh.node_names) if "neck" in n.lower())
    return texture_rig(folder / "fox.gltf", mesh, uv, _texture(), neck)


def _prepare(root: Path, config: SynthConfig):
    plan = make_plan(config)
    prepare_output(root, config, plan, False)
    build_model(root, config, plan.models[0], False)
    return root, config, plan, _model_state(root, config, plan.models[0])


def _time(runs: dict, count: int) -> dict[str, tuple[float, float, list[np.ndarray]]]:
    """Samples/s (wall, CPU) of every run, timed sample by sample in turn so load changes hit all alike."""
    wall, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    for k in range(count + 1):  # sample 0: warm-up, not timed
        for name, (root, config, plan, state) in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            make_sample(root, config, plan.models[0], state, plan.samples[k], "cpu")
            if k:
                wall[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - start_cpu
    out = {}
    for name, (root, _, plan, _) in runs.items():
        images = [np.asarray(Image.open(root / "renders" / f"{s.id}_rgb.png")) for s in plan.samples[:3]]
        out[name] = (count / wall[name], count / cpu[name], images)
    return out


@click.command()
@click.option("--samples", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--image-size", type=click.IntRange(8, 4096), default=256, show_default=True)
@click.option("--faces", type=click.IntRange(min=500), default=20000, show_default=True)
@click.option("--picture", type=click.Path(dir_okay=False), default="", help="Write the 3-look picture here.")
@click.option("--append", "append_to", type=click.Path(dir_okay=False), default="docs/benchmarks.md",
              show_default=True, help="Markdown file to append the result line to ('' for none).")
def main(samples: int, image_size: int, faces: int, picture: str, append_to: str) -> None:
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "user").mkdir()
        rig = _rig(tmp / "user", faces)
        for name, image in (("hdri", _sky()), ("photos", _photo())):
            (tmp / name).mkdir()
            (tmp / name / f"{name}.png").write_bytes(png_bytes(image))
        common = dict(num_samples=samples + 1, num_models=1, image_size=image_size, backend="cpu",
                      meshes=(rig,), poses="random", seed=4)
        configs = {
            "procedural": SynthConfig(appearance="procedural", **common),
            "asset": SynthConfig(appearance="asset", **common),
            "asset + HDRI": SynthConfig(appearance="asset", hdri=tmp / "hdri", **common),
            "asset + photos": SynthConfig(appearance="asset", backgrounds=tmp / "photos", **common),
        }
        runs = {name: _prepare(tmp / f"run{i}", config) for i, (name, config) in enumerate(configs.items())}
        results = _time(runs, samples)
    base = results["procedural"][1]
    for name, (rate, cpu_rate, _) in results.items():
        click.echo(f"{name:>15}: {cpu_rate:5.1f} samples per CPU second ({cpu_rate / base:.2f} x procedural, "
                   f"{cpu_rate / TARGET_PER_CORE:.2f} x the {TARGET_PER_CORE:g}/s/core target); wall clock "
                   f"{rate:.1f}/s")
    load = os.getloadavg()[0]
    click.echo(f"load average before/after: {load_before:.1f}/{load:.1f}")
    if picture:
        tiles = [results[n][2][1] for n in ("procedural", "asset", "asset + HDRI", "asset + photos")]
        Path(picture).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(tiles, axis=1)).save(picture)
        click.echo(f"picture: {picture}")
    if append_to:
        cells = " | ".join(f"{results[n][1]:.1f} ({results[n][1] / base:.2f})" for n in results)
        line = (f"| {time.strftime('%Y-%m-%d')} | {describe_machine()} | {image_size} px, {faces} faces, "
                f"{samples} samples | {cells} | {load_before:.1f}/{load:.1f} |")
        record_benchmark(append_to, HEADER, line, intro=COLUMNS)


HEADER = "dualpm-prep synth with the rig's own look (samples/s on one core; target 20 at 256 px)"
COLUMNS = ("`bench/synth_appearance.py`: one core in process, a textured 20k-face rig; samples per second of "
           "the process's CPU time (robust on a shared machine), in brackets the ratio to the procedural coat "
           "of the same run. Shadows: Embree occlusion rays towards the key light.\n\n"
           "| date | cpu | size | procedural | asset | asset + HDRI | asset + photos | load avg |\n"
           "|---|---|---|---:|---:|---:|---:|---|\n")


if __name__ == "__main__":
    main()
