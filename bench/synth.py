"""Synthetic data speed: samples/s of `dualpm-prep synth` (target: 20 samples/s per core at 256 x 256).

    PYTHONPATH=. .venv/bin/python bench/synth.py                       # 2 models, 20k faces, 256 px
    PYTHONPATH=. .venv/bin/python bench/synth.py --samples 400 --append docs/benchmarks.md

Three numbers: the time to build one procedural animal (marching cubes + decimation, amortised over
its samples), samples/s of the per-sample work in this process on one core (pose, skin, frame,
render, shade, write five files), and samples/s of the sample phase of a Ray run over `--workers`
cores (on a folder whose models already exist; Ray start-up excluded), with the ratio to the target
per core. The load average is printed too: on a shared machine other processes lower the numbers.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from dualpm.cliutils import describe_machine, record_benchmark
from pipeline.synth.generate import (
    SynthConfig,
    _model_state,
    build_model,
    generate,
    make_plan,
    make_sample,
    prepare_output,
)
from pipeline.synth.quadruped import make_quadruped

TARGET_PER_CORE = 20.0
DEFAULT_LOG = "docs/benchmarks.md"


@click.command()
@click.option("--samples", type=click.IntRange(min=1), default=200, show_default=True,
              help="Samples of the Ray run.")
@click.option("--single", type=click.IntRange(min=1), default=40, show_default=True,
              help="Samples timed in this process.")
@click.option("--image-size", type=click.IntRange(8, 4096), default=256, show_default=True)
@click.option("--faces", type=click.IntRange(min=500), default=20000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="all CPUs")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--append", "append_to", type=click.Path(dir_okay=False), default=DEFAULT_LOG,
              show_default=True,
              help="Markdown file to append the result line to ('' for none).")
def main(samples: int, single: int, image_size: int, faces: int, workers: int | None, backend: str,
         append_to: str) -> None:
    from dualpm.render.embree import default_workers

    load_before = os.getloadavg()[0]
    workers = workers or default_workers()
    config = SynthConfig(num_samples=samples, num_models=2, image_size=image_size, faces=faces,
                         backend=backend)
    plan = make_plan(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        start = time.perf_counter()
        make_quadruped("timing", np.random.default_rng(0), faces)
        model_s = time.perf_counter() - start
        prepare_output(root, config, plan, overwrite=False)
        for model in plan.models:
            build_model(root, config, model, overwrite=False)

        # One core, no Ray: the per-sample work alone.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        state = _model_state(root, config, plan.models[0])
        specs = [s for s in plan.samples if s.model == 0][: single + 1]
        make_sample(Path(tmp) / "single", config, plan.models[0], state, specs[0], backend)  # warm-up
        start = time.perf_counter()
        for spec in specs[1:]:
            make_sample(Path(tmp) / "single", config, plan.models[0], state, spec, backend)
        single_rate = (len(specs) - 1) / (time.perf_counter() - start)
        torch.set_num_threads(threads)

        summary = generate(root, config, plan, workers=workers)
        ray_rate = summary.rate  # the sample phase (Ray start-up excluded)

    per_core = ray_rate / workers
    line = (f"| {time.strftime('%Y-%m-%d')} | {describe_machine()} | {backend} | {image_size} px, "
            f"{faces} faces | {model_s:.2f} s | {single_rate:.1f} | {workers} | {ray_rate:.1f} | "
            f"{per_core:.1f} | {per_core / TARGET_PER_CORE:.2f} | {os.getloadavg()[0]:.1f} |")
    click.echo(f"model build: {model_s:.2f} s/model")
    click.echo(f"one core, in process: {single_rate:.1f} samples/s "
               f"({single_rate / TARGET_PER_CORE:.2f} x target)")
    click.echo(f"Ray, {workers} workers, {summary.written} samples: {ray_rate:.1f} samples/s "
               f"= {per_core:.1f} per core ({per_core / TARGET_PER_CORE:.2f} x the "
               f"{TARGET_PER_CORE:g}/s/core target); {summary.seconds:.1f} s with Ray start-up")
    load = os.getloadavg()[0]
    click.echo(f"load average before/after: {load_before:.1f}/{load:.1f} on {os.cpu_count()} CPUs "
               "(other processes make these numbers lower)")
    if append_to:
        record_benchmark(append_to, HEADER, line, intro=COLUMNS)
        click.echo(f"appended to {append_to}")


HEADER = "dualpm-prep synth (samples/s; target 20 per core at 256 px)"
COLUMNS = ("| date | cpu | backend | size | model build | 1 core in-process | Ray workers | Ray samples/s "
           "| per core | x target | load avg |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")


if __name__ == "__main__":
    main()
