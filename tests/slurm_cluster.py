"""A real one-node SLURM cluster (munged + slurmctld + slurmd from Debian's `slurm-wlm` and `munge`) in a folder.

Everything the daemons write (config, munge key and socket, state, spool, logs) lives under that folder and they
listen on free ports, so the cluster touches nothing of the machine's own SLURM, if any. Clients find it through
`SLURM_CONF` (see `env`). Needs root: slurmd runs jobs as their submitting user, and munged runs as `munge`.

    cluster = SlurmCluster(tmp_path / "slurm").start()   # raises SlurmUnavailable with the reason
    subprocess.run(["sbatch", ...], env=cluster.env(os.environ))
    cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here: the reason is the message."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(name: str) -> str | None:
    return shutil.which(name) or next((p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
                                      None)  # fmt: skip


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd runs jobs as their user, munged as munge)"
    missing = [name for name in DAEMONS if _find(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y slurm-wlm munge)"
    return None


class SlurmCluster:
    """One node named after this host, all its CPUs and 3/4 of its memory, one partition `test`.

    Args:
        root: Folder for the cluster's files (created; the `munge` user must be able to reach it, so not under
            pytest's tmp_path, which only root can enter).
        requeue_delay_s: How long a requeued job waits before it may start again (SLURM's `cred_expire`; the
            default 120 s of a real cluster would make a test of several requeues take minutes of waiting).
    """

    def __init__(self, root: Path, requeue_delay_s: int = 5):
        self.root = Path(root)
        self.requeue_delay_s = requeue_delay_s
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}

    def env(self, base: dict | None = None) -> dict:
        """`base` (default: this process's environment) with `SLURM_CONF` pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_find("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited at start: {self._log_tail(name)}")
            state = subprocess.run([_find("sinfo"), "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True,
                                   text=True)  # fmt: skip
            if state.returncode == 0 and state.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise SlurmUnavailable(f"the node did not come up within {timeout_s:.0f} s: {self._log_tail('slurmd')}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _start_munge(self) -> None:
        # munged insists: its key readable by it alone, its socket's folder open to all (clients connect there)
        key_dir, run_dir = self.root / "munge" / "key", self.root / "munge" / "run"
        for folder, mode in ((key_dir, 0o700), (run_dir, 0o755)):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
            os.chmod(folder, mode)
        key = key_dir / "munge.key"
        subprocess.run([_find("mungekey"), "--create", "--force", "--keyfile", str(key)], check=True,
                       capture_output=True)  # fmt: skip
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o600)
        self.munge_socket = run_dir / "munge.socket"
        cmd = ["runuser", "-u", "munge", "--", _find("munged"), "--foreground", f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={run_dir / 'munged.pid'}", f"--seed-file={key_dir / 'munged.seed'}",
               f"--log-file={run_dir / 'munged.log'}"]  # fmt: skip
        self._spawn("munged", cmd)
        for _ in range(100):
            if self.munge_socket.exists():
                return
            if self._procs["munged"].poll() is not None:
                break
            time.sleep(0.1)
        raise SlurmUnavailable(f"munged did not start: {self._log_tail('munged')}")

    def _write_conf(self) -> None:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 3 // 4
        auth = f"socket={self.munge_socket},cred_expire={self.requeue_delay_s}"
        lines = [
            "ClusterName=capline-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo={auth}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # requeued jobs start within seconds of their delay
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=30",
            "MpiDefault=none",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log/slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log/slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "wb")  # noqa: SIM115 (the daemon keeps it open)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        self._procs[name] = proc

    def _log_tail(self, name: str) -> str:
        texts = [p.read_text(errors="replace")[-800:] for p in (self.root / "log").glob(f"{name}*") if p.is_file()]
        return " | ".join(t.strip() for t in texts if t.strip()) or "(no log)"
