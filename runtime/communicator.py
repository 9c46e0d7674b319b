"""The collectives the graph and the step loop call, written once over torch.distributed.

A `Group` is the ranks that take part in one collective together: the world, or a rank's TP group. A single-rank
group's collectives return their input untouched, so a world of one costs nothing. The process-group backend
(gloo, nccl, hccl) is the device backend's choice (Backend.process_group_backend); this file never names a device.

A collective that fails because another rank died, was stopped, or did not answer within the process-group
timeout raises PeerLostError: one line, on every surviving rank, instead of a hang or a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from moerun.backends.errors import MoerunError


class PeerLostError(MoerunError):
    """Another rank is gone or silent: this rank cannot go on. Not bad input, so exit code 1."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Group:
    rank: int = 0  # this rank's index within the group
    size: int = 1
    ranks: tuple[int, ...] = (0,)  # the group's global ranks, in group order
    handle: Any = None  # torch.distributed ProcessGroup; None for a single rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns the tensor."""
        if self.size > 1:
            with self._collective("all_reduce", tensor):
                dist.all_reduce(tensor, group=self.handle)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*shape] on every rank -> [size, *shape], rank i's tensor at index i."""
        if self.size == 1:
            return tensor[None]
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.size, *tensor.shape))
        with self._collective("all_gather", tensor):
            dist.all_gather(list(out.unbind(0)), tensor, group=self.handle)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank src's tensor into every rank's `tensor`, in place."""
        if self.size > 1:
            with self._collective("broadcast", tensor):
                dist.broadcast(tensor, src=self.ranks[src], group=self.handle)
        return tensor

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts[:i]), +send_counts[i]) of `tensor` go to group rank i; returns the rows received,
        rank i's first. The exchange token dispatch to expert owners needs (see docs/parallelism.md)."""
        if self.size == 1:
            return tensor
        out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        with self._collective("all_to_all", tensor):
            dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=self.handle)
        return out

    @contextlib.contextmanager
    def _collective(self, name: str, tensor: torch.Tensor) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            raise PeerLostError(
                f"rank {self.ranks[self.rank]}: {name} of {list(tensor.shape)} across ranks {list(self.ranks)} "
                f"failed ({failure_reason(e)}): another rank died, was stopped, or did not answer within "
                f"parallel.init_timeout_s") from None


def failure_reason(error: BaseException) -> str:
    """The first sentence of a collective library's error, without its source-file prefix
    ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:28817. This is typically ...")."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". ")[0].rstrip(".") or type(error).__name__


@dataclasses.dataclass(frozen=True)
class Communicator:
    """The groups of one rank: the world, its TP group, and `host`, the world over gloo for the step broadcasts of
    host tensors (the world itself when the device backend is gloo)."""

    world: Group = Group()
    tp: Group = Group()
    host: Group = Group()
    owns_world: bool = False  # this communicator initialized torch.distributed, so it ends it

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that schedules, samples and talks to the user."""
        return self.world.rank == 0

    def close(self) -> None:
        if not dist.is_initialized():
            return
        own_groups = [g.handle for g in (self.tp, self.host) if g.handle not in (None, self.world.handle)]
        for handle in own_groups:
            dist.destroy_process_group(handle)
        if self.owns_world:
            dist.destroy_process_group()
