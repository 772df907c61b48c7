"""A real Slurm cluster for tests: two nodes on this one host, from Debian's packages, without systemd.

`start_cluster()` installs `slurmctld slurmd slurm-client munge` when they are missing (root and
apt-get needed), writes a private configuration under a fresh temp dir (slurm.conf via SLURM_CONF,
state/spool/log dirs, its own munge key and socket: the machine's /etc is left as the packages
installed it), starts munged as the munge user, then `slurmctld -i` and one `slurmd -N` per node in
the foreground as children of this process, and waits until every node is idle (seconds). Both
nodes are this host (NodeAddr 127.0.0.1, each with this host's CPUs), so multi-node code paths (srun
across nodes, a Ray worker joining the head, a two-node torchrun rendezvous) run for real.
`stop()` cancels what is still queued and stops the daemons by PID. Where this is impossible
`SlurmUnavailable` says why, and the `slurm_cluster` fixture skips with that reason.

    cluster = start_cluster()
    job = cluster.submit("jobs/prep.sbatch", "verify", "/data/out", options=["--nodes=2"], log=tmp / "j.log")
    assert job.wait(timeout=120) == 0, job.output()
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dualpm.fileio import atomic_write_text

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
REPO = Path(__file__).resolve().parents[1]


class SlurmUnavailable(Exception):
    """Slurm cannot be started here; the message says why (it becomes the skip reason)."""


@dataclass(frozen=True)
class Job:
    """A batch job submitted with `sbatch --wait`; `wait()` gives its exit code."""

    id: str
    log: Path
    process: subprocess.Popen = field(repr=False)
    cluster: SlurmCluster = field(repr=False)

    def wait(self, timeout: float = 300) -> int:
        """Exit code of the job (sbatch --wait's); on timeout the job is cancelled and the test fails."""
        try:
            self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run("scancel", self.id)
            self.process.communicate(timeout=60)
            pytest.fail(f"job {self.id} did not finish within {timeout} s; its log:\n{self.output()}")
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else f"(no log at {self.log})"


@dataclass
class SlurmCluster:
    root: Path  # config, state, spool, logs and munge files
    nodes: tuple[str, ...]
    cpus: int  # per node
    daemons: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm commands and the jobs (sbatch exports it): this cluster's config, this
        checkout's Python environment, and nothing inherited that would change sbatch/srun options."""
        # SBATCH_*/SRUN_* would override the tests' options; RAY_AUTH_MODE (conftest disables Ray's auth
        # for local Ray) would hide the scripts' own default, a per-job token.
        drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "RAY_AUTH_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["SLURM_CONF"] = str(self.conf)
        if (Path(sys.prefix) / "bin" / "activate").exists():
            env["DUALPM_VENV"] = sys.prefix  # the scripts activate it: their documented mechanism
        else:
            env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        # Import this checkout's code whatever the state of the editable install.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.update(extra or {})
        return env

    def run(self, *cmd: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command against this cluster (output captured, never raises on failure)."""
        return subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def submit(self, script: str | Path, *args: str, options: tuple[str, ...] | list[str] = (), log: Path,
               env: dict[str, str] | None = None) -> Job:
        """`sbatch --wait` in the background; returns once the job is queued."""
        cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", *options, str(script), *args]
        proc = subprocess.Popen(cmd, env=self.env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        first = proc.stdout.readline().strip()  # --parsable: "id" (or "id;cluster") as soon as it is queued
        if not first:
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"sbatch {script} failed ({proc.returncode}): {err}")
        return Job(first.split(";")[0], log, proc, self)

    def queued(self) -> list[str]:
        """Ids of the jobs still known to slurmctld (pending, running, completing)."""
        out = self.run("squeue", "--noheader", "--format=%i").stdout
        return out.split()

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID (newest first), remove the cluster's files."""
        try:
            if any(d.poll() is None for d in self.daemons) and (ids := self.queued()):
                self.run("scancel", "--full", *ids)
                deadline = time.monotonic() + 30
                while self.queued() and time.monotonic() < deadline:
                    time.sleep(1)
        finally:
            for daemon in reversed(self.daemons):
                _stop(daemon)
            shutil.rmtree(self.root, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_packages() -> None:
    """apt-get install the Slurm packages if a command is missing (needs root)."""
    if all(shutil.which(name) for name in COMMANDS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=120"]  # another apt/dpkg at work: wait, do not fail
    for cmd in (["apt-get", *wait_for_lock, "update", "-qq"],
                ["apt-get", *wait_for_lock, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` did not finish within 600 s") from None
        if proc.returncode != 0:
            tail = proc.stderr.strip()[-500:]
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail}")
    missing = [name for name in COMMANDS if not shutil.which(name)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing: {' '.join(missing)}")


def _hardware() -> tuple[str, int, str]:
    """(host name, CPUs, the hardware part of a NodeName line) as `slurmd -C` reports this machine."""
    proc = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60, check=False)
    words = dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)
    if proc.returncode != 0 or "NodeName" not in words or "CPUs" not in words:
        raise SlurmUnavailable(f"`slurmd -C` failed ({proc.returncode}): {proc.stdout} {proc.stderr}".strip())
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return words["NodeName"], int(words["CPUs"]), " ".join(f"{k}={words[k]}" for k in keys if k in words)


SLURM_CONF = """\
ClusterName=dualpmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
# Our own munged; cred_expire is also how long a requeued job waits before it starts again.
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# Several slurmd on one host: each node is this host and keeps the configured hardware.
SlurmdParameters=config_overrides
# No cgroups, no systemd here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Larger values make `sbatch --wait` slow; small values above 5 lose the job's exit code.
MinJobAge=5
# Frequent scheduling passes: a requeued job waits for its begin time, then for the next pass.
SchedulerParameters=sched_interval=2
KillWait=10
ReturnToService=2
MpiDefault=none
NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} {hardware} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(nodes: int = 2, timeout: float = 60) -> SlurmCluster:
    """Install (if needed), configure and start a cluster of `nodes` nodes on this host; raises
    SlurmUnavailable."""
    if sys.platform != "linux":
        raise SlurmUnavailable("Slurm tests need Linux")
    install_packages()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting munged and slurmd needs root")
    try:
        munge = pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("there is no 'munge' user (the munge package creates it)") from None
    host, cpus, hardware = _hardware()
    names = tuple(f"node{i}" for i in range(1, nodes + 1))

    # Outside pytest's 0700 tmp dirs: munged (as the munge user) must reach its socket, and checks that
    # every directory above it is searchable by all and writable by root only.
    root = Path(tempfile.mkdtemp(prefix="dualpm-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root, names, cpus)
    try:
        for name in ("state", "spool", "log"):
            (root / name).mkdir()
        munge_dir = root / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # whatever the umask
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        key = munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        ports = [_free_port() for _ in range(nodes + 1)]
        atomic_write_text(cluster.conf, SLURM_CONF.format(
            root=root, host=host, hardware=hardware, ctld_port=ports[0], nodes=",".join(names),
            ports="[" + ",".join(map(str, ports[1:])) + "]"))

        env = cluster.env()

        def daemon(name: str, *cmd: str, user: pwd.struct_passwd | None = None) -> None:
            ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
            with open(root / "log" / f"{name}.out", "wb") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **ids)
            cluster.daemons.append(proc)

        daemon("munged", "munged", "--foreground", f"--key-file={key}",
               f"--socket={munge_dir}/munge.socket.2",
               f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
               f"--seed-file={munge_dir}/munged.seed", user=munge)
        _wait_for(lambda: (munge_dir / "munge.socket.2").exists(), cluster, timeout, "munged's socket")
        daemon("slurmctld", "slurmctld", "-D", "-i")
        for name in names:
            (root / "spool" / name).mkdir()
            daemon(f"slurmd-{name}", "slurmd", "-D", "-N", name)

        def idle() -> bool:
            states = cluster.run("sinfo", "--noheader", "--Node", "--format=%t").stdout.split()
            return states == ["idle"] * nodes
        _wait_for(idle, cluster, timeout, "idle nodes in sinfo")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(ready, cluster: SlurmCluster, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [d.args[0] for d in cluster.daemons if d.poll() is not None]
        if dead or time.monotonic() > deadline:
            files = sorted((cluster.root / "log").glob("*")) + [cluster.root / "munge" / "munged.log"]
            logs = "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}"
                             for p in files if p.exists())
            reason = f"{', '.join(dead)} exited" if dead else f"no {what} within {timeout} s"
            raise SlurmUnavailable(f"Slurm did not start: {reason}\n{logs}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm cluster of two nodes on this host for the session (skips with the reason where
    impossible)."""
    try:
        cluster = start_cluster()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
