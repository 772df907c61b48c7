"""dualpm.cliutils: the benchmark log writer and the machine description."""

from __future__ import annotations

import os
import subprocess

from dualpm.cliutils import describe_machine, record_benchmark


def test_record_benchmark_creates_then_appends_to_its_own_section_only(tmp_path):
    log = tmp_path / "benchmarks.md"
    record_benchmark(log, "Synth", "| 1 | a |", intro="| n | x |\n|---|---|")
    record_benchmark(log, "Render", "- first run")
    record_benchmark(log, "Synth", "| 2 | b |")  # a row after a row continues the table
    record_benchmark(log, "Render", "- second run\n\n| t |\n|---|\n| 3 |")  # an item after an item continues the list
    record_benchmark(log, "Render", "plain words")  # anything else: a blank line first
    assert log.read_text() == (
        "# Benchmarks\n\n"
        "## Synth\n\n| n | x |\n|---|---|\n| 1 | a |\n| 2 | b |\n\n"
        "## Render\n\n- first run\n- second run\n\n| t |\n|---|\n| 3 |\n\nplain words\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # no temporary file left behind


def test_record_benchmark_keeps_what_is_already_there(tmp_path):
    log = tmp_path / "benchmarks.md"
    log.write_text("# Benchmarks\n\nSome notes.\n\n## Render pipeline\n\n- old\n")
    record_benchmark(log, "Render", "- new")  # "Render" is not "Render pipeline"
    assert log.read_text() == "# Benchmarks\n\nSome notes.\n\n## Render pipeline\n\n- old\n\n## Render\n\n- new\n"


def test_describe_machine_names_the_cpu_and_the_cores():
    # coreutils' nproc counts the CPUs this process may use (the affinity mask), as a benchmark sees them;
    # it also honours OMP_NUM_THREADS / OMP_THREAD_LIMIT, which describe no hardware: left out.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    cores = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True, env=env).stdout)
    text = describe_machine()
    assert f", {cores} cores" in text
    models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    if models:  # Linux on x86 and most ARM servers
        assert text.startswith(models[0] + ", ")


def test_renamed_spellings_are_one_line_naming_the_new_one(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main as prep_main

    cases = [
        (["synth", str(tmp_path / "a"), "--no-yaw"], "--yaw/--no-yaw is now --random-yaw/--no-random-yaw"),
        (["synth", str(tmp_path / "a"), "--yaw"], "--yaw/--no-yaw is now --random-yaw/--no-random-yaw"),
        (["render", str(tmp_path), str(tmp_path / "b"), "--precision", "float32"], "--precision is now --store-dtype"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(prep_main, args)
        assert result.exit_code == 2 and words in result.output, result.output
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything ran
