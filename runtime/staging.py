"""A persistent host buffer and its device twin: the one way step data reaches the device.

On the CPU the host buffer is the tensor the step uses. Elsewhere the host buffer is page-locked and `upload`
is an asynchronous copy into a preallocated device buffer, so building a step never waits on the device.
"""

from __future__ import annotations

import numpy as np
import torch


class StagingBuffer:
    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.on_host = device.type == "cpu"
        self.host = torch.zeros(size, dtype=dtype, pin_memory=not self.on_host)
        self.np: np.ndarray = self.host.numpy()  # fill through this view: numpy slicing is cheap per call
        self.device = self.host if self.on_host else torch.zeros(size, dtype=dtype, device=device)

    def upload(self, n: int) -> torch.Tensor:
        """The first n values on the device."""
        if not self.on_host:
            self.device[:n].copy_(self.host[:n], non_blocking=True)
        return self.device[:n]
