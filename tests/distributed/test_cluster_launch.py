"""The cluster launchers, run for real: ``launch/mpirun.sh`` (Open MPI) and ``launch/slurm.sbatch`` on
a local Slurm of two emulated nodes (slurmctld and two slurmd on this machine, as in the cluster
notes), including a preemption: SIGUSR1 -> checkpoint and exit 0 -> the job requeues itself ->
the next segment resumes and finishes.

Each run is compared with one ``torchrun`` run of the same recipe (2 ranks, ZeRO-2): same process
count, micro-batches and seeds, so every step's loss must be equal, not close; a preempted and
resumed run too (the trainer's resume is exact, see test_resume.py).

The Slurm tests need slurm-wlm and munge (scripts/setup.sh installs them) and root (the daemons
run as root); they skip, with the reason, without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from molora_ds import checkpoint
from tests.distributed.launching import ROOT, RUN_TIMEOUT, check_ok, free_port, losses, resumed_step, run

STEPS = 40  # ~0.2 s each: long enough that SIGUSR1, sent after step 1, lands mid-run
RECIPE, CONFIG = "recipes/tiny.yaml", "ds_configs/zero2.json"
SETTINGS = ["--set", f"train.max_steps={STEPS}", "--set", "eval.before=false", "--set", "eval.after=false"]
ARGS = ["--config", CONFIG, "--recipe", RECIPE, *SETTINGS]
SUMMARY = "2 processes x micro-batch 2 x accumulation 2 = global batch 8; ZeRO-2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the same run under torchrun, the launcher the other tests trust."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "launch/train.py", *ARGS, "--output-dir", str(out)]  # fmt: skip
    assert SUMMARY in check_ok(run(cmd))
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def finished(out: Path) -> bool:
    return json.loads((out / "results.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------------------- Open MPI
@pytest.mark.distributed
@pytest.mark.skipif(
    not shutil.which("mpirun"), reason="needs Open MPI's mpirun (scripts/setup.sh: openmpi-bin)"
)
def test_mpirun_trains_like_torchrun(reference, tmp_path):
    out = tmp_path / "run"
    env = os.environ | {"MOLORA_MASTER_PORT": str(free_port())}
    text = check_ok(
        run(["bash", "launch/mpirun.sh", "-np", "2", "--", *ARGS, "--output-dir", str(out)], env=env)
    )
    assert SUMMARY in text
    assert finished(out)
    assert losses(out) == reference


# ---------------------------------------------------------------------------- Slurm
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # munged, slurmctld, slurmd
SLURM_TOOLS = ("munge", "munged", "runuser", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo",
               "squeue")  # fmt: skip
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"}


def wait_for(done: Callable[[], object], what: str, timeout: float, details: Callable[[], str] = str) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _terminate(pid: int) -> None:
    """SIGTERM, and SIGKILL if the process is still there 20 s later."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        end = time.monotonic() + grace
        while not _gone(pid) and time.monotonic() < end:
            time.sleep(0.1)
        if _gone(pid):
            return


class Slurm:
    """A Slurm cluster of two emulated nodes, n1 and n2, both at 127.0.0.1: one slurmctld and one
    slurmd per node on this machine, their ports picked free, their files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = os.environ | {"SLURM_CONF": str(root / "slurm.conf")}  # for the clients and the job
        self.pids: list[int] = []  # the daemons started here, in order

    def __call__(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        """Run a client command (sbatch, scontrol, ...); its stdout."""
        result = subprocess.run(
            cmd, env=env or self.env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{' '.join(cmd)} exited with {result.returncode}: {result.stderr}"
        return result.stdout

    def start(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged running
            run_dir = Path("/run/munge")
            run_dir.mkdir(exist_ok=True)
            shutil.chown(run_dir, "munge", "munge")
            cmd = [shutil.which(tool, path=SBIN) for tool in ("runuser", "munged")]
            subprocess.run([cmd[0], "-u", "munge", "--", cmd[1]], check=True)
            self.pids.append(self._pid(run_dir / "munged.pid"))
        self._write_conf()
        for daemon, pid_file in ((["slurmctld"], "slurmctld"), (["slurmd", "-N", "n1"], "slurmd-n1"),
                                 (["slurmd", "-N", "n2"], "slurmd-n2")):  # fmt: skip
            cmd = [shutil.which(daemon[0], path=SBIN), "-f", self.env["SLURM_CONF"], *daemon[1:]]
            subprocess.run(cmd, env=self.env, check=True)  # each daemonizes and writes its pid file
            self.pids.append(self._pid(self.root / f"{pid_file}.pid"))
        wait_for(self.idle, "2 idle nodes", 60, self.logs)

    def idle(self) -> bool:
        return self("sinfo", "-h", "-o", "%D %t").split() == ["2", "idle"]

    def stop(self) -> None:
        try:
            # Without a slurmctld, clients look for one in DNS for a while: ask only if it started.
            if (self.root / "slurmctld.pid").exists() and self.jobs():
                self("scancel", *self.jobs())
                wait_for(lambda: not self.jobs(), "the cancelled jobs to end", 60, self.logs)
        finally:
            for pid in reversed(self.pids):
                _terminate(pid)

    def _write_conf(self) -> None:
        d, host = self.root, socket.gethostname().split(".")[0]
        for name in ("state", "log", "spool/slurmd-n1", "spool/slurmd-n2"):
            (d / name).mkdir(parents=True)
        lines = [
            "ClusterName=molora", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/slurmd-%n", f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid", f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
            "MpiDefault=none", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none", "KillWait=10",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "SwitchType=switch/none",
            *(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs=1 "
              "RealMemory=1000 State=UNKNOWN" for node in ("n1", "n2")),
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP",
        ]  # fmt: skip
        (d / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _pid(self, pid_file: Path) -> int:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), str(pid_file), 30, self.logs)
        return int(pid_file.read_text())

    def logs(self) -> str:
        return "".join(f"--- {p}:\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("log/*")))

    def jobs(self) -> list[str]:
        cmd = ["squeue", "-h", "-o", "%i"]  # no output (and an error) if slurmctld is down
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60).stdout.split()

    def submit(
        self,
        out: Path,
        script: str = "launch/slurm.sbatch",
        args: tuple[str, ...] = (*ARGS,),
        options: tuple[str, ...] = ("--ntasks-per-node", "1"),
        env: dict[str, str] | None = None,
    ) -> tuple[int, Path]:
        """``sbatch`` a product script on both nodes: the job id and its log."""
        cmd = ["sbatch", "--parsable", "-N", "2", *options, f"--output={out.parent}/slurm-%j.out", script, *args,
               "--output-dir", str(out)]  # fmt: skip
        job_id = int(self(*cmd, env=self.env | {"MASTER_PORT": str(free_port())} | (env or {})))
        return job_id, out.parent / f"slurm-{job_id}.out"

    def wait_job(
        self, job_id: int, log: Path, until: Callable[[dict[str, str]], bool], what: str
    ) -> dict[str, str]:
        """The job's fields (``scontrol show job``) once ``until(fields)`` holds or the job has ended."""
        end = time.monotonic() + RUN_TIMEOUT
        while True:
            fields = dict(
                re.findall(r"(?<!\S)(\w+)=(\S*)", self("scontrol", "-o", "show", "job", str(job_id)))
            )
            if until(fields) or fields["JobState"] not in ACTIVE:
                return fields
            if time.monotonic() > end:
                pytest.fail(f"timed out waiting for {what} ({fields['JobState']}):\n{tail(log)}")
            time.sleep(0.2)


def tail(log: Path) -> str:
    return log.read_text()[-4000:] if log.exists() else f"(no {log})"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[Slurm]:
    missing = [tool for tool in SLURM_TOOLS if not shutil.which(tool, path=SBIN)]
    if missing:
        pytest.skip(
            f"needs slurm-wlm and munge (scripts/setup.sh installs them); not found: {', '.join(missing)}"
        )
    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.distributed
def test_sbatch_on_two_nodes_trains_like_torchrun(slurm, reference, tmp_path):
    out = tmp_path / "run"
    job, log = slurm.submit(out)
    fields = slurm.wait_job(job, log, lambda _: False, "the job to end")
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)
    assert (fields["NodeList"], fields["Restarts"]) == ("n[1-2]", "0")
    assert SUMMARY in log.read_text()
    assert finished(out)
    assert losses(out) == reference


def preempt_and_resume(slurm: Slurm, job: int, log: Path, out: Path, reference: dict[int, float]) -> None:
    """SIGUSR1 to the job's tasks, as ``--signal=USR1@...`` sends it before the time limit: the trainer
    checkpoints and exits, the script requeues the job (the run's status decides, not the launcher's
    exit code), and the next segment resumes from that checkpoint to the same losses as an
    uninterrupted run."""
    logged_a_step = lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0
    fields = slurm.wait_job(job, log, lambda _: logged_a_step(), "the first step")
    assert fields["JobState"] == "RUNNING", tail(log)

    slurm("scancel", "--signal=USR1", str(job))
    requeued = lambda f: (f["JobState"], f["Restarts"]) == ("PENDING", "1")
    fields = slurm.wait_job(job, log, requeued, "the requeue")
    assert requeued(fields), f"{fields['JobState']}, restarts {fields['Restarts']}:\n{tail(log)}"
    results = json.loads((out / "results.json").read_text())
    stopped = results["step"]
    assert results["status"] == "preempted" and 1 <= stopped < STEPS, results
    assert checkpoint.read_meta(checkpoint.find_latest(out / "checkpoints"))["step"] == stopped
    assert not (out / "adapter").exists()

    # Slurm holds a requeued job for ~2 min (its EligibleTime), until the credential of the first
    # segment, revoked at whole-second resolution, has expired. Release it as an operator would,
    # once the nodes are idle and a second has passed: a relaunch within the second of the
    # revocation is refused ("Job credential revoked") and the job fails.
    wait_for(slurm.idle, "the nodes to be idle after the requeue", 60, slurm.logs)
    time.sleep(1.5)
    slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
    fields = slurm.wait_job(job, log, lambda _: False, "the second segment to end")
    state = (fields["JobState"], fields["ExitCode"], fields["Restarts"])
    assert state == ("COMPLETED", "0:0", "1"), tail(log)
    assert resumed_step(log.read_text()) == stopped
    assert finished(out)
    assert losses(out) == reference


@pytest.mark.distributed
def test_sbatch_preempted_job_requeues_itself_and_resumes_exactly(slurm, reference, tmp_path):
    out = tmp_path / "run"
    job, log = slurm.submit(out)
    preempt_and_resume(slurm, job, log, out, reference)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("script", ["glm4_9b", "llava_7b"])
def test_per_model_sbatch_preempted_requeues_and_resumes_exactly(slurm, reference, tmp_path, script):
    """``launch/slurm/<model>.sbatch`` as a user submits it, one torchrun per node with c10d rendezvous
    on the first node, with the recipe and config overridden from the environment (the tiny recipe,
    ZeRO-2), one rank per node and no GPUs (the emulated nodes have none). Its torchrun forwards
    SIGUSR1 to the ranks and then exits non-zero, so this checks that the requeue does not depend on
    the launcher's exit code."""
    out = tmp_path / "run"
    env = {"RECIPE": RECIPE, "CONFIG": CONFIG, "GPUS_PER_NODE": "1"}
    job, log = slurm.submit(out, f"launch/slurm/{script}.sbatch", (*SETTINGS,), ("--gpus-per-node=0",), env)
    preempt_and_resume(slurm, job, log, out, reference)
    assert SUMMARY in log.read_text()
