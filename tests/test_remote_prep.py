"""`dualpm-prep render` / `features` writing OUT to object storage (moto's S3 server on 127.0.0.1).

The commands run as real processes (each with its own local Ray, whose workers inherit the S3 endpoint
of the test server); the reference is a local prep of the same source, compared object by object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from datagen import make_source_dataset  # noqa: E402
from remote_servers import moto_s3  # noqa: E402

REPO = Path(__file__).parents[1]
BUCKET = "dualpm-prep"
FAST = {"DUALPM_REMOTE_BACKOFF": "0.01", "DUALPM_REMOTE_MAX_DELAY": "0.05", "DUALPM_REMOTE_TIMEOUT": "5"}
RENDER = ["--resolution", "32", "--layers", "4", "--shard-size", "4", "--workers", "1", "--backend", "cpu"]


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the tests'
    return env | FAST | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _prep(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-3000:]
    return done


def _objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            key = item["Key"]
            found[key[len(prefix) + 1:]] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return found


def _data_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def _shard_data(files: dict[str, bytes]) -> dict[str, bytes]:
    """The shard data and records of a store's files (not configs, manifest, failures)."""
    return {k: v for k, v in files.items() if "/" in k and not k.startswith((".", "records/")) and "/c/" in k
            or k.endswith(".tar") or k.startswith("records/")}


_SCRIPT = """
import sys, ray
from click.testing import CliRunner
from pipeline.cli import main
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
for line in sys.stdin.read().splitlines():  # one command per line, arguments tab-separated, one Ray for all
    result = CliRunner().invoke(main, line.split("\\t"), catch_exceptions=False)
    print(result.output, flush=True)
    if result.exit_code:
        sys.exit(result.exit_code)
"""


def _prep_all(*commands: list[str]) -> str:
    """Run prep commands in one process with its own local Ray (workers inherit the S3 endpoint)."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=_env(), text=True, timeout=300,
                          input="\n".join("\t".join(c) for c in commands), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


@pytest.mark.slow  # ~80 s (two preps in subprocesses, each starting Ray); the kill/rerun test below covers
# writing to S3 and verify from it in the default run
def test_render_and_features_to_s3_equal_a_local_prep_and_verify_from_s3(tmp_path, s3, ray_local):
    from pipeline.cli import main
    from pipeline.store_commands import verify

    ds = make_source_dataset(tmp_path / "src", num_samples=10, models=1, image_size=32)
    commands: dict[bool, list[list[str]]] = {False: [], True: []}
    for fmt in ("webdataset", "zarr"):
        for remote, out in ((False, str(tmp_path / fmt)), (True, f"s3://{BUCKET}/both-{fmt}")):
            stage = ["--stage", str(tmp_path / f"stage-{fmt}")] if remote else []
            commands[remote] += [["render", str(ds.root), out, *RENDER, "--format", fmt, *stage],
                                 ["features", str(ds.root), out, "--extractor", "rgb", "--grid", "8", "--format",
                                  fmt, "--workers", "1", *stage]]
    for command in commands[False]:  # the local references on the tests' Ray
        result = CliRunner().invoke(main, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    _prep_all(*commands[True])
    for fmt in ("webdataset", "zarr"):
        url, local = f"s3://{BUCKET}/both-{fmt}", tmp_path / fmt
        remote, ours = _objects(s3, f"both-{fmt}"), _data_files(local)
        assert ".writer.lock" not in remote  # dropped at the end
        staged = _data_files(tmp_path / f"stage-{fmt}")
        assert not [k for k in staged if k.endswith(".tar") or "/c/" in k and not k.startswith("ids/")]  # uploaded, gone
        assert _shard_data(remote) == _shard_data(ours) and len(_shard_data(ours)) >= 2 * 3 * 2
        assert json.loads(remote["manifest.json"])["columns"] == json.loads(ours["manifest.json"])["columns"]
        assert {k for k in remote if not k.startswith(("render/", "features/", "records/"))} == \
            {k for k in ours if not k.startswith(("render/", "features/", "records/"))}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in FAST.items():
                mp.setenv(key, value)
            result = CliRunner().invoke(verify, [url])
        assert result.exit_code == 0, result.output
        assert f"{url}: OK" in result.output and "render: 3 shards, 10 samples, 0 failed" in result.output


def test_a_killed_upload_run_rerun_has_every_shard_once_and_the_manifest_only_at_the_end(tmp_path, s3):
    from pipeline.store_commands import verify

    ds = make_source_dataset(tmp_path / "src", num_samples=24, models=2, image_size=32)
    url, prefix = f"s3://{BUCKET}/killed", "killed"
    args = [sys.executable, "-m", "pipeline.cli", "render", str(ds.root), url, *RENDER, "--format", "zarr",
            "--resolution", "96", "--layers", "8", "--stage", str(tmp_path / "stage")]
    run = subprocess.Popen(args, cwd=REPO, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not any(k.startswith("records/") for k in _objects(s3, prefix)):
            assert run.poll() is None, run.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard uploaded in time"
            time.sleep(0.05)
        assert "manifest.json" not in _objects(s3, prefix)  # mid-run: shards are there, the manifest is not
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the command and its Ray (its own session)
        run.wait()
        run.stderr.close()
    before = _objects(s3, prefix)
    records = [k for k in before if k.startswith("records/render/")]
    assert 1 <= len(records) < 6, "the run must be killed partway"
    assert "manifest.json" not in before and ".writer.lock" in before
    assert (tmp_path / "stage" / ".remote-out.json").exists()

    rerun = _prep(*args[3:])
    assert "shards done, " in rerun.stdout
    done = int(rerun.stdout.split(" shards done, ")[0].rsplit(" ", 1)[1])
    kept = int(rerun.stdout.split(" shards done, ")[1].split(" already complete")[0])
    assert kept >= len(records) and done + kept == 6, rerun.stdout  # nothing complete is redone
    after = _objects(s3, prefix)
    for key in records:  # shards complete before the kill were not rewritten
        assert after[key] == before[key]
    manifest = json.loads(after["manifest.json"])
    ids = [i for r in manifest["columns"]["render"]["shards"].values() for i in r["ids"]]
    assert sorted(ids) == sorted(ds.ids) and len(ids) == len(set(ids))
    assert ".writer.lock" not in after
    result = CliRunner().invoke(verify, [url])
    assert result.exit_code == 0, result.output


def test_a_live_writer_lock_refuses_a_second_command_and_http_out_is_refused(tmp_path, s3):
    import boto3

    from pipeline.cli import main

    ds = make_source_dataset(tmp_path / "src", num_samples=4, models=1, image_size=32)
    holder = {"host": "elsewhere", "pid": 1, "time": time.time()}
    boto3.client("s3", endpoint_url=s3).put_object(Bucket=BUCKET, Key="locked/.writer.lock",
                                                   Body=json.dumps(holder).encode())
    result = CliRunner().invoke(main, ["render", str(ds.root), f"s3://{BUCKET}/locked", *RENDER])
    assert result.exit_code != 0 and "another command is writing this store (elsewhere pid 1)" in result.output
    assert set(_objects(s3, "locked")) == {".writer.lock"}
    precious = tmp_path / "precious"
    (precious / "keep.txt").parent.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["render", str(ds.root), f"s3://{BUCKET}/fresh", *RENDER, "--stage", str(precious)])
    assert result.exit_code != 0 and "not empty and not a staging folder of dualpm-prep" in result.output
    assert (precious / "keep.txt").read_text() == "mine" and _objects(s3, "fresh") == {}  # its lock dropped
    result = CliRunner().invoke(main, ["render", str(ds.root), "http://127.0.0.1:9/out", *RENDER])
    assert result.exit_code == 2 and "an HTTP server cannot be written" in result.output


def test_stage_is_refused_for_a_local_out(tmp_path):
    from pipeline.cli import main

    ds = make_source_dataset(tmp_path / "src", num_samples=4, models=1, image_size=32)
    result = CliRunner().invoke(main, ["render", str(ds.root), str(tmp_path / "out"), "--stage", str(tmp_path / "s")])
    assert result.exit_code != 0 and "--stage applies only to an OUT on object storage" in result.output


def test_redoing_shards_removes_the_manifest_and_only_those_shards_from_the_store(tmp_path, s3):
    import boto3

    from pipeline.remote_out import ENV_RUN, ENV_URL, RemoteOut

    client = boto3.client("s3", endpoint_url=s3)
    keys = ["manifest.json", "render.config.yaml", "render/zarr.json", "render/dpm/values/zarr.json",
            "render/dpm/values/c/0/0/0", "render/valid/c/0", "records/render/shard-000000.json",
            "render/dpm/values/c/1/0/0", "render/valid/c/1", "records/render/shard-000001.json",
            "render/shard-000001.tar", "features/shard-000001.tar"]
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=f"redo/{key}", Body=b"{}" if key.endswith(".json") else b"x")
    out = RemoteOut(f"s3://{BUCKET}/redo", tmp_path / "stage")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (FAST | {ENV_URL: "", ENV_RUN: ""}).items():  # restored afterwards (open sets them)
            mp.setenv(key, value)
        stage = out.open("test", lock=False)
        assert {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()} == {
            ".remote-out.json", "manifest.json", "render.config.yaml", "render/zarr.json",
            "render/dpm/values/zarr.json", "records/render/shard-000000.json", "records/render/shard-000001.json"}
        out.prepared("render", [1])
    left = set(_objects(s3, "redo"))
    assert left == set(keys) - {"manifest.json", "render/dpm/values/c/1/0/0", "render/valid/c/1",
                                "records/render/shard-000001.json", "render/shard-000001.tar"}


def test_a_worker_on_another_node_pulls_the_layout_but_no_records(tmp_path, s3, monkeypatch):
    import boto3

    from pipeline.remote_out import ENV_RUN, ENV_URL, MARKER, pull_layout

    client = boto3.client("s3", endpoint_url=s3)
    for key in ["render/zarr.json", "render/valid/zarr.json", "render/valid/c/0", "records/render/shard-000000.json",
                "basis.npz", ".writer.lock"]:
        client.put_object(Bucket=BUCKET, Key=f"node/{key}", Body=b"x")
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_URL, f"s3://{BUCKET}/node")
    monkeypatch.setenv(ENV_RUN, "run 1")
    column = tmp_path / "stage" / "render"  # this node has no stage yet
    pull_layout(column)
    stage = column.parent
    assert {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()} == {
        MARKER, "render/zarr.json", "render/valid/zarr.json", "basis.npz"}
    (stage / "basis.npz").write_bytes(b"local")
    pull_layout(column)  # a node already pulled for this run: nothing is fetched again
    assert (stage / "basis.npz").read_bytes() == b"local"
    (stage / "render" / "old-array").mkdir()
    monkeypatch.setenv(ENV_RUN, "a later run")
    pull_layout(column)  # the stage of an earlier run on this node: emptied, pulled again
    assert (stage / "basis.npz").read_bytes() == b"x" and not (stage / "render" / "old-array").exists()
    assert json.loads((stage / MARKER).read_text())["run"] == "a later run"
