"""Joining a world of ranks started by torchrun (env:// rendezvous: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), on one node or several, and building this rank's Communicator.

Without torchrun's variables the world is one rank and nothing is initialized. A rank that never joins ends the
others when init_timeout_s runs out, each with one line (PeerLostError)."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch.distributed as dist

from moerun.backends.errors import ConfigError
from moerun.runtime.communicator import Communicator, Group, PeerLostError, failure_reason
from moerun.runtime.shard_plan import ShardPlan

HOST_BACKEND = "gloo"  # host tensors (the step broadcasts) travel over gloo whatever the devices use


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """This process's place in the world, as torchrun sets it; one rank of one when it is not set."""
    env = os.environ if environ is None else environ
    values = {}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = env.get(key)
        try:
            values[key] = int(text) if text is not None else (1 if key == "WORLD_SIZE" else 0)
        except ValueError:
            raise ConfigError(f"{key}={text!r} in the environment is not an integer (torchrun sets it)") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local} in the environment do not fit "
                          f"together (0 <= RANK < WORLD_SIZE)")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ConfigError(f"WORLD_SIZE is {world} but {' and '.join(missing)} is not set: launch with "
                              f"torchrun --nproc-per-node N -m moerun ...")
    return LaunchEnv(world, rank, local)


def connect(env: LaunchEnv, plan: ShardPlan, backend: str, timeout_s: float) -> Communicator:
    """Join the world (every rank calls this, in the same order of groups) and return this rank's groups."""
    if env.world_size == 1:
        return Communicator()
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, init_method="env://", world_size=env.world_size, rank=env.rank,
                                timeout=timeout)
        world = _group(list(range(env.world_size)), env.rank, dist.group.WORLD)
        tp = world if plan.tp == env.world_size else Group(ranks=(env.rank,))
        if 1 < plan.tp < env.world_size:
            for ranks in plan.tp_groups():  # new_group is collective: every rank creates every group, in order
                handle = dist.new_group(ranks, timeout=timeout, backend=backend)
                if env.rank in ranks:
                    tp = _group(ranks, env.rank, handle)
        host = world if backend == HOST_BACKEND else _group(
            list(range(env.world_size)), env.rank, dist.new_group(timeout=timeout, backend=HOST_BACKEND))
    except (RuntimeError, dist.DistError) as e:
        raise PeerLostError(f"rank {env.rank}: the world of {env.world_size} ranks did not come together within "
                            f"parallel.init_timeout_s = {timeout_s:g} s at {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')} ({failure_reason(e)})") from None
    return Communicator(world=world, tp=tp, host=host)


def _group(ranks: list[int], rank: int, handle) -> Group:
    return Group(rank=ranks.index(rank), size=len(ranks), ranks=tuple(ranks), handle=handle)
