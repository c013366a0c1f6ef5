"""A real, throw-away Slurm cluster on this machine: munged, slurmctld and N slurmd ("nodes" n1..nN).

Debian's Slurm runs several slurmd on one host (each node its own port); jobs really go through the
controller, `srun` really starts one task per node, `scontrol requeue` really requeues. Everything
lives under one folder; every daemon is stopped by the PID in its own PID file (checked to be the
program we started), never by name. Node names are added to /etc/hosts for the cluster's life when
they do not resolve (a job passes the head node's name to the rendezvous), and removed after.

Needs root (the daemons run as root) and the Debian packages slurmctld, slurmd, slurm-client and munge
(scripts/setup_slurm.sh installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOSTS_MARK = "# rlhf-dist-test-slurm"
DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_programs() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in (*DAEMONS, "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "munge")
            if shutil.which(p, path=path) is None]


def _free_port_block(count: int) -> int:
    """The first of `count` consecutive free TCP ports."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65000:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports")


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 1):
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus_per_node
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, Path] = {}
        self.added_hosts = False
        sbin = "/usr/sbin:/sbin"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "") + ":" + sbin}

    # -- helpers ----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def _wait(self, what: str, ok, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(0.1)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.root / "log").glob("*.log")))
        raise RuntimeError(f"local Slurm: {what} not ready after {timeout} s\n{logs}")

    # -- start / stop -----------------------------------------------------------------------------
    def start(self) -> LocalSlurm:
        r = self.root
        for sub in ("run", "log", "state", "munge", *(f"spool/{n}" for n in self.names)):
            (r / sub).mkdir(parents=True, exist_ok=True)  # slurmd does not create its %n spool folder
        munge = r / "munge"
        munge.chmod(0o755)  # munged refuses a socket folder without o+x
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.pids["munged"] = munge / "munged.pid"
        subprocess.run(["munged", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
                        f"--log-file={munge / 'munged.log'}", f"--pid-file={self.pids['munged']}",
                        f"--seed-file={munge / 'munged.seed'}"],
                       env=self.env, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        self._wait("munged", lambda: (munge / "munge.socket").is_socket())

        ctld_port = _free_port_block(1)
        node_port = _free_port_block(self.nodes)
        nodes = self.names[0] if self.nodes == 1 else f"n[1-{self.nodes}]"
        ports = str(node_port) if self.nodes == 1 else f"[{node_port}-{node_port + self.nodes - 1}]"
        self.conf.write_text(f"""# written by tests/slurm_cluster.py
ClusterName=rlhftest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
AuthType=auth/munge
AuthInfo=socket={munge / 'munge.socket'},cred_expire=10
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'run'}/slurmctld.pid
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
SlurmctldLogFile={r / 'log'}/slurmctld.log
SlurmdLogFile={r / 'log'}/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r / 'log'}/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=5
NodeName={nodes} NodeHostname=localhost Port={ports} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # MinJobAge=5: `sbatch --wait` polls every 2 s (else it backs off to 32 s); cred_expire=10: a requeued
        # job may start again after 11 s (default 121 s); the scheduler settings start batch jobs at once.
        self.pids["slurmctld"] = r / "run" / "slurmctld.pid"
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
        self._wait("slurmctld", lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout)
        for name in self.names:
            self.pids[f"slurmd-{name}"] = r / "run" / f"slurmd-{name}.pid"
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], env=self.env, check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        self._wait("nodes", lambda: len(self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N",
                                                  check=False).stdout.split()) >= self.nodes)
        if not all(_resolves(n) for n in self.names):
            with open("/etc/hosts", "a") as fh:
                fh.write(f"127.0.0.1 {' '.join(self.names)} {HOSTS_MARK}\n")
            self.added_hosts = True
        return self

    def stop(self) -> None:
        """Cancel every job, then stop each daemon by its PID file (slurmd first, then slurmctld, then munged)."""
        ctld = self.pids.get("slurmctld")
        if ctld and _alive(ctld, "slurmctld"):
            ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.run("squeue", "-h", "-t", "running,completing,configuring",
                                                          "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.2)
        order = [k for k in self.pids if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for group in (order[:-2], order[-2:-1], order[-1:]):
            stopping = []
            for key in group:
                pid = _alive(self.pids.get(key), key.split("-")[0])
                if pid:
                    os.kill(pid, signal.SIGTERM)
                    stopping.append(pid)
            deadline = time.time() + 15
            while time.time() < deadline and any(_exists(p) for p in stopping):
                time.sleep(0.1)
            for pid in stopping:
                if _exists(pid):
                    os.kill(pid, signal.SIGKILL)
        if self.added_hosts:  # /etc/hosts is often a bind mount: rewrite it in place
            text = Path("/etc/hosts").read_text()
            Path("/etc/hosts").write_text("".join(line for line in text.splitlines(True) if HOSTS_MARK not in line))
            self.added_hosts = False

    # -- jobs -------------------------------------------------------------------------------------
    def jobcomp(self, job_id: str) -> list[dict]:
        """Every record of a finished (or requeued) job: one dict per line of the job completion log."""
        path = self.root / "log" / "jobcomp.txt"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            if fields.get("JobId") == job_id:
                records.append(fields)
        return records

    def wait_finished(self, job_id: str, timeout: float = 600) -> dict:
        """Wait until the job left the queue for good; its last completion record."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            queued = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()
            records = self.jobcomp(job_id)
            if not queued and records and records[-1].get("JobState") != "PENDING":
                return records[-1]
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still queued after {timeout} s")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _alive(pid_file: Path | None, program: str) -> int | None:
    """The PID in `pid_file` if that process is alive and is `program` (not a reused PID)."""
    if pid_file is None or not pid_file.is_file():
        return None
    try:
        pid = int(pid_file.read_text().split()[0])
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except (ValueError, IndexError, OSError):
        return None
    return pid if exe.startswith(program) else None
