"""The ``deepspeed`` launcher over ssh (README, "Running at scale"), run for real: a hostfile of two
nodes that are both this machine (``localhost`` and ``127.0.0.1``, one slot each), so that DeepSpeed
takes its multi-node path: ``pdsh`` logs into each node through ssh and starts one
``deepspeed.launcher.launch`` there. The nodes are reached through a private sshd on a free port of
127.0.0.1, with its own host key, client key and configuration in a tmp folder; nothing is written
to ~/.ssh or /etc/ssh.

The run must train exactly like the torchrun reference of test_cluster_launch.py (2 ranks, same
recipe, micro-batches and seeds): every step's loss equal, not close.

Needs pdsh and openssh-server (scripts/setup.sh installs them) and root; skips, with the reason,
without them. Marked slow (1-2 min): deselect with -m "not slow".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed import test_cluster_launch as cluster
from tests.distributed.launching import check_ok, free_port, kill_tree, losses, run

SSHD = Path("/usr/sbin/sshd")  # sshd re-executes itself and so must be started by its absolute path
NODES = ("localhost", "127.0.0.1")  # two names, two nodes to DeepSpeed; both are this machine
# The ssh'd shell does not inherit the launcher's environment: DeepSpeed forwards PYTHONPATH (and a
# few prefixes) plus the lines of its .deepspeed_env file. What a rank needs beyond that: the venv
# first on PATH (ninja, for DeepSpeed's JIT-built shm op), the persistent extensions folder (else
# the op is rebuilt for ~1 min), the asset cache, offline hubs, and one thread per rank (the thread
# count changes CPU reductions, so without it the losses drift from the reference's).
RANK_ENV = ("PATH", "TORCH_EXTENSIONS_DIR", "MOLORA_CACHE", "OMP_NUM_THREADS", "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")  # fmt: skip

reference = cluster.reference  # the torchrun run the other launchers are held to (a fixture)


@dataclass(frozen=True)
class Sshd:
    port: int
    options: tuple[str, ...]  # what an ssh client needs to log in: the key, no known_hosts, no prompts


def _start_sshd(d: Path) -> tuple[subprocess.Popen, Sshd]:
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    config = [
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {d}/host_key", f"AuthorizedKeysFile {d}/authorized_keys",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "StrictModes no", "UsePAM no", f"PidFile {d}/sshd.pid",
    ]  # fmt: skip
    (d / "sshd_config").write_text("\n".join(config) + "\n")
    # sshd refuses to start without its privilege-separation directory, which its init script makes.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    # In the foreground (-D), in a session of its own: kill_tree then reaches every login it forked.
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], start_new_session=True
    )
    options = ("-i", str(d / "client_key"), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "LogLevel=ERROR")  # fmt: skip
    return proc, Sshd(port, options)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[Sshd]:
    missing = [tool for tool in ("pdsh", "ssh", "ssh-keygen") if not shutil.which(tool)]
    missing += [] if SSHD.exists() else [str(SSHD)]
    if missing:
        pytest.skip(
            f"needs pdsh and openssh-server (scripts/setup.sh installs them); not found: {', '.join(missing)}"
        )
    if os.geteuid() != 0:
        pytest.skip(
            "the private sshd needs root (its privilege-separation directory /run/sshd, logins as root)"
        )
    d = tmp_path_factory.mktemp("sshd")
    proc, server = _start_sshd(d)
    try:
        login = ["ssh", *server.options, "-p", str(server.port), NODES[0], "true"]
        end = time.monotonic() + 30
        while subprocess.run(login, capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > end:
                log = (d / "sshd.log").read_text() if (d / "sshd.log").exists() else ""
                pytest.fail(
                    f"cannot log in over ssh on port {server.port} (sshd exit code {proc.poll()}):\n{log}"
                )
            time.sleep(0.2)
        yield server
    finally:
        kill_tree(proc.pid)  # sshd and any login a failed run left behind
        proc.wait()


@pytest.mark.distributed
@pytest.mark.slow  # 1-2 min on 2 cores: the torchrun reference (~45 s), then the launch over ssh (~60 s)
def test_deepspeed_over_ssh_on_two_nodes_trains_like_torchrun(sshd, reference, tmp_path):
    out, hostfile, env_file = tmp_path / "run", tmp_path / "hostfile", tmp_path / "deepspeed_env"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
    env_file.write_text("".join(f"{name}={os.environ[name]}\n" for name in RANK_ENV))
    # DS_ENV_FILE replaces the .deepspeed_env DeepSpeed reads from ~ or the working directory. Its
    # PDSHRunner adds `-p <ssh_port>` to PDSH_SSH_ARGS_APPEND; the rest of the ssh options come from
    # here. Its ssh pre-check runs plain `ssh` (root's default keys), so it is skipped: the first
    # login of the run checks the same thing.
    env = os.environ | {"DS_ENV_FILE": str(env_file), "PDSH_SSH_ARGS_APPEND": " ".join(sshd.options)}
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--ssh_port", str(sshd.port), "launch/train.py", *cluster.ARGS,
           "--output-dir", str(out)]  # fmt: skip
    text = check_ok(run(cmd, env=env))

    assert f"Running on the following workers: {','.join(NODES)}" in text  # the pdsh path
    assert f"deepspeed_env file = {env_file}" in text
    for node_rank, node in enumerate(NODES):  # pdsh prefixes each line with the node it came from
        started = rf"^{re.escape(node)}: .*nnodes=2, num_local_procs=1, node_rank={node_rank}$"
        assert re.search(started, text, re.MULTILINE), (
            f"no launcher started over ssh on {node}:\n{text[-4000:]}"
        )
    assert cluster.SUMMARY in text
    assert cluster.finished(out)
    assert losses(out) == reference
