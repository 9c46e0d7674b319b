"""Joining a world of ranks started by torchrun (env:// rendezvous: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), on one node or several, and building this rank's backend (on its own device) and Communicator.

Without torchrun's variables the world is one rank and nothing is initialized. A rank that never joins ends the
others when init_timeout_s runs out, each with one line (PeerLostError)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import torch.distributed as dist

from moerun.backends.base import Backend, ModelSpec, get_backend_class
from moerun.backends.errors import ConfigError
from moerun.runtime.communicator import Communicator, Group, PeerLostError, failure_reason
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.run_config import RunConfig
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
    joined = not dist.is_initialized()  # a second engine in the same processes reuses the world
    try:
        if joined:
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
    return Communicator(world=world, tp=tp, host=host, owns_world=joined)


def _group(ranks: list[int], rank: int, handle) -> Group:
    return Group(rank=ranks.index(rank), size=len(ranks), ranks=tuple(ranks), handle=handle)


@dataclasses.dataclass
class Placement:
    """This process's share of a run: its backend (on its own device), its ShardPlan and its groups."""

    backend: Backend
    plan: ShardPlan
    comm: Communicator


def build_backend(run: RunConfig, cfg: ModelConfig, num_layers: int, block_size: int,
                  env: LaunchEnv = LaunchEnv()) -> Backend:
    """The run's backend on this rank's device, built (no weights yet), once it has accepted the model: a model its
    kernels cannot run is refused now, not at the first request."""
    backend_cls = get_backend_class(run.backend)
    options = (backend_cls.options_for_rank(run.backend_options, env.local_rank, env.world_size)
               if env.world_size > 1 else run.backend_options)
    backend = backend_cls(options, run.dtype)
    backend.check_model(ModelSpec(
        hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, dtype=run.dtype,
        kv_block_size=block_size, fp8_block=cfg.fp8_block))
    if num_layers > cfg.num_layers:
        raise ConfigError(f"model.num_layers: {num_layers} is more than the checkpoint's {cfg.num_layers} layers")
    return backend


def place(run: RunConfig, cfg: ModelConfig, num_layers: int, block_size: int,
          env: LaunchEnv | None = None) -> Placement:
    """Read torchrun's environment, build the backend on this rank's device, check the layout against the model
    (one line for what cannot work), join the world, and say once (rank 0) what an operator should know."""
    env = env or launch_env()
    plan = run.parallel.plan(env.world_size, env.rank, run.source)
    backend = build_backend(run, cfg, num_layers, block_size, env)
    # FP8 blocks bound the splits only where the backend executes them as stored; dequantized, any split is exact.
    notes = plan.check(cfg, cfg.fp8_block if backend.capabilities.fp8_weights else None)
    comm = connect(env, plan, backend.process_group_backend, run.parallel.init_timeout_s)
    if env.world_size > 1 and env.rank == 0:
        for note in [f"{plan.describe()}, collectives over {backend.process_group_backend}", *notes]:
            print(f"moerun: {note}", file=sys.stderr)
    return Placement(backend, plan, comm)
