"""What a run config targets, checked before any weight loads: the config, its checkpoint folder, that folder's
config.json and the request limits they set. `target_of` checks as much as a command needs before it loads its
one model (the YAML, the folder, config.json); `checked_target` goes on as the engine will, still without reading a
weight (the backend, built then dropped, and its verdict on the model; the checkpoint's tensor set from the shard
headers; a W8A8 description and whether the backend runs it), so a command that runs several configurations in
turn (parity, fingerprint probes) refuses a bad one before loading any."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moerun.backends.base import get_backend_class
from moerun.backends.errors import MoerunError
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.engine import resolve_model_folder
from moerun.runtime.launch import build_backend
from moerun.runtime.limits import RequestLimits
from moerun.runtime.loader import validate_checkpoint
from moerun.runtime.model_config import ModelConfig, load_model_config
from moerun.runtime.run_config import RunConfig
from moerun.runtime.w8a8_weights import check_loadable


@dataclasses.dataclass(frozen=True)
class Target:
    run: RunConfig
    folder: Path
    config: ModelConfig
    limits: RequestLimits

    def check_prompt(self, token_ids: list[int], what: str) -> None:
        """The checks a request's prompt meets: ids in the vocabulary, length within the context."""
        if not token_ids:
            raise MoerunError(f"{what}: no token ids")
        self.limits.check_token_ids(token_ids, what)
        self.limits.check_lengths([len(token_ids)], f"{what} ({len(token_ids)} tokens)")


def target_of(run: RunConfig) -> Target:
    """The checkpoint folder (the random demo is built on first use) and its config.json, each checked."""
    folder = resolve_model_folder(run.model_path)
    cfg = load_model_config(folder)
    return Target(run, folder, cfg, RequestLimits.of(run, cfg))


def checked_target(run: RunConfig) -> Target:
    """target_of, then the layer count, the backend's verdict and the checkpoint's tensor set."""
    target = target_of(run)
    cfg = target.config
    layers = run.num_layers or cfg.num_layers
    block_size = run.kv_block_size or get_backend_class(run.backend).capabilities.kv_block_sizes[0]
    backend = build_backend(run, cfg, layers, block_size)
    ckpt = Checkpoint(target.folder)
    validate_checkpoint(ckpt, cfg, layers)
    if ckpt.description is not None:  # a W8A8 checkpoint, which only a backend executing W8A8 loads
        check_loadable(backend)
    return target
