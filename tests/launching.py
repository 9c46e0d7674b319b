"""Starting moerun on several ranks from a test: torchrun (`python -m torch.distributed.run`, the module the
`torchrun` script runs, here with the interpreter that has moerun installed), or bare processes given torchrun's
variables by hand (to kill one of them deterministically). Ports are found free at run time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

LAUNCH_TIMEOUT_S = 600  # an upper bound on any one launch in a loaded CI runner, never a timing assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    """One intra-op thread per rank (several ranks share the CI runner's cores; torchrun would warn otherwise)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun_command(nproc: int, args: list[str], port: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
            f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}", *args]


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(nproc, args, free_port()), cwd=cwd, env=quiet_env(), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)


def rank_process(rank: int, world_size: int, port: int, args: list[str], cwd: Path) -> subprocess.Popen:
    """One rank of a world, started as torchrun would start it (its variables set by hand)."""
    env = quiet_env(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "moerun", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("moerun: error:")]
