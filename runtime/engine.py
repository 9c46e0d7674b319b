"""The engine: one RunConfig -> backend + checkpoint + graph + paged KV cache, and the steps built on them
(teacher-forced logits, batched generation). Every entry point (CLI, tests, bench) goes through here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moerun.backends.base import ModelSpec, get_backend_class
from moerun.runtime.batch import Sequence, build_step
from moerun.runtime.checkpoint import Checkpoint
from moerun.backends.errors import ConfigError, MoerunError
from moerun.runtime.kv_cache import PagedKVCache
from moerun.runtime.loader import WeightLoader
from moerun.runtime.model import MiniMaxM2Model
from moerun.runtime.model_config import load_model_config
from moerun.runtime.run_config import BUILTIN_DEMO, BUILTIN_RANDOM_DEMO, RunConfig, load_run_config
from moerun.runtime.sampling import SamplingParams, sample

MAX_DECODE_BATCH = 256  # the largest decode batch a backend prepares for (device-graph buckets)


def resolve_model_folder(model_path: str) -> Path:
    if model_path == BUILTIN_DEMO:
        from moerun.runtime.trained_demo import trained_demo_folder

        return trained_demo_folder()
    if model_path == BUILTIN_RANDOM_DEMO:
        from moerun.runtime.demo import ensure_demo_checkpoint

        return ensure_demo_checkpoint()
    return Path(model_path)


class Engine:
    def __init__(self, run: RunConfig, num_layers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.run = run
        self.folder = resolve_model_folder(run.model_path)
        self.config = cfg = load_model_config(self.folder)
        layers = num_layers or run.num_layers or cfg.num_layers
        if layers > cfg.num_layers:
            raise ConfigError(f"model.num_layers: {layers} is more than the checkpoint's {cfg.num_layers} layers")
        self.backend = get_backend_class(run.backend)(run.backend_options, run.dtype)
        block_size = run.kv_block_size or self.backend.capabilities.kv_block_sizes[0]
        # The backend refuses a model its kernels cannot run now, not at the first request.
        self.backend.check_model(ModelSpec(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
            intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, dtype=run.dtype,
            kv_block_size=block_size, fp8_block=cfg.fp8_block))
        weights = WeightLoader(Checkpoint(self.folder), cfg, self.backend).load(layers, progress)
        self.model = MiniMaxM2Model(cfg, weights, self.backend)
        self.cache = PagedKVCache(self.backend, layers, run.kv_num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Decode steps may be replayed as device graphs; prefill always runs the graph eagerly.
        self._decode_forward = self.backend.decode_runner(
            self.model.forward, max_num_seqs=MAX_DECODE_BATCH,
            max_blocks_per_seq=min(run.kv_num_blocks, -(-cfg.max_position_embeddings // block_size)))
        self._tokenizer = None

    @classmethod
    def from_config(cls, config: str | Path | RunConfig, num_layers: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Engine:
        run = config if isinstance(config, RunConfig) else load_run_config(config)
        return cls(run, num_layers=num_layers, progress=progress)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from moerun.runtime.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_folder(self.folder)
        return self._tokenizer

    def check_token_ids(self, token_ids: list[int]) -> None:
        vocab = self.config.vocab_size
        if not token_ids:
            raise MoerunError("no token ids given")
        for i, t in enumerate(token_ids):
            if not 0 <= t < vocab:
                raise MoerunError(f"token id {t} at position {i} is outside the vocabulary (allowed: 0..{vocab - 1})")

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], all_logits: bool = False,
             observe: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run every sequence's not-yet-cached tokens in one packed forward.
        Returns fp32 logits of each sequence's last token [B, V], or of every new token [T, V]."""
        inputs = build_step(seqs, self.cache, self.backend.device)
        forward = self._decode_forward if inputs.meta.is_decode and observe is None else self.model.forward
        hidden = forward(inputs.input_ids, inputs.positions, inputs.meta, self.cache.layers, observe)
        for seq in seqs:
            seq.num_cached = len(seq.token_ids)
        return self.model.compute_logits(hidden if all_logits else hidden[inputs.last_token_rows])

    def release(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.cache.release(seq.block_table)
            seq.num_cached = 0

    def logits(self, token_ids: list[int], observe: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits at every position, fp32 [T, V] on the CPU, through the prefill path."""
        self.check_token_ids(token_ids)
        seq = Sequence(list(token_ids))
        try:
            return self.step([seq], all_logits=True, observe=observe).cpu()
        finally:
            self.release([seq])

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int = 0,
                 stop_ids: tuple[int, ...] = (), on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Batched generation: one packed prefill of all prompts, then batched decode steps of the unfinished ones.
        Returns the generated ids of each prompt (stop token excluded)."""
        for p in prompts:
            self.check_token_ids(p)
        generator = torch.Generator().manual_seed(seed)
        seqs = [Sequence(list(p)) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(seqs)))
        try:
            while active and params.max_tokens > 0:
                next_ids = sample(self.step([seqs[i] for i in active]), params, generator)
                still = []
                for i, token in zip(active, next_ids):
                    if token in stop_ids:
                        continue
                    outputs[i].append(token)
                    if on_token:
                        on_token(i, token)
                    seqs[i].token_ids.append(token)
                    if len(outputs[i]) < params.max_tokens:
                        still.append(i)
                active = still
        finally:
            self.release(seqs)
        return outputs
