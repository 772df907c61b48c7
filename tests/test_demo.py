"""dualpm-demo: settings, resume state, and the whole pipeline end to end on a tiny configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from dualpm.eval.summary import RATIO_KEY
from pipeline.demo import main
from pipeline.demo_config import DEFAULT_CONFIG, LEARNING_BAR, STATE_NAME

DEMO = [sys.executable, "-m", "pipeline.demo"]
TINY = ["--samples", "24", "--models", "1", "--image-size", "32", "--faces", "600", "--resolution", "16",
        "--layers", "2", "--sequence-frames", "4"]
STAGES = ("synth", "render", "features", "train", "infer", "eval", "sequence", "sequence-render",
          "sequence-features", "sequence-infer", "animate")


def invoke(*args: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env or {"DUALPM_SD_MODEL": "",
                                                                          "DUALPM_DINO_MODEL": ""})
    return result.exit_code, result.output


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    code, output = invoke("--out", tmp_path / "demo", "--dry-run", *TINY)
    assert code == 0, output
    assert "network sees RGB pixels" in output
    out = tmp_path / "demo"
    lines = dict(line.split(": ", 1) for line in output.splitlines()
                 if line.split(": ", 1)[0] in ("synth", "render", "features", "train", "infer", "eval"))
    assert lines["synth"] == (f"dualpm-prep synth {out / 'source'} --num-samples 24 --num-models 1 --image-size 32 "
                              "--faces 600 --seed 0")
    assert lines["features"] == (f"dualpm-prep features {out / 'source'} {out / 'data'} --extractor rgb "
                                  "--device auto --grid 16")
    assert lines["train"].startswith(f"dualpm-train {DEFAULT_CONFIG} --data {out / 'data'} --out {out / 'run'}")
    assert lines["eval"] == f"dualpm-eval --pred {out / 'pred'} --data {out / 'data'} --baseline --out {out / 'eval'}"
    assert not out.exists()


def test_weights_choose_the_extractor_and_must_come_in_pairs(tmp_path):
    sd, dino = tmp_path / "sd", tmp_path / "dino"
    code, output = invoke("--out", tmp_path / "d", "--dry-run", env={"DUALPM_SD_MODEL": str(sd),
                                                                     "DUALPM_DINO_MODEL": str(dino)})
    assert code == 0, output
    assert f"--extractor sd-dino --device auto --sd-model {sd} --dino-model {dino}" in output
    assert "network sees RGB pixels" not in output
    code, output = invoke("--out", tmp_path / "d", "--dry-run", "--sd-model", sd)
    assert code == 1
    assert "--dino-model (DUALPM_DINO_MODEL) is not set" in output


def test_a_demo_made_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    state = {"config": {"samples": 480, "models": 9}, "stages": {}}
    (out / STATE_NAME).write_text(json.dumps(state))
    code, output = invoke("--out", out, *TINY)
    assert code == 1
    assert f"{out} holds a demo made with other settings" in output and "models" in output and "--fresh" in output
    assert json.loads((out / STATE_NAME).read_text()) == state  # untouched
    (out / STATE_NAME).write_text("{torn")
    code, output = invoke("--out", out, *TINY)
    assert code == 1 and "unreadable demo state" in output


def tiny_train_config(tmp_path: Path, steps: int) -> Path:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["data"].update(batch_size=4, loader_workers=0, shuffle_buffer=8)
    config["model"]["unet"].update(base_channels=8, channel_mult=[1, 2], attention_levels=[], num_groups=4)
    config["train"].update(steps=steps, checkpoint_every=steps, validate_every=steps, log_every=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_demo(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEMO, *map(str, args)], capture_output=True, text=True, check=False,
                          env={**__import__("os").environ, "DUALPM_SD_MODEL": "", "DUALPM_DINO_MODEL": ""})


def check_report(out: Path, proc: subprocess.CompletedProcess[str], animated: bool = True) -> float:
    """The run succeeded, and the report and the printed verdict agree with dualpm-eval's summary."""
    summary = json.loads((out / "eval" / "summary.json").read_text())
    ratio = summary[RATIO_KEY]  # null: some sample kept no predicted point, an infinite distance
    ratio = float("inf") if ratio is None else ratio
    passed = ratio <= LEARNING_BAR
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "report" / "report.md").read_text()
    assert f"**{ratio:.3f}**" in report and ("**PASS**" if passed else "**FAIL**") in report
    for stage in STAGES:
        assert f"| {stage} |" in report
    lines = proc.stdout.strip().splitlines()
    last = -5 if animated else -4
    assert lines[last].startswith(f"learning check: model / baseline symmetric Chamfer (unit cube) = {ratio:.3f}")
    assert lines[last].endswith("PASS" if passed else "FAIL")
    assert lines[last + 1] == f"report: {out / 'report' / 'report.md'}"
    assert "## Animation (dualpm-animate, held-out sequence)" in report
    for name in ("training_curve.png", "predictions.png"):
        with Image.open(out / "report" / name) as image:
            assert image.width > 200 and image.height > 100
    assert sorted(out.glob("pred/**/*.ply"))
    if not animated:  # a model that keeps no point on the sequence: reported, not a crash
        assert "**Not animated**: the model keeps no predicted point" in report
        assert not (out / "animation" / "animation.glb").exists()
        return ratio
    assert lines[-1] == f"animated rig (open in Blender or three.js): {out / 'animation' / 'animation.glb'}"
    # the held-out sequence's animation: the rig synth wrote, animated by one key per frame
    fit = json.loads((out / "animation" / "fit.json").read_text())
    frames = [frame["id"] for frame in fit["frames"]]
    assert len(frames) == int(TINY[TINY.index("--sequence-frames") + 1])
    assert "(animation.png)" in report
    from dualpm.animation import load_clips
    from dualpm.gltf import load_skinned_mesh

    glb = out / "animation" / "animation.glb"
    rig = load_skinned_mesh(glb)
    assert rig.num_vertices == load_skinned_mesh(next((out / "source" / "shapes").glob("*/*.gltf"))).num_vertices
    (clip,) = load_clips(glb, rig.num_nodes)
    assert round(clip.duration * 24) == len(frames) - 1
    with Image.open(out / "report" / "animation.png") as image:
        assert image.width > 200 and image.height > 100
    return ratio


def test_tiny_demo_runs_every_stage_then_resumes_without_redoing_any(tmp_path):
    out, config = tmp_path / "demo", tiny_train_config(tmp_path, steps=4)
    first = run_demo("--out", out, "--config", config, *TINY)
    ratio = check_report(out, first, animated=False)  # 4 steps: the model keeps no point yet
    assert "animate: skipped, the model keeps no predicted point on any of the 4 frames" in first.stdout
    state = json.loads((out / STATE_NAME).read_text())
    assert list(state["stages"]) == list(STAGES)
    assert "network sees RGB pixels" in first.stdout
    report = (out / "report" / "report.md").read_text()
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    counts = {split: sum(len(p["ids"]) for p in manifest["plan"] if p["split"] == split) for split in ("train", "val")}
    assert counts["train"] + counts["val"] == 24 and counts["val"] >= 1
    assert f"{counts['train']} train / {counts['val']} val samples" in report

    again = run_demo("--out", out, "--config", config, *TINY)
    assert check_report(out, again, animated=False) == ratio
    assert again.stdout.count("done before") == len(STAGES), again.stdout
    assert json.loads((out / STATE_NAME).read_text())["stages"] == state["stages"]

    # 150 steps: enough for the tiny model to keep points on the sequence, which is then animated
    (tmp_path / "longer").mkdir()
    trained = tiny_train_config(tmp_path / "longer", steps=150)
    fresh = run_demo("--out", out, "--config", trained, *TINY, "--fresh")
    check_report(out, fresh)
    assert "done before" not in fresh.stdout
    new_state = json.loads((out / STATE_NAME).read_text())["stages"]
    assert all(new_state[s]["finished"] >= state["stages"][s]["finished"] for s in new_state)


@pytest.mark.slow
def test_demo_defaults_learn_at_least_twice_better_than_the_constant_baseline(tmp_path):
    """The demo as `make demo` runs it (about 10 minutes on 2 cores)."""
    out = tmp_path / "demo"
    proc = run_demo("--out", out)
    ratio = check_report(out, proc)
    assert ratio <= LEARNING_BAR, proc.stdout[-3000:]
    assert np.isfinite(ratio)


def test_metrics_log_tolerates_only_a_torn_last_line(tmp_path):
    from dualpm.errors import DatasetError
    from pipeline.demo_report import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    assert read_metrics(tmp_path) == [{"step": 1, "split": "train"}]  # a killed writer's half line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "split": "train"}\n')
    with pytest.raises(DatasetError, match="metrics.jsonl: line 1 is not JSON"):
        read_metrics(tmp_path)
