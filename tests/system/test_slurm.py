"""System test: `sbatch slurm/pop_smoke.sh` on a real Slurm cluster started on this machine.

Debian's Slurm 22.05 (installed with apt-get when missing; CI runs as root) runs with its own
munge key in a temporary folder, the host split into two logical nodes so that a heterogeneous
job can start (``shared/notes/slurm_local.md``). One job runs both het groups, the critic
server (group 0) and the trainer (group 1, tests/conf/tiny.yaml, 2 steps), and is interrupted
twice:

1. ``scancel --batch --signal=USR1`` while the trainer is in step 1 (what ``--signal=B:USR1@N``
   does before the time limit): the trainer finishes the step, checkpoints and exits 75, and
   the batch script requeues the job;
2. ``scontrol requeue`` of the running job after the restart (a hard kill of both groups).

Each restart resumes from the checkpoint; the run ends with exactly steps 1 and 2. The daemons
(and any process of this cluster's jobs) are always stopped in a finalizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.processes import stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "mungekey"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ensure_slurm() -> None:
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (CI runs as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        timeout=600,
        env=env,
        capture_output=True,
    )


def _lab_pids(conf: Path) -> list[int]:
    """Processes whose environment names this cluster's slurm.conf: our daemons' children and
    job steps (slurmstepd detaches from slurmd, so it is found this way)."""
    needle = f"SLURM_CONF={conf}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


class Cluster:
    def __init__(self, lab: Path):
        self.lab = lab
        self.conf = lab / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def start(self) -> None:
        lab = self.lab
        for d in ("munge", "state", "spool/n1", "spool/n2", "log", "run"):
            (lab / d).mkdir(parents=True, exist_ok=True)
        (lab / "munge").chmod(0o755)  # munged refuses a socket directory others cannot traverse
        key, sock = lab / "munge" / "munge.key", lab / "munge" / "munge.socket.2"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={lab}/munge/munged.pid",
                f"--log-file={lab}/munge/munged.log",
                f"--seed-file={lab}/munge/munged.seed",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.munged_pid = int((lab / "munge" / "munged.pid").read_text())
        host = socket.gethostname().split(".")[0]
        ctld, p1, p2 = _free_ports(3)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=poptest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock},cred_expire=5",  # a requeued job starts ~6 s later
                    "MailProg=/bin/true",
                    f"SlurmctldPort={ctld}",
                    f"StateSaveLocation={lab}/state",
                    f"SlurmdSpoolDir={lab}/spool/%n",
                    f"SlurmctldPidFile={lab}/run/slurmctld.pid",
                    f"SlurmdPidFile={lab}/run/slurmd-%n.pid",
                    f"SlurmctldLogFile={lab}/log/slurmctld.log",
                    f"SlurmdLogFile={lab}/log/slurmd-%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=bf_interval=1,sched_interval=2",  # hetjobs start from backfill
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "KillWait=2",
                    "MinJobAge=600",
                    f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=1 RealMemory=4000",
                    f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=1 RealMemory=4000",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        logs = lab / "log"
        for name, cmd in [
            ("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)]),
            ("slurmd-n1", ["slurmd", "-D", "-N", "n1", "-f", str(self.conf)]),
            ("slurmd-n2", ["slurmd", "-D", "-N", "n2", "-f", str(self.conf)]),
        ]:
            with open(logs / f"{name}.out", "wb") as out:
                self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while True:
            p = self.run("sinfo", "-h", "-o", "%T", check=False)
            if p.returncode == 0 and p.stdout.split() and set(p.stdout.split()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Slurm nodes not idle after 60 s: {p.stdout}{p.stderr}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.lab / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Jobs first, then slurmd, then slurmctld, then munged (the order that never hangs)."""
        if self.conf.exists():
            self.run("scancel", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                q = self.run("squeue", "-h", check=False)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        for p in reversed(self.procs):  # slurmd n2, n1, then slurmctld
            stop(p, 10)
        for pid in _lab_pids(self.conf):  # anything of this cluster still alive (job steps)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("the local Slurm cluster needs Linux")
    _ensure_slurm()
    # munged wants every directory above its socket traversable by all (pytest's tmp is 0700).
    lab = Path(tempfile.mkdtemp(prefix="pop-slurm-", dir="/tmp"))
    lab.chmod(0o755)
    c = Cluster(lab)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(lab, ignore_errors=True)


def _wait_for(what: str, cond, timeout_s: float, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{on_fail()}")
        time.sleep(0.5)


def _job_field(c: Cluster, job: str, key: str) -> str:
    p = c.run("scontrol", "show", "job", job, check=False)
    m = re.search(rf"\b{key}=(\S+)", p.stdout)
    return m.group(1) if m else ""


def _nudge(c: Cluster, job: str) -> None:
    """Start a requeued, eligible het job now. It becomes eligible ~6 s after the requeue
    (cred_expire=5), but only the backfill scheduler starts het jobs, and it skips its cycles
    while no job or node changes, which on this otherwise idle cluster means ~2 min. Setting
    StartTime=now is such a change; a busy cluster needs no nudge."""
    if _job_field(c, job, "JobState") != "PENDING":
        return
    eligible = _job_field(c, job, "EligibleTime")
    if eligible and eligible != "Unknown" and time.strftime("%Y-%m-%dT%H:%M:%S") > eligible:
        c.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)


def test_smoke_hetjob_runs_and_resumes_after_usr1_and_requeue(cluster: Cluster, tmp_path: Path, model_path):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    (port,) = _free_ports(1)
    env = {
        **cluster.env,
        "POP_ROOT": str(ROOT),
        "POP_NEMO": f"{sys.executable} -m pop_nemo.cli",
        "CONFIG": "tests/conf/tiny.yaml",
        "CRITIC_CONFIG": "tests/conf/critic_tiny.yaml",
        "OUTPUT_DIR": str(run),
        "CRITIC_PORT": str(port),
        "CRITIC_WAIT_S": "300",
        "NUM_THREADS": "1",
        "TRAIN_OVERRIDES": "trainer.max_steps=2 trainer.save_every=1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("POP_NEMO_CRITIC_TOKEN", None)
    sub = subprocess.run(
        ["sbatch", "--parsable", "-o", str(out), "-e", str(out), str(ROOT / "slurm" / "pop_smoke.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sub.returncode == 0, sub.stderr
    job = re.match(r"\d+", sub.stdout.strip()).group(0)

    def text() -> str:
        return out.read_text(errors="replace") if out.exists() else ""

    def debug() -> str:
        critic = "\n".join(f.read_text(errors="replace")[-2000:] for f in (run / "logs").glob("*.log"))
        state = cluster.run("scontrol", "show", "job", job, check=False).stdout
        return f"--- job output\n{text()[-6000:]}\n--- critic\n{critic}\n--- scontrol\n{state}\n{cluster.logs()}"

    # Both het groups start: the critic is healthy, then the trainer is inside train().
    _wait_for("the trainer to start", lambda: "pop-nemo train" in text(), 240, debug)
    # 1. USR1 to the batch script (as --signal=B:USR1@N does): checkpoint after step 1, requeue.
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    restart = "job {} restart {}:".format
    _wait_for("the restart after USR1", lambda: _nudge(cluster, job) or restart(job, 1) in text(), 300, debug)
    first = text()
    assert "USR1: asking the trainer to checkpoint and stop" in first
    assert re.search(r"stopping after step 1 on SIGUSR1", first), debug()
    assert (run / "checkpoints" / "step_000001" / "state.json").is_file()
    # 2. The restarted job resumes from step 1; requeue it while it is in step 2.
    _wait_for("the resume after USR1", lambda: text().count("resumed from") >= 1, 240, debug)
    cluster.run("scontrol", "requeue", job)
    _wait_for("the restart after requeue", lambda: _nudge(cluster, job) or restart(job, 2) in text(), 120, debug)
    _wait_for("the job to finish", lambda: _job_field(cluster, job, "JobState") in {"COMPLETED", "FAILED"}, 400, debug)
    assert _job_field(cluster, job, "JobState") == "COMPLETED", debug()

    log = text()
    assert log.count("resumed from") == 2, debug()  # after USR1, and after the requeue
    assert "(step 1)" in log.split("resumed from")[1]
    assert re.search(r"critic: n1 at http://127\.0\.0\.1:\d+; trainer: n2", log), debug()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # the interrupted step 2 was cut back and redone
    assert all(m["judge_valid_rate"] is not None for m in metrics)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["critic"]["url"] == f"http://127.0.0.1:{port}"  # judged by the group-0 server
    assert (run / "checkpoints" / "step_000002" / "state.json").is_file()
