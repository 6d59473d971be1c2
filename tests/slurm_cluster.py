"""A real SLURM cluster on this one host, for tests: slurmctld + one slurmd per simulated node.

    with SlurmCluster(num_nodes=2) as cluster:
        job = cluster.sbatch(["--nodes=2", "launch/slurm/train.sbatch", "configs/demo.toml"], env={...}, cwd=REPO)
        assert cluster.wait(job, timeout=300) == "COMPLETED"

Needs root and Debian's packages (slurmctld slurmd slurm-client munge, installed with apt-get when
slurmctld is missing). Each slurmd runs in its own UTS namespace whose hostname is its node name, so
code that compares gethostname() with a node name (torchrun's c10d rendezvous) sees separate machines;
node names resolve to 127.0.0.11, .12, ... through /etc/hosts lines tagged `# slurm-ci`.
See /work/shared/notes/slurm-on-one-host.md for how this was worked out and which log errors are harmless.

Layout of a run directory (under /tmp/slurm-ci/):
    slurm.conf  cluster.json (owner pid, namespaces and pids to stop)  state/  run/  log/
A run whose owner process died without tearing down (a killed pytest) is reaped by the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# slurm-ci"
RUNS = Path(tempfile.gettempdir()) / "slurm-ci"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    # held after a requeue: nothing more happens without a person
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
}


class SlurmError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH + ":" + os.environ.get("PATH", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _uts(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `grace` seconds."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p) and not _zombie(p)]
            if not pids:
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _pids_in_namespaces(namespaces: set[str]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _uts(int(entry.name)) in namespaces:
            pids.append(int(entry.name))
    return pids


def _remove_hosts_lines() -> None:
    try:
        text = HOSTS.read_text()
    except FileNotFoundError:
        return
    kept = [line for line in text.splitlines(keepends=True) if not line.rstrip().endswith(HOSTS_TAG)]
    if len(kept) != len(text.splitlines()):
        with open(HOSTS, "w") as f:  # in place: /etc/hosts is often a bind mount in containers
            f.writelines(kept)


def install_packages() -> None:
    """apt-get install the SLURM and munge packages if slurmctld is missing (a fresh CI machine)."""
    if _which("slurmctld") and _which("slurmd") and _which("sbatch") and _which("munged"):
        return
    if not _which("apt-get"):
        raise SlurmError("slurmctld is not installed and there is no apt-get to install " + " ".join(PACKAGES))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SBIN_PATH)
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")


class SlurmCluster:
    """Bring up with up() (or `with`), submit with sbatch(), follow with wait(), tear down with down()."""

    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 2, first_address: int = 11):
        self.num_nodes = num_nodes
        self.cpus_per_node = cpus_per_node
        self.nodes = [f"node{i}" for i in range(1, num_nodes + 1)]
        self.addresses = [f"127.0.0.{first_address + i}" for i in range(num_nodes)]
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.state: dict = {}

    # ---- set-up -------------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise SlurmError("the SLURM test cluster runs its daemons as root")
        install_packages()
        reap_stale_runs()
        RUNS.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS))
        self.conf = self.dir / "slurm.conf"
        self.state = {"owner": os.getpid(), "namespaces": [], "slurmctld": None, "munged": None}
        self._save()
        for sub in ["state/ctld", "run", "log", *(f"state/d/{n}" for n in self.nodes)]:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        _remove_hosts_lines()
        with open(HOSTS, "a") as f:
            if not HOSTS.read_text().endswith("\n"):
                f.write("\n")
            f.writelines(f"{addr} {node} {HOSTS_TAG}\n" for addr, node in zip(self.addresses, self.nodes))
        self._start_munged()
        self._daemon([_which("slurmctld"), "-f", str(self.conf)])
        self.state["slurmctld"] = self._wait_pid_file(self.dir / "run/slurmctld.pid", "slurmctld")
        self._save()
        for node in self.nodes:
            # the hostname is set inside the new UTS namespace only; slurmd daemonizes and keeps it
            script = f"hostname {node} && exec {_which('slurmd')} -f {self.conf} -N {node}"
            self._daemon([_which("unshare"), "--uts", "sh", "-c", script])
            pid = self._wait_pid_file(self.dir / f"run/slurmd-{node}.pid", f"slurmd {node}")
            self.state["namespaces"].append(_uts(pid))
            self._save()
        self._wait_idle(timeout)

    def _write_config(self) -> None:
        d = self.dir
        ctld_port = _free_port()
        lines = [
            "ClusterName=ci",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",  # slurmctld checks its short name
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # node CPUs come from here, not from the 2-core host
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2",  # start jobs (and requeued ones) promptly
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job`
            # a requeued job may start again after the credential lifetime (default 120 s)
            "AuthInfo=cred_expire=20",
            f"FirstJobId={random.randint(1000, 9000)}",  # a job's MASTER_PORT differs from the last run's
            f"StateSaveLocation={d}/state/ctld",
            f"SlurmdSpoolDir={d}/state/d/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
        ]
        for node, addr in zip(self.nodes, self.addresses):
            lines.append(
                f"NodeName={node} NodeAddr={addr} Port={_free_port()} CPUs={self.cpus_per_node} "
                "RealMemory=1000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munged(self) -> None:
        if self._munge_works():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():  # normally made by the munge package's postinst
            subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._daemon([_which("runuser"), "-u", "munge", "--", _which("munged")])
        self.state["munged"] = self._wait_pid_file(Path("/run/munge/munged.pid"), "munged")
        self._save()
        deadline = time.monotonic() + 10
        while not self._munge_works():
            if time.monotonic() > deadline:
                raise SlurmError("munged started but `munge -n` still fails")
            time.sleep(0.1)

    @staticmethod
    def _munge_works() -> bool:
        munge = _which("munge")
        return bool(munge) and subprocess.run([munge, "-n"], capture_output=True).returncode == 0

    def _daemon(self, cmd: list[str]) -> None:
        run = subprocess.run(cmd, capture_output=True, text=True, env=self.env())
        if run.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr}{self.logs()}")

    def _wait_pid_file(self, path: Path, what: str, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(path)
            if pid and _alive(pid):
                return pid
            time.sleep(0.05)
        raise SlurmError(f"{what} did not start (no live pid in {path}){self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            run = self._client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = run.stdout.strip()
            idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
            if idle == set(self.nodes):
                return
            time.sleep(0.2)
        raise SlurmError(f"nodes not idle after {timeout:.0f} s: {states!r}{self.logs()}")

    def _save(self) -> None:
        (self.dir / "cluster.json").write_text(json.dumps(self.state))

    # ---- use ----------------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        """Environment for SLURM clients (and what sbatch exports into the job, plus `extra`)."""
        env = dict(os.environ, **(extra or {}))
        env["PATH"] = env.get("PATH", "") + ":" + SBIN_PATH
        if self.conf:
            env["SLURM_CONF"] = str(self.conf)
        return env

    def _client(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        run = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", None) or self.env(), **kw)
        if check and run.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({run.returncode}): {run.stdout}{run.stderr}")
        return run

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit `sbatch --parsable ARGS` with os.environ + env exported to the job; returns the job id."""
        run = self._client([_which("sbatch"), "--parsable", *args], env=self.env(env), cwd=cwd)
        return int(run.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict:
        """The job's `scontrol show job` fields (JobState, ExitCode, NodeList, Restarts, StdOut, ...); an array
        task is "JOB_TASK"."""
        run = self._client(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", run.stdout))

    def wait(self, job_id: int | str, timeout: float, poll: float = 0.2) -> str:
        """Poll until the job reaches a final state and return it (COMPLETED, FAILED, ...).

        A requeued job (REQUEUED, then PENDING again) is followed into its next run. On timeout the job is
        cancelled and TimeoutError says where it was."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "?")
            if state in TERMINAL_STATES:
                return state
            time.sleep(poll)
        self._client(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s (cancelled)")

    def scancel(self, job_id: int, *options: str) -> None:
        """scancel OPTIONS JOB, e.g. scancel(job, "--batch", "--signal=USR1") to signal the batch script."""
        self._client([_which("scancel"), *options, str(job_id)])

    def scontrol(self, *args: str) -> str:
        """scontrol ARGS, e.g. scontrol("update", "NodeName=node2", "State=DRAIN", "Reason=test")."""
        return self._client([_which("scontrol"), *args]).stdout

    def logs(self, lines: int = 15) -> str:
        """The last lines of the daemons' logs, for error messages."""
        if not self.dir or not (self.dir / "log").is_dir():
            return ""
        out = []
        for log in sorted((self.dir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"\n--- {log.name}:\n" + "\n".join(tail))
        return "".join(out)

    # ---- tear-down ----------------------------------------------------------------------------------
    def down(self) -> None:
        """Stop everything this cluster started (also after a failed up()); safe to call twice."""
        if self.dir is not None:
            _teardown(self.dir, self.state)
        self.dir = None
        self.state = {}


def _teardown(run_dir: Path, state: dict) -> None:
    # slurmd, slurmstepd and every job task live in the nodes' namespaces
    namespaces = {ns for ns in state.get("namespaces", []) if ns and ns != _uts(os.getpid())}
    if namespaces:
        _stop(_pids_in_namespaces(namespaces))
    ctld = state.get("slurmctld") or _read_pid(run_dir / "run/slurmctld.pid")
    if ctld and str(run_dir / "slurm.conf") in _cmdline(ctld):
        _stop([ctld])
    munged = state.get("munged")
    if munged and "munged" in _cmdline(munged):
        _stop([munged])
    _remove_hosts_lines()
    shutil.rmtree(run_dir, ignore_errors=True)


def reap_stale_runs() -> None:
    """Tear down runs whose owner process is gone (a test run killed before its tear-down)."""
    if not RUNS.is_dir():
        return
    for run_dir in RUNS.iterdir():
        try:
            state = json.loads((run_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            if time.time() - run_dir.stat().st_mtime < 60:
                continue  # being created right now
            state = {}
        if state.get("owner") and _alive(state["owner"]):
            continue
        _teardown(run_dir, state)
