"""The engine: one RunConfig -> backend + checkpoint + graph + paged KV cache, and the steps built on them
(teacher-forced logits, batched generation). Every entry point (CLI, tests, bench) goes through here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moerun.backends.base import AttentionMetadata, ModelSpec
from moerun.runtime import step_broadcast
from moerun.runtime.batch import Sequence, StepInputs, build_step
from moerun.runtime.checkpoint import Checkpoint
from moerun.backends.errors import ConfigError, MoerunError
from moerun.runtime.kv_cache import PagedKVCache
from moerun.runtime.launch import place
from moerun.runtime.loader import WeightLoader
from moerun.runtime.model import MiniMaxM2Model
from moerun.runtime.model_config import load_model_config
from moerun.runtime.run_config import BUILTIN_DEMO, RunConfig, load_run_config
from moerun.runtime.sampling import SamplingParams, sample

MAX_DECODE_BATCH = 256  # the largest decode batch a backend prepares for (device-graph buckets)


def resolve_model_folder(model_path: str) -> Path:
    if model_path == BUILTIN_DEMO:
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
        placement = place(run, cfg)
        self.backend, self.plan, self.comm = placement.backend, placement.plan, placement.comm
        block_size = run.kv_block_size or self.backend.capabilities.kv_block_sizes[0]
        # The backend refuses a model its kernels cannot run now, not at the first request.
        self.backend.check_model(ModelSpec(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
            intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, dtype=run.dtype,
            kv_block_size=block_size, fp8_block=cfg.fp8_block))
        loader = WeightLoader(Checkpoint(self.folder), cfg, self.backend, self.plan)
        weights = loader.load(layers, progress)
        self.bytes_read = loader.bytes_read
        self.model = MiniMaxM2Model(cfg, weights, self.backend, self.comm, self.plan)
        self.cache = PagedKVCache(self.backend, layers, run.kv_num_blocks, block_size,
                                  len(self.plan.local_kv_heads(cfg.num_kv_heads)), cfg.head_dim)
        # Decode steps may be replayed as device graphs (one rank only: collectives are not captured yet);
        # prefill always runs the graph eagerly.
        self._decode_forward = self.model.forward if self.comm.world.size > 1 else self.backend.decode_runner(
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
        rows = (torch.arange(inputs.input_ids.shape[0], device=inputs.input_ids.device) if all_logits
                else inputs.last_token_rows)
        if self.comm.world.size > 1:
            step_broadcast.send(self.comm.host, message_of(inputs, rows))
        logits = self._forward(inputs, rows, observe)
        for seq in seqs:
            seq.num_cached = len(seq.token_ids)
        return logits

    def _forward(self, inputs: StepInputs, rows: torch.Tensor,
                 observe: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        forward = self._decode_forward if inputs.meta.is_decode and observe is None else self.model.forward
        hidden = forward(inputs.input_ids, inputs.positions, inputs.meta, self.cache.layers, observe)
        return self.model.compute_logits(hidden[rows])

    def run_worker(self) -> None:
        """On every rank but 0: run each step rank 0 sends, until it says stop."""
        while True:
            message = step_broadcast.receive(self.comm.host)
            if message.kind == step_broadcast.STOP:
                return
            if message.kind == step_broadcast.STEP:
                with torch.inference_mode():
                    self._forward(*inputs_of(message, self.backend.device, self.cache.block_size))

    def close(self) -> None:
        """Rank 0: tell the workers the run is over; every rank: leave the world."""
        if self.comm.world.size > 1:
            if self.comm.is_first:
                step_broadcast.send(self.comm.host, step_broadcast.StepMessage(step_broadcast.STOP))
            self.comm.close()

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


def message_of(inputs: StepInputs, rows: torch.Tensor) -> step_broadcast.StepMessage:
    meta = inputs.meta
    fields = {"input_ids": inputs.input_ids, "positions": inputs.positions, "slot_mapping": meta.slot_mapping,
              "logits_rows": rows, "query_start_loc": meta.query_start_loc, "seq_lens": meta.seq_lens,
              "block_tables": meta.block_tables}
    return step_broadcast.StepMessage(step_broadcast.STEP, fields, meta.block_tables.shape[1])


def inputs_of(message: step_broadcast.StepMessage, device: torch.device,
              block_size: int) -> tuple[StepInputs, torch.Tensor]:
    f = {name: t.to(device) for name, t in message.fields.items()}
    starts, lens = message.fields["query_start_loc"].tolist(), message.fields["seq_lens"].tolist()
    meta = AttentionMetadata(
        query_start_loc=f["query_start_loc"].to(torch.int32), seq_lens=f["seq_lens"].to(torch.int32),
        block_tables=f["block_tables"].to(torch.int32).view(len(lens), message.block_table_width),
        slot_mapping=f["slot_mapping"], query_lens_host=[b - a for a, b in zip(starts, starts[1:])],
        seq_lens_host=lens, block_size=block_size)
    return StepInputs(f["input_ids"], f["positions"], meta, f["logits_rows"]), f["logits_rows"]
