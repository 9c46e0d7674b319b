"""The threads a load runs its reads and conversions on.

Each worker converts whole tensors (an expert, a band of rows) with torch ops on one core, and the workers run
side by side: reads (which release the GIL) overlap conversions, and nothing waits at the barrier an intra-op
parallel region ends with, which on a busy machine costs a whole scheduling quantum per op. So during a load
torch runs one thread per op (process-wide, restored after) and the load uses as many workers as torch would
have used threads, capped where memory bandwidth, not cores, is the limit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

MAX_WORKERS = 32
STAGING_BYTES = 16 << 20  # each worker's read buffer for bytes that need converting, a band of rows at a time


class Workers:
    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._local = threading.local()

    def run(self, tasks: list[Callable[[], int]], done: Callable[[int], None]) -> None:
        """Run every task (each returns the checkpoint bytes it read) and wait for all; done(bytes) as each ends.
        The first failure cancels what has not started and is raised here."""
        futures = [self._pool.submit(task) for task in tasks]
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    done(future.result())
        finally:
            for future in pending:
                future.cancel()
            wait(pending)

    def staging(self, nbytes: int, allocate: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """This worker's reused uint8 buffer of at least nbytes (allocate(n) grows it)."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._local.buffer = allocate(max(nbytes, STAGING_BYTES))
        return buffer[:nbytes]


@contextlib.contextmanager
def load_workers() -> Iterator[Workers]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # read by each worker thread when it starts, and by this one until restored
    try:
        with ThreadPoolExecutor(min(threads, MAX_WORKERS), thread_name_prefix="moerun-load") as pool:
            yield Workers(pool)
    finally:
        torch.set_num_threads(threads)
