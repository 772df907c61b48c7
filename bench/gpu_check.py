"""The GPU path, proven in one call: install, build, test and benchmark on a GPU machine with no network.

    bash bench/gpu_wheels.sh                         # here, once (PyPI reachable): fills .gpu/
    bash bench/gpu_check.sh                          # there, from the working tree alone (or: make gpu-check)
    python3 bench/gpu_check.py --phases render,train --budget 300 --dry-run

Phases, in this order; each runs in its own process group under its own timeout, all of them within
`--budget` seconds; a phase that fails or times out is reported and the next one still runs:

  install       .gpu/wheels/*.whl and Ray's files (.gpu/ray-*.tar.xz) into --site; then
                `pip install --no-deps --no-build-isolation -e .` against the machine's torch; then
                every module the project needs is imported
  nvdiffrast    builds .gpu/vendor/nvdiffrast-0.4.0.tar.gz (compiled at install, not JIT) into --site for
                this GPU's architecture only (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability())
  tests         pytest -m gpu over the test modules that hold gpu tests, --test-timeout seconds per test
  render        bench/render.py: cuda maps/s (instanced and range mode) vs the cpu backend, parity
  render-stage  bench/render_pipeline.py --backend cuda: `dualpm-prep render` end to end vs the raw renderer
  train         bench/train.py --config configs/paper.yaml: reader vs step, bf16 vs fp32, train() itself
  features      bench/features.py --full: sd-dino with randomly initialised full-size models (speed only)

Every benchmark writes its measures as JSON rows `{"metrics": [{measure, value, target, met}]}`
(`Metric`, `write_metrics`), which become the summary's rows. Into --out ($OUT when set, else
gpu_check_out/) go: summary.md (the table, also printed last), machine.txt, gpu_check.log (every
command and its output), results.json, and with --record benchmarks.md (docs/benchmarks.md with the
dated rows the benchmarks and this check appended to it). The exit status is 0 when every phase ran
and passed. Without a CUDA device it exits at once, running nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, installed or not

import click  # noqa: E402

from dualpm.cliutils import describe_machine, record_benchmark  # noqa: E402
from dualpm.fileio import atomic_write_json, atomic_write_text  # noqa: E402

PREPARED = REPO / ".gpu"  # filled here by bench/gpu_wheels.sh, carried to the GPU machine (git-ignored)
NVDIFFRAST = PREPARED / "vendor" / "nvdiffrast-0.4.0.tar.gz"
PHASES = ("install", "nvdiffrast", "tests", "render", "render-stage", "train", "features")
# Seconds each phase may take at most; what is left of --budget bounds them too. Expected on one
# H100/H200 with 16 cores (not measured yet): 25, 120, 50, 40, 60, 60, 90.
TIMEOUTS = {"install": 90, "nvdiffrast": 240, "tests": 150, "render": 90, "render-stage": 120, "train": 120,
            "features": 150}
RESERVE = 10.0  # seconds of --budget kept for writing the summary
# What `install` must leave importable: the packages the image lacks (bench/gpu_wheels.sh) and ours.
MODULES = ("embreex", "pygltflib", "trimesh", "fast_simplification", "webdataset", "zarr", "numcodecs",
           "diffusers", "ray", "dualpm.render", "dualpm.train", "dualpm.features", "pipeline.render_stage",
           "pipeline.features_stage")
PREPARE_HINT = "prepare .gpu/ on a machine with PyPI: bash bench/gpu_wheels.sh"
IMPORT_CHECK = """
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        print(f"{name:24s} {getattr(module, '__version__', '')}  {module.__file__}")
    except Exception as err:  # report every module that cannot be imported, with why, not just the first
        missing.append(f"{name} ({type(err).__name__}: {err})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing) + "; HINT")
""".replace("HINT", PREPARE_HINT)
NVDIFFRAST_CHECK = """
import nvdiffrast, nvdiffrast.torch as dr, torch
dr.RasterizeCudaContext(device=torch.device("cuda", 0))
print("nvdiffrast", nvdiffrast.__version__, "at", nvdiffrast.__file__, "- RasterizeCudaContext created")
"""


@dataclass(frozen=True)
class Metric:
    """One measure of a phase against its target (met: None where there is no target)."""

    measure: str
    value: str
    target: str = ""
    met: bool | None = None


def write_metrics(path: str | os.PathLike, metrics: Sequence[Metric]) -> None:
    """Write a benchmark's measures for the summary (the `--json` option of the bench scripts)."""
    atomic_write_json(path, {"metrics": [asdict(m) for m in metrics]})


def read_metrics(path: Path) -> tuple[Metric, ...]:
    return tuple(Metric(**row) for row in json.loads(path.read_text())["metrics"])


@dataclass(frozen=True)
class Phase:
    """Commands run one after another (all of them, even after a failure) under one timeout.

    problem: why the phase cannot run at all (reported as its failure, nothing is run).
    metrics: the JSON file (`write_metrics`) its benchmark writes; junit: pytest's JUnit XML.
    """

    name: str
    timeout: float  # seconds
    steps: tuple[tuple[str, ...], ...]
    env: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None
    metrics: Path | None = None
    junit: Path | None = None


@dataclass(frozen=True)
class PhaseResult:
    name: str
    status: str  # 'ok', 'failed: ...', 'timed out after N s (step k)', 'skipped: ...'
    seconds: float
    metrics: tuple[Metric, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def parse_phases(text: str) -> tuple[str, ...]:
    """'all' or a comma-separated subset of PHASES -> the phases to run, in PHASES order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if names == {"all"}:
        return PHASES
    unknown = sorted(names - set(PHASES))
    if unknown or not names:
        problem = f"unknown phase(s) {', '.join(unknown)}" if unknown else "no phase given"
        raise click.BadParameter(f"{problem}; choose 'all' or some of {', '.join(PHASES)}")
    return tuple(p for p in PHASES if p in names)


def cuda_home(candidates: Iterable[Path]) -> Path | None:
    """The first candidate that is a CUDA toolkit (bin/nvcc and cuda_runtime.h under include/), for
    torch's extension builder: left alone, it guesses the folder above the `nvcc` on PATH, which is
    wrong where that nvcc is a wrapper script or a link into the toolkit."""
    for home in candidates:
        headers = (home / "include", home / "targets" / "x86_64-linux" / "include")
        if (home / "bin" / "nvcc").is_file() and any((h / "cuda_runtime.h").is_file() for h in headers):
            return home
    return None


def cuda_home_candidates() -> list[Path]:
    """$CUDA_HOME / $CUDA_PATH, the folder above the real nvcc on PATH, /usr/local/cuda."""
    named = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    found = [Path(os.path.realpath(nvcc)).parents[1]] if nvcc else []
    return [*(Path(p) for p in named if p), *found, Path("/usr/local/cuda")]


def pip_cuda_include_dirs(purelib: Path) -> list[str]:
    """Header folders of the NVIDIA libraries installed as Python packages beside torch (nvidia/*/include,
    nvidia/cu13/include): torch's CUDA headers include cusparse.h, cublas_v2.h, cusolverDn.h, which a
    toolkit holding only the compiler lacks."""
    return [str(p) for p in sorted((purelib / "nvidia").glob("*/include")) if p.is_dir()]


GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.MULTILINE)


def gpu_test_modules(tests: Path) -> list[str]:
    """The test modules under `tests` that mark tests `gpu` (a decorator or a module's `pytestmark`);
    running only these keeps a module whose imports fail on that machine from stopping the whole run."""
    return [str(p.relative_to(tests.parent)) for p in sorted(tests.glob("test_*.py"))
            if GPU_MARK.search(p.read_text(encoding="utf-8"))]


def plan(names: Sequence[str], site: Path, work: Path, arch: str | None, record: bool,
         test_timeout: int) -> list[Phase]:
    """The phases `names` as commands. arch: the GPU's compute capability ('9.0'), None in a dry run."""
    py = sys.executable
    pip = (py, "-m", "pip", "install", "--no-deps", "--no-index")
    append = ("--append", "docs/benchmarks.md") if record else ()
    phases = []
    for name in names:
        timeout = TIMEOUTS[name]
        if name == "install":
            wheels = sorted(str(p) for p in (PREPARED / "wheels").glob("*.whl"))
            steps = [(*pip, "-q", "--no-compile", "--upgrade", "--target", str(site), *wheels)]
            steps += [(py, "-m", "tarfile", "--filter", "data", "-e", str(tar), str(site))
                      for tar in sorted(PREPARED.glob("ray-*.tar.xz"))]
            steps += [(*pip, "-q", "--no-build-isolation", "-e", str(REPO)),
                      (py, "-c", IMPORT_CHECK, *MODULES)]
            problem = None if wheels else f"no wheels in {PREPARED / 'wheels'}; {PREPARE_HINT}"
            phases.append(Phase(name, timeout, tuple(steps), problem=problem))
        elif name == "nvdiffrast":
            build = work / "nvdiffrast"
            built = any(site.glob("_nvdiffrast_c*.so"))  # by an earlier run on this machine: only the check
            steps = [] if built else [
                (py, "-m", "tarfile", "--filter", "data", "-e", str(NVDIFFRAST), str(build)),
                # setup.py compiles the extension here (no JIT at first use), with ninja, MAX_JOBS at once.
                (*pip, "--no-build-isolation", "--no-cache-dir", "--upgrade", "--target", str(site),
                 str(build / "nvdiffrast-0.4.0")),
            ]
            env = {"TORCH_CUDA_ARCH_LIST": arch or "<this GPU's compute capability>",
                   "MAX_JOBS": str(os.cpu_count() or 1)}
            home = cuda_home(cuda_home_candidates())
            if home is not None:
                env["CUDA_HOME"] = str(home)
            headers = pip_cuda_include_dirs(Path(sysconfig.get_paths()["purelib"]))
            if headers:  # gcc (nvcc's host compiler too) searches CPATH after the -I folders: the toolkit's
                env["CPATH"] = os.pathsep.join([*headers, *filter(None, [os.environ.get("CPATH")])])
            problem = None if built or NVDIFFRAST.exists() else f"{NVDIFFRAST} is missing; {PREPARE_HINT}"
            phases.append(Phase(name, timeout, (*steps, (py, "-c", NVDIFFRAST_CHECK)), env, problem))
        elif name == "tests":
            junit = work / "junit.xml"
            pytest = (py, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--timeout={test_timeout}",
                      f"--junitxml={junit}", *gpu_test_modules(REPO / "tests"))
            phases.append(Phase(name, timeout, (pytest,), junit=junit))
        else:
            out = work / f"{name}.json"
            command = {
                "render": ("bench/render.py", *append),
                # A real run's shard size (256), enough samples to time the steady state.
                "render-stage": ("bench/render_pipeline.py", "--backend", "cuda", "--samples", "2048",
                                 "--shard-size", "256", "--repeats", "2", *append),
                "train": ("bench/train.py", "--config", "configs/paper.yaml", "--steps", "30",
                          "--e2e-steps", "100", "--append", "docs/benchmarks.md" if record else ""),
                "features": ("bench/features.py", "--full", *append),
            }[name]
            phases.append(Phase(name, timeout, ((py, *command, "--json", str(out)),), metrics=out))
    return phases


def junit_metrics(path: Path) -> tuple[Metric, ...]:
    """pytest's JUnit XML -> one Metric: passed / failed / skipped counts and the failing tests' names."""
    passed, failed, skipped = 0, [], 0
    for case in ElementTree.parse(path).iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
    value = f"{passed} passed, {len(failed)} failed, {skipped} skipped"
    value += f" ({', '.join(failed)})" if failed else ""
    return (Metric("pytest -m gpu", value, "all pass", passed > 0 and not failed and not skipped),)


def _stop(proc: subprocess.Popen) -> None:
    """End the step's whole process group (compilers, Ray daemons, loader workers): SIGTERM, up to 5 s
    for the step itself to exit, then SIGKILL for whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    proc.wait()


def _label(argv: Sequence[str]) -> str:
    """A step's short name: 'pip' (python -m pip ...), 'python -c', 'bench/render.py'."""
    if len(argv) > 2 and argv[1] == "-m":
        return argv[2]
    if len(argv) > 1:
        return "python -c" if argv[1] == "-c" else argv[1]
    return argv[0]


def run_phase(phase: Phase, env: Mapping[str, str], log: IO[bytes], seconds: float) -> PhaseResult:
    """Run `phase` for at most `seconds`, its output appended to `log`; never raises for a failing command."""
    start = time.monotonic()
    if phase.problem:
        log.write(f"cannot run: {phase.problem}\n".encode())
        return PhaseResult(phase.name, f"failed: {phase.problem}", 0.0)
    failure = None
    log.write("".join(f"{key}={value}\n" for key, value in phase.env.items()).encode())
    for k, argv in enumerate(phase.steps, 1):
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env={**env, **phase.env}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(max(0.1, start + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"timed out after {seconds:.0f} s (step {k})"
            return PhaseResult(phase.name, status, time.monotonic() - start)
        _stop(proc)  # whatever the step left running in its group
        if code != 0 and failure is None:
            failure = f"failed: step {k} ({_label(argv)}) exit {code}"
    elapsed = time.monotonic() - start
    result = phase.junit if phase.junit is not None else phase.metrics
    metrics = ()
    if result is not None and result.exists():
        metrics = junit_metrics(result) if phase.junit is not None else read_metrics(result)
    elif result is not None and failure is None:
        failure = f"failed: wrote no results to {result}"
    return PhaseResult(phase.name, failure or "ok", elapsed, metrics)


def run_phases(names: Sequence[str], make: Callable[[str], Phase], env: Mapping[str, str], out: Path,
               deadline: float, headline: str) -> list[PhaseResult]:
    """Run the phases `names` (made by `make` just before each runs) one after another until `deadline`
    (time.monotonic()); every phase runs whatever happened to the one before. Appends their output to
    out/gpu_check.log and rewrites out/summary.md and out/results.json after each phase."""
    results: list[PhaseResult] = []
    with open(out / "gpu_check.log", "ab") as log:
        for name in names:
            phase, left = make(name), deadline - RESERVE - time.monotonic()
            seconds = min(phase.timeout, left)
            log.write(f"\n===== {name} (at most {max(seconds, 0):.0f} s)\n".encode())
            begin = log.tell()
            if left < 5:
                result = PhaseResult(name, "skipped: out of time (--budget)", 0.0)
            else:
                click.echo(f"[{name}] starting ({seconds:.0f} s at most)")
                result = run_phase(phase, env, log, seconds)
            log.flush()
            results.append(result)
            click.echo(f"[{name}] {result.status} ({result.seconds:.0f} s)")
            if not result.ok:  # the end of its output, for a reader of this console alone
                text = (out / "gpu_check.log").read_bytes()[begin:].decode(errors="replace")
                click.echo("".join(f"    {line}\n" for line in text.splitlines()[-25:]), nl=False)
            atomic_write_json(out / "results.json", [asdict(r) for r in results])
            atomic_write_text(out / "summary.md", f"{headline}\n\n{summary_table(results)}")
    return results


def _row(cells: Sequence[str]) -> str:
    """A markdown table row: '|' inside a cell escaped, an empty cell as '| |'."""
    escaped = (c.replace("|", "\\|").replace("\n", " ") for c in cells)
    return "|" + "|".join(f" {c} " if c else " " for c in escaped) + "|"


def summary_table(results: Sequence[PhaseResult]) -> str:
    """The markdown table of phase results: one row per measure (a phase without any gets one row)."""
    met = {True: "yes", False: "**no**", None: ""}
    lines = ["| phase | status | seconds | measure | value | target | met |",
             "|---|---|---:|---|---:|---|---|"]
    for r in results:
        for k, m in enumerate(r.metrics or (None,)):
            head = [r.name, r.status, f"{r.seconds:.0f}"] if k == 0 else [r.name, "", ""]
            tail = ["", "", "", ""] if m is None else [m.measure, m.value, m.target, met[m.met]]
            lines.append(_row(head + tail))
    ok = sum(r.ok for r in results)
    targets = [m.met for r in results for m in r.metrics if m.met is not None]
    footer = f"{ok} of {len(results)} phases ok; {sum(targets)} of {len(targets)} targets met."
    return "\n".join(lines) + f"\n\n{footer}\n"


def machine_text(torch) -> str:
    """machine.txt: what the numbers were measured on."""

    def command(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO, check=False)
            return (out.stdout or out.stderr).strip() or f"(exit {out.returncode})"
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"(not available: {err})"

    props = torch.cuda.get_device_properties(0)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    return "\n".join([
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        (f"gpu: {props.name}, compute capability {props.major}.{props.minor}, "
         f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs "
         f"({torch.cuda.device_count()} visible)"),
        f"nvidia-smi: {command('nvidia-smi', query, '--format=csv,noheader')}",
        f"cpu: {describe_machine().split(', ')[0]}; {os.cpu_count()} logical CPUs; {memory:.0f} GiB memory",
        f"kernel: {platform.platform()}",
        f"python: {sys.version.split()[0]} ({sys.executable})",
        f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
        f"nvcc: {command('nvcc', '--version').splitlines()[-1]}",
        f"commit: {command('git', 'rev-parse', 'HEAD')}",
    ]) + "\n"


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), envvar="OUT",
              default="gpu_check_out", show_default=True, show_envvar=True,
              help="Folder for the summary, machine description and log.")
@click.option("--phases", "phase_text", default="all", show_default=True,
              help=f"Comma-separated phases to run (in their fixed order): all, or some of "
                   f"{', '.join(PHASES)}.")
@click.option("--budget", type=click.IntRange(60, 3600), default=480, show_default=True,
              help="Seconds for the whole check; phases that would start past it are skipped.")
@click.option("--site", type=click.Path(file_okay=False, path_type=Path), default="/tmp/dualpm-gpu-site",
              show_default=True, help="Where the carried packages and nvdiffrast go (put on PYTHONPATH).")
@click.option("--test-timeout", type=click.IntRange(10, 600), default=120, show_default=True,
              help="Seconds per gpu test (pytest-timeout).")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Benchmarks and the summary append dated rows to docs/benchmarks.md (copied to OUT).")
@click.option("--dry-run", is_flag=True, help="Print the phases' commands and stop.")
def main(out: Path, phase_text: str, budget: int, site: Path, test_timeout: int, record: bool,
         dry_run: bool) -> None:
    """Install, build, test and benchmark the GPU path on this machine, in one call (see the module doc)."""
    started = time.monotonic()
    names = parse_phases(phase_text)
    site = site.resolve()
    if dry_run:
        work = Path(tempfile.gettempdir()) / "dualpm-gpu-check-XXXX"
        click.echo(f"out: {out}; budget {budget} s; packages into {site}")
        for p in plan(names, site, work, None, record, test_timeout):
            env = "".join(f"; {k}={v}" for k, v in p.env.items())
            click.echo(f"\n[{p.name}] timeout {p.timeout:.0f} s{env}")
            if p.problem:
                click.echo(f"  cannot run: {p.problem}")
            for argv in p.steps:
                click.echo("  $ " + shlex.join(a if "\n" not in a else "<python code>" for a in argv))
        return
    import torch  # here: a dry run and --help stay fast

    if not torch.cuda.is_available():
        raise click.ClickException(
            "no CUDA device is visible to torch (torch.cuda.is_available() is False): this check needs a "
            "machine with an NVIDIA GPU (README, 'Checking a GPU machine'); nothing was run")
    major, minor = torch.cuda.get_device_capability(0)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_text(torch)
    atomic_write_text(out / "machine.txt", machine)
    today = datetime.date.today().isoformat()
    headline = f"GPU check {today} on {describe_machine()}, torch {torch.__version__}"
    click.echo(f"{headline}\n{machine}")
    with open(out / "gpu_check.log", "ab") as log:
        log.write(f"{headline}\n{machine}".encode())
    site.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dualpm-gpu-check-"))
    paths = [str(site), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # Planned one at a time: nvdiffrast's plan looks at what install left in --site.
    make = lambda name: plan([name], site, work, f"{major}.{minor}", record, test_timeout)[0]  # noqa: E731
    results = run_phases(names, make, env, out, started + budget, headline)
    table = summary_table(results)
    if record:
        intro = ("`bench/gpu_check.py` (`make gpu-check`): every phase of the one-call check on a GPU "
                 "machine, with its measures against their targets (README, 'Checking a GPU machine').")
        record_benchmark(REPO / "docs" / "benchmarks.md", "GPU check (`bench/gpu_check.py`)",
                         f"- {headline}\n\n{table}", intro=intro)
        shutil.copyfile(REPO / "docs" / "benchmarks.md", out / "benchmarks.md")
    shutil.rmtree(work, ignore_errors=True)
    click.echo(f"\n{headline}\n\n{table}\nwritten to {out}/ ({time.monotonic() - started:.0f} s in all)")
    if not all(r.ok for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
