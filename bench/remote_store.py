"""Reader samples/s from a loopback S3 server vs from local disk, on the same store, in one run.

    .venv/bin/python bench/remote_store.py                          # a synthetic store (tests/test_reader.py)
    .venv/bin/python bench/remote_store.py --data /work/demo_out/data --samples 768
    .venv/bin/python bench/remote_store.py --append ''              # print only

The store is uploaded to moto's S3 server (tests/remote_servers.py), which runs with a fault-injecting
proxy in a child process (so neither competes with the reader for this process's interpreter), all on
127.0.0.1. Three readers, each the training `ShardStream` over one epoch of the train split (decoding
every sample; loader workers 0, so the remote reads overlap with decoding through the store's own fetch
threads), with the default settings (`RemoteOptions`):

* local: the folder;
* s3: `s3://bench/store` straight to the server;
* s3 + faults: through the proxy, which fails `--fail-rate` of the GETs (503, 429 or a body cut halfway).

Printed: samples/s of each once the dataset is open (best of `--repeats`; the seconds `open_dataset` took,
its manifest, metadata and probe fetches, separately), the ratios to local (targets >= 0.70 and >= 0.50), requests
per sample (retries included), and whether each remote epoch gave exactly the local one's samples (ids and
decoded bytes). A dated entry goes to docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
HEADING = "Remote stores: reader from loopback S3 vs local disk (`bench/remote_store.py`)"
TARGET_S3, TARGET_FAULTS = 0.70, 0.50


def _serve(folder: str, fail_rate: float, ready, stop, counts) -> None:
    """Child process: moto S3 + the store uploaded + a fault proxy; reports (endpoint, proxy URL)."""
    from remote_servers import FaultProxy, moto_s3, upload_folder

    with moto_s3("bench") as endpoint:
        upload_folder(Path(folder), "bench", "store", endpoint)
        with FaultProxy(endpoint, fail_rate=fail_rate, seed=1) as proxy:
            ready.put((endpoint, proxy.url))
            stop.wait()
            counts.put(dict(proxy.counts))


def _epoch(location: str, env: dict[str, str]) -> tuple[float, int, str, int, float]:
    """(seconds, samples, digest of ids + decoded tensors, requests, seconds to open) of one train epoch;
    seconds count from the opened dataset (the steady state a training run sees)."""
    from dualpm.data.reader import ShardStream, open_dataset

    os.environ.update(env)
    begin = time.perf_counter()
    info = open_dataset(location)
    start = time.perf_counter()
    stream = ShardStream(info, "train", info.stored_layers, info.resolution, seed=0, infinite=False)
    digest, samples = hashlib.sha256(), 0
    for sample in stream:
        digest.update(sample["id"].encode())
        for name in ("features", "target", "mask"):
            digest.update(sample[name].numpy().tobytes())
        samples += 1
    seconds = time.perf_counter() - start
    requests = info.store.remote.counters.requests if info.store.is_remote else 0
    return seconds, samples, digest.hexdigest(), requests, start - begin


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A prepared store (default: a synthetic one in a temp folder).")
@click.option("--samples", type=click.IntRange(min=64), default=512, show_default=True,
              help="Synthetic store: train samples (64 per shard).")
@click.option("--fail-rate", type=click.FloatRange(0, 0.9), default=0.1, show_default=True,
              help="Fraction of GETs the proxy fails.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--append", default=str(REPO / "docs" / "benchmarks.md"), show_default=True,
              help="Markdown log to append to ('' = print only).")
def main(data: Path | None, samples: int, fail_rate: float, repeats: int, append: str) -> None:
    """Reader samples/s: local disk vs loopback S3 vs loopback S3 with failing requests."""
    from dualpm.cliutils import describe_machine, record_benchmark

    label = f"store {data}"
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            label = f"synthetic Zarr store ({samples} train samples, 64 per shard, 96x96 maps, 32x48x48 features)"
            from test_reader import write_store

            data = write_store(Path(tmp) / "store", n_train=samples, n_val=64, shard_size=64, size=96,
                               channels=32, grid=48, formats=("zarr", "zarr"))
        context = multiprocessing.get_context("spawn")
        ready, counts, stop = context.Queue(), context.Queue(), context.Event()
        server = context.Process(target=_serve, args=(str(data), fail_rate, ready, stop, counts), daemon=True)
        server.start()
        endpoint, proxy = ready.get(timeout=600)
        aws = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
        runs = {"local": (str(data), {}), "s3": ("s3://bench/store", {**aws, "AWS_ENDPOINT_URL": endpoint}),
                "s3 + faults": ("s3://bench/store", {**aws, "AWS_ENDPOINT_URL": proxy})}
        best: dict[str, tuple[float, int, str, int, float]] = {}
        for _ in range(repeats):
            for name, (location, env) in runs.items():
                result = _epoch(location, env)
                if name not in best or result[0] < best[name][0]:
                    best[name] = result
        stop.set()
        injected = counts.get(timeout=60)
        server.join(timeout=60)
    local_rate = best["local"][1] / best["local"][0]
    lines = []
    for name, (seconds, n, digest, requests, opening) in best.items():
        rate = n / seconds
        same = "same samples as local" if digest == best["local"][2] and n == best["local"][1] else "DIFFERENT"
        extra = f", {requests / n:.3f} requests/sample, {same}" if name != "local" else ""
        lines.append(f"{name}: {rate:.1f} samples/s ({n} samples), {rate / local_rate:.2f} of local, "
                     f"opening the dataset {opening:.2f} s{extra}")
        print(lines[-1])
    faults = sum(v for k, v in injected.items() if k in ("503", "429", "drop"))
    print(f"proxy: {injected.get('requests', 0)} requests, {faults} failed on purpose")
    ok_s3 = best["s3"][1] / best["s3"][0] / local_rate >= TARGET_S3
    ok_faults = best["s3 + faults"][1] / best["s3 + faults"][0] / local_rate >= TARGET_FAULTS
    print(f"targets: s3 >= {TARGET_S3:.0%} of local: {'met' if ok_s3 else 'MISSED'}; with {fail_rate:.0%} of "
          f"requests failing >= {TARGET_FAULTS:.0%}: {'met' if ok_faults else 'MISSED'}")
    if append:
        day = datetime.date.today().isoformat()
        entry = (f"- {day}, {describe_machine()} (shared with other work), {label}"
                 f" store, best of {repeats}: " + "; ".join(lines) + f"; proxy failed {faults} of "
                 f"{injected.get('requests', 0)} requests on purpose.")
        record_benchmark(append, HEADING, entry)


if __name__ == "__main__":
    main()
