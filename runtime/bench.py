"""`moerun bench`: decode and prefill speed of a synthetic MiniMax-M2 on the backend a YAML file picks, with the
achieved fraction of the device's memory bandwidth (MBU) and of its matmul throughput (MFU), measured in the same
run, and optionally transformers' MiniMaxM2ForCausalLM on the same weights and token ids (runtime/bench_transformers.py).

The model has the real layer dimensions (hidden 3072, 48 query / 8 kv heads of 128, 256 experts of 1536, top-8,
vocab 200064) and random weights, built in memory (no checkpoint), with as many layers as fit on the device (or
--layers N). The YAML file supplies the backend, its options, the dtype and the KV block size; its model.path is
not read. `--small` (automatic on CPU devices) shrinks every dimension so the whole run takes seconds.

Definitions (docs/performance.md has the long form):
- decode step: one forward of B sequences that each add one token at position C, plus their logits, after each
  sequence's C seeded context tokens were prefilled into the cache; inputs prebuilt, timed from launch to
  synchronize; the median (and min, max) of --steps runs after --warmup runs, interleaved run by run with every
  other measurement of that batch (the eager forward, transformers' variants).
- MBU = bytes the step must read / step time / copy bandwidth. Bytes: per layer the attention projections, norms
  and router, the experts actually routed to in that step (counted from the step's routing), and the K/V of every
  sequence's context; plus the final norm, the lm_head and the B embedding rows. Copy bandwidth: a large
  device-to-device copy timed in this run, counted as bytes read + bytes written.
- MFU = prefill FLOPs / prefill time / the FLOP rate of a large matmul in the model dtype timed in this run.
  FLOPs: 2 per weight per token for the attention projections, the router and the top-k experts, causal attention
  2 * 2 * heads * head_dim * P(P+1)/2, and the lm_head for the last token.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import click
import torch

from moerun.backends.base import Backend, ExpertWeights, LinearWeight, ModelSpec, get_backend_class
from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.runtime.commands.common import check_output_path, write_atomically
from moerun.backends.errors import MoerunError
from moerun.runtime.bench_transformers import VARIANTS, TransformersPeer
from moerun.runtime.commands.bench_serve import serve
from moerun.runtime.kv_cache import allocate_kv_caches
from moerun.runtime.m2_tensors import LINEAR, NORM, ROUTER, layer_prefix, layer_tensors, model_tensors
from moerun.runtime.model import MiniMaxM2Model
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.run_config import RunConfig, load_run_config
from moerun.runtime.step_builder import StepBuilder, StepSequence
from moerun.runtime.table import format_table
from moerun.runtime.weights import LayerWeights, ModelWeights

GiB = 1 << 30
FP8_BLOCK = (128, 128)

# MiniMax-M2's dimensions (config.json of the release), and a miniature with the same ratios for CPU runs.
M2 = dict(vocab_size=200064, hidden_size=3072, num_layers=62, num_heads=48, num_kv_heads=8, head_dim=128, rotary_dim=64,
          intermediate_size=1536, num_experts=256, top_k=8)
SMALL = dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32, rotary_dim=16,
             intermediate_size=128, num_experts=16, top_k=4)


@dataclasses.dataclass
class Plan:
    small: bool
    layers: int
    batches: list[int]
    context: int
    prefill_tokens: int
    steps: int
    warmup: int
    prefill_steps: int  # the full model's 8k prefill takes seconds, so half the runs; a miniature's takes all
    prefill_warmup: int
    fp8: bool
    compare: str | None


# ---- the synthetic model -----------------------------------------------------------------------------------------

def model_config(dims: dict[str, int], layers: int) -> ModelConfig:
    return ModelConfig(**{**dims, "num_layers": layers}, rope_theta=5e6, rms_norm_eps=1e-6, max_position_embeddings=196608,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_ids=(), checkpoint_dtype="bfloat16",
                       fp8_block=None, fp8_modules_not_converted=())


def _spec(cfg: ModelConfig, dtype: torch.dtype, block_size: int, fp8: bool) -> ModelSpec:
    return ModelSpec(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                     intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, dtype=dtype,
                     kv_block_size=block_size, fp8_block=FP8_BLOCK if fp8 else None)


class SyntheticWeights:
    """Random weights with the checkpoint's layout, generated on the device: float weights ~ N(0, 1/fan_in); FP8
    weights as e4m3 values ~ N(0, 64^2) with block scales 1/(64 sqrt(fan_in)), so both dequantize to the same
    distribution. Each is handed to the backend's prepare_* as the loader would (FP8 dequantized first unless the
    backend executes FP8). `hf` keeps transformers' names for the float weights, for --compare transformers."""

    def __init__(self, cfg: ModelConfig, backend: Backend, fp8: bool, seed: int) -> None:
        self.cfg, self.backend, self.fp8 = cfg, backend, fp8
        self.device, self.dtype = backend.device, backend.dtype
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.hf: dict[str, torch.Tensor] = {}

    def _normal(self, shape, std: float, dtype=None) -> torch.Tensor:
        """Drawn directly in the target dtype: a float32 intermediate would double a 7 GB expert stack."""
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device).normal_(0.0, std, generator=self.gen)

    def _fp8(self, shape, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(shape, dtype=torch.bfloat16, device=self.device).normal_(0.0, 64.0, generator=self.gen)
        q = q.clamp_(-448, 448).to(torch.float8_e4m3fn)
        scale_shape = (*shape[:-2], -(-shape[-2] // FP8_BLOCK[0]), -(-shape[-1] // FP8_BLOCK[1]))
        return q, torch.full(scale_shape, 1.0 / (64.0 * math.sqrt(fan_in)), device=self.device)

    def linear(self, name: str, rows: int, cols: int) -> Any:
        if not self.fp8:
            w = self._normal((rows, cols), cols ** -0.5)
            self.hf[name] = w
            return self.backend.prepare_linear(LinearWeight(w))
        q, scale = self._fp8((rows, cols), cols)
        if self.backend.capabilities.fp8_weights:
            return self.backend.prepare_linear(LinearWeight(q, scale, FP8_BLOCK))
        return self.backend.prepare_linear(LinearWeight(dequantize_fp8_block(q, scale, FP8_BLOCK, self.dtype)))

    def experts(self, prefix: str) -> Any:
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        if not self.fp8:
            w13, w2 = self._normal((e, 2 * i, h), h ** -0.5), self._normal((e, h, i), i ** -0.5)
            self.hf[f"{prefix}.mlp.experts.gate_up_proj"], self.hf[f"{prefix}.mlp.experts.down_proj"] = w13, w2
            return self.backend.prepare_experts(ExpertWeights(w13=w13, w2=w2))
        (q13, s13), (q2, s2) = self._fp8((e, 2 * i, h), h), self._fp8((e, h, i), i)
        if self.backend.capabilities.fp8_weights:
            return self.backend.prepare_experts(ExpertWeights(q13, q2, s13, s2, FP8_BLOCK))
        return self.backend.prepare_experts(ExpertWeights(dequantize_fp8_block(q13, s13, FP8_BLOCK, self.dtype),
                                                          dequantize_fp8_block(q2, s2, FP8_BLOCK, self.dtype)))

    def norm(self, name: str, size: int) -> torch.Tensor:
        w = (1.0 + self._normal((size,), 0.1, torch.float32)).to(self.dtype)
        self.hf[name] = w
        return w

    def layer(self, i: int) -> LayerWeights:
        fields = {}
        for field, t in layer_tensors(self.cfg, i).items():
            if t.kind == NORM:
                fields[field] = self.norm(t.name, t.shape[0])
            elif t.kind == LINEAR:
                fields[field] = self.linear(t.name, *t.shape)
            else:  # the fp32 router gate and its bias, kept under transformers' names (mlp.gate, ...)
                std = self.cfg.hidden_size ** -0.5 if t.kind == ROUTER else 0.01
                fields[field] = self.hf[t.name.replace("block_sparse_moe", "mlp")] = self._normal(t.shape, std, torch.float32)
        return LayerWeights(**fields, experts=self.experts(layer_prefix(i)))

    def model(self, progress: Callable[[], None]) -> ModelWeights:
        layers = []
        for i in range(self.cfg.num_layers):
            layers.append(self.layer(i))
            progress()
        outer = model_tensors(self.cfg)
        embed = self.hf[outer["embed"].name] = self._normal(outer["embed"].shape, 1.0)
        lm_head = self.hf[outer["lm_head"].name] = self._normal(outer["lm_head"].shape, self.cfg.hidden_size ** -0.5)
        return ModelWeights(embed=embed, layers=layers, norm=self.norm(outer["norm"].name, self.cfg.hidden_size),
                            lm_head=self.backend.prepare_linear(LinearWeight(lm_head)))


def nbytes(obj: Any) -> int:
    """Bytes of every tensor inside a prepared weight (a tensor, a dataclass of tensors, a list of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(x) for x in obj)
    return 0


# ---- timing and the two device probes --------------------------------------------------------------------------

Step = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]]  # run, or (run, untimed reset after it)


def time_interleaved(steps: dict[str, Step], backend: Backend, warmup: int, runs: int) -> dict[str, list[float]]:
    """Seconds of every run of each step, from launch to synchronize. After `warmup` untimed rounds, `runs` rounds
    each run every step once, in alternating order (A B, B A, A B, ...), so whatever drifts during the measurement
    (clocks, caches, other processes) falls on all steps alike and no step always follows the same other. A step's
    reset (rewinding a cache so the next run does the same work) runs after the clock stops."""
    pairs = {name: step if isinstance(step, tuple) else (step, lambda: None) for name, step in steps.items()}
    names = list(pairs)
    for _ in range(warmup):
        for name in names:
            run, reset = pairs[name]
            run()
            reset()
    backend.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names if r % 2 == 0 else reversed(names):
            run, reset = pairs[name]
            t0 = time.perf_counter()
            run()
            backend.synchronize()
            times[name].append(time.perf_counter() - t0)
            reset()
    return times


def time_runs(fn: Callable[[], Any], backend: Backend, warmup: int, runs: int) -> float:
    """Median seconds of fn from launch to synchronize, after warmup runs."""
    return statistics.median(time_interleaved({"fn": fn}, backend, warmup, runs)["fn"])


def spread(seconds: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3, "max_ms": max(seconds) * 1e3,
            "samples": len(seconds)}


def copy_bandwidth(backend: Backend, size: int) -> float:
    """Bytes/s of a device-to-device copy of `size` bytes, counting the read and the write."""
    src = torch.ones(size // 2, dtype=torch.bfloat16, device=backend.device)
    dst = torch.empty_like(src)
    seconds = time_runs(lambda: dst.copy_(src), backend, 3, 10)
    return 2 * size / seconds


def matmul_flops(backend: Backend, n: int) -> float:
    """FLOP/s of an n x n x n matmul in the model dtype."""
    a = torch.randn(n, n, device=backend.device).to(backend.dtype)
    b = torch.randn(n, n, device=backend.device).to(backend.dtype)
    seconds = time_runs(lambda: a @ b, backend, 3, 10)
    return 2 * n ** 3 / seconds


# ---- decode and prefill ------------------------------------------------------------------------------------------

def count_routed_experts(backend: Backend, run: Callable[[], Any]) -> list[int] | None:
    """Distinct experts each layer's routing picked in one eager run, seen through backend.route (None when the
    backend's moe does not go through route)."""
    picked: list[torch.Tensor] = []
    route = backend.route

    def counting(router_logits, bias, top_k):
        weights, ids = route(router_logits, bias, top_k)
        picked.append(ids)
        return weights, ids

    backend.route = counting  # an instance attribute shadows the method for this one run
    try:
        run()
    finally:
        del backend.route
    return [int(ids.unique().numel()) for ids in picked] or None


def decode_bytes(model: MiniMaxM2Model, distinct: list[int], seq_lens: list[int], kv_elem: int) -> int:
    """What one decode step must read (see the module docstring)."""
    cfg, w = model.config, model.weights
    total = nbytes(w.lm_head) + nbytes(w.norm) + len(seq_lens) * cfg.hidden_size * w.embed.element_size()
    kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * kv_elem
    for layer, n in zip(w.layers, distinct):
        fixed = nbytes([layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.input_norm, layer.q_norm,
                        layer.k_norm, layer.post_attention_norm, layer.router, layer.router_bias])
        total += fixed + n * nbytes(layer.experts) // cfg.num_experts + sum(seq_lens) * kv_per_token
    return total


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    h, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    params = h * q_dim * 2 + 2 * h * kv_dim + cfg.num_experts * h + cfg.top_k * 3 * h * cfg.intermediate_size
    attention = 2 * 2 * q_dim * tokens * (tokens + 1) / 2
    return cfg.num_layers * (2 * tokens * params + attention) + 2 * h * cfg.vocab_size


class OwnSteps:
    """moerun's side of a measurement: the KV cache storage and the packed inputs of each step, sequence i owning
    blocks i*n .. (i+1)*n - 1 (n blocks hold context + 1 tokens; the prompt owns the first blocks). The only code of
    the bench that knows the engine's step builder and cache storage."""

    CONTEXT_CHUNK_TOKENS = 16384  # the untimed context prefill runs in steps of at most this many tokens

    def __init__(self, backend: Backend, cfg: ModelConfig, plan: Plan, block_size: int) -> None:
        self.block_size = block_size
        self.blocks_per_seq = -(-(plan.context + 1) // block_size)
        prefill_blocks = -(-plan.prefill_tokens // block_size)
        max_batch = max(plan.batches)
        self.kv_caches = allocate_kv_caches(backend, cfg.num_layers, max(max_batch * self.blocks_per_seq, prefill_blocks),
                                            block_size, cfg.num_kv_heads, cfg.head_dim)
        max_tokens = max(min(self.CONTEXT_CHUNK_TOKENS, max_batch * plan.context), max_batch, plan.prefill_tokens)
        self.builder = StepBuilder(backend.device, block_size, max_tokens, max_batch,
                                   max(self.blocks_per_seq, prefill_blocks))

    def _blocks(self, i: int) -> range:
        return range(i * self.blocks_per_seq, (i + 1) * self.blocks_per_seq)

    def fill(self, model: MiniMaxM2Model, context_ids: torch.Tensor) -> None:
        """Prefill each row of context_ids [B, C] into its sequence's blocks (untimed)."""
        rows = context_ids.tolist()
        chunk = max(1, self.CONTEXT_CHUNK_TOKENS // len(rows))
        for start in range(0, len(rows[0]), chunk):
            inputs = self.builder.build([StepSequence(row[start:start + chunk], start, self._blocks(i))
                                         for i, row in enumerate(rows)], [0])
            model.forward(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)

    def decode_inputs(self, next_ids: torch.Tensor, context: int):
        """The step adding next_ids[b] to sequence b at position C (it rewrites that slot each time it runs)."""
        seqs = [StepSequence([token], context, self._blocks(i)) for i, token in enumerate(next_ids.tolist())]
        return self.builder.build(seqs, list(range(len(seqs))))

    def prompt(self, prompt_ids: torch.Tensor):
        """The step that prefills the whole prompt from position 0, and the last token's logits."""
        tokens = prompt_ids.numel()
        return self.builder.build([StepSequence(prompt_ids.tolist(), 0, range(-(-tokens // self.block_size)))],
                                  [tokens - 1])


PEER = "transformers "  # prefix of the peer's step names in a measurement


class Bench:
    def __init__(self, run: RunConfig, backend: Backend, plan: Plan, seed: int, progress: Callable[[], None]) -> None:
        self.plan = plan
        self.backend = backend
        self.block_size = run.kv_block_size or backend.capabilities.kv_block_sizes[0]
        self.cfg = cfg = model_config(SMALL if plan.small else M2, plan.layers)
        backend.check_model(_spec(cfg, run.dtype, self.block_size, plan.fp8))
        self.seed = seed
        self.copy_bw = copy_bandwidth(backend, 64 << 20 if plan.small else 2 * GiB)
        progress()
        self.matmul = matmul_flops(backend, 512 if plan.small else 8192)
        progress()
        self.synthetic = SyntheticWeights(cfg, backend, plan.fp8, seed)
        self.model = MiniMaxM2Model(cfg, self.synthetic.model(progress), backend)
        self.max_seq = plan.context + 1
        self.own = OwnSteps(backend, cfg, plan, self.block_size)
        self.decode_forward = backend.decode_runner(self.model.forward, max(plan.batches), self.own.blocks_per_seq)

    def token_ids(self, shape: tuple[int, ...], salt: int) -> torch.Tensor:
        """Seeded token ids, the same for moerun and its peer (salt: one stream per measurement)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return torch.randint(0, self.cfg.vocab_size, shape, generator=gen)

    def _step(self, forward: Callable[..., torch.Tensor], inputs) -> Callable[[], torch.Tensor]:
        return lambda: self.model.compute_logits(
            forward(inputs.input_ids, inputs.positions, inputs.meta, self.own.kv_caches)[inputs.logits_rows])

    @torch.inference_mode()
    def decode(self, batch: int, peer: TransformersPeer | None) -> dict[str, Any]:
        """B sequences whose C-token context was prefilled into each side's cache, then one token each at position
        C, timed interleaved: moerun's decode runner (CUDA graphs where on), its eager forward when that differs,
        and the peer's variants."""
        plan, backend, model = self.plan, self.backend, self.model
        ids = self.token_ids((batch, plan.context + 1), salt=batch)
        self.own.fill(model, ids[:, :-1])
        inputs = self.own.decode_inputs(ids[:, -1], plan.context)
        distinct = count_routed_experts(backend, self._step(model.forward, inputs))
        counted = distinct is not None
        if not counted:
            expected = self.cfg.num_experts * (1 - (1 - self.cfg.top_k / self.cfg.num_experts) ** batch)
            distinct = [round(expected)] * self.cfg.num_layers
        steps = {"moerun": self._step(self.decode_forward, inputs)}
        if self.decode_forward != model.forward:  # CUDA graphs on: time the plain forward too
            steps["moerun eager"] = self._step(model.forward, inputs)
        if peer is not None:
            steps |= {PEER + v: s for v, s in peer.decode_steps(ids[:, :-1], ids[:, -1]).items()}
        times = time_interleaved(steps, backend, plan.warmup, plan.steps)
        agreement = logits_agreement(steps)
        seconds = statistics.median(times["moerun"])
        kv_elem = torch.empty((), dtype=backend.dtype).element_size()
        read = decode_bytes(model, distinct, [self.max_seq] * batch, kv_elem)
        row = {"batch": batch, "context": plan.context, "step_ms": seconds * 1e3, "tokens_per_s": batch / seconds,
               "moerun": spread(times["moerun"]), "distinct_experts_per_layer": statistics.mean(distinct),
               "experts_counted": counted, "bytes_per_step": read, "achieved_bytes_per_s": read / seconds,
               "mbu": read / seconds / self.copy_bw}
        if "moerun eager" in times:
            row["moerun_eager"] = spread(times["moerun eager"])
        return row | compare_peer(times, seconds, agreement)

    @torch.inference_mode()
    def prefill(self, peer: TransformersPeer | None) -> dict[str, Any]:
        """One prompt of P tokens into an empty cache (moerun rewrites the same blocks each run), plus the last
        token's logits; interleaved with the peer's variants."""
        plan, backend, model = self.plan, self.backend, self.model
        prompt = self.token_ids((plan.prefill_tokens,), salt=0)
        inputs = self.own.prompt(prompt)
        steps = {"moerun": self._step(model.forward, inputs)}
        if peer is not None:
            steps |= {PEER + v: s for v, s in peer.prefill_steps(prompt).items()}
        times = time_interleaved(steps, backend, plan.prefill_warmup, plan.prefill_steps)
        agreement = logits_agreement(steps)
        seconds = statistics.median(times["moerun"])
        flops = prefill_flops(self.cfg, plan.prefill_tokens)
        row = {"tokens": plan.prefill_tokens, "ms": seconds * 1e3, "tokens_per_s": plan.prefill_tokens / seconds,
               "moerun": spread(times["moerun"]), "flops": flops, "flops_per_s": flops / seconds,
               "mfu": flops / seconds / self.matmul}
        return row | compare_peer(times, seconds, agreement)


def logits_agreement(steps: dict[str, Step]) -> dict[str, float]:
    """Each peer variant's logits against moerun's for the same step, max |difference| / max |logit|, untimed:
    near zero (float32) or a few bf16 ulps shows both sides did the same work on the same token ids."""
    peers = {n: s for n, s in steps.items() if n.startswith(PEER)}
    if not peers:
        return {}
    ours = steps["moerun"]().float()
    out = {}
    for name, (run, reset) in peers.items():
        theirs = run().float().reshape(ours.shape)
        reset()
        out[name.removeprefix(PEER)] = ((theirs - ours).abs().max() / ours.abs().max()).item()
    return out


def compare_peer(times: dict[str, list[float]], seconds: float, agreement: dict[str, float]) -> dict[str, Any]:
    """The peer's variants, its fastest by median, and our speedup over that one."""
    variants = {name.removeprefix(PEER): spread(t) | {"logits_rel_diff": agreement[name.removeprefix(PEER)]}
                for name, t in times.items() if name.startswith(PEER)}
    if not variants:
        return {}
    fastest = min(variants, key=lambda v: variants[v]["median_ms"])
    return {"transformers": variants, "transformers_fastest": fastest,
            "speedup": variants[fastest]["median_ms"] / (seconds * 1e3)}


# ---- sizing, report ------------------------------------------------------------------------------------------------

def fit_layers(dims: dict[str, int], backend: Backend, plan: Plan, block_size: int) -> tuple[int, str]:
    """As many layers as the device's free memory holds with the KV cache for the largest batch (and transformers'
    two caches, dynamic and static, with --compare), keeping room for activations. (layers, how it was decided)."""
    free = backend.device_info()["memory_free"]
    if free is None:
        return (dims["num_layers"] if plan.small else 2), "default (device memory unknown)"
    h, e, i, v = dims["hidden_size"], dims["num_experts"], dims["intermediate_size"], dims["vocab_size"]
    q_dim, kv_dim = dims["num_heads"] * dims["head_dim"], dims["num_kv_heads"] * dims["head_dim"]
    elem = torch.empty((), dtype=backend.dtype).element_size()
    expert_elem = 1 if plan.fp8 and backend.capabilities.fp8_weights else elem
    weights = (2 * h * q_dim + 2 * h * kv_dim) * (expert_elem if plan.fp8 else elem) + 3 * h * i * e * expert_elem + 4 * e * h
    tokens = max(max(plan.batches) * -(-(plan.context + 1) // block_size) * block_size, plan.prefill_tokens)
    kv = 2 * kv_dim * elem * tokens
    if plan.compare:
        kv += 2 * 2 * kv_dim * elem * max(max(plan.batches) * (plan.context + 1), plan.prefill_tokens)
    reserve = 2 * v * h * elem + 6 * GiB + free // 20
    layers = int((free - reserve) // (weights + kv))
    if layers < 1:
        raise MoerunError(f"bench: not even one layer fits in {free / GiB:.1f} GiB free; "
                          "lower --batches/--context or use --layers")
    return min(layers, dims["num_layers"]), f"fit in {free / GiB:.1f} GiB free"


def _range(s: dict[str, float]) -> str:
    return f"{s['min_ms']:.3f}-{s['max_ms']:.3f}"


def report(result: dict[str, Any]) -> str:
    m, model = result["machine"], result["model"]
    lines = [f"moerun bench  {result['date']}  {result['command']}",
             f"device: {m['device']}  backend: {m['backend']}",
             f"host: {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, load average {m['load_average'][0]:.2f} "
             f"at start, {m['load_average_end'][0]:.2f} at end",
             f"model: {model['name']}, {model['layers']} of {model['full_layers']} layers ({model['layers_reason']}), "
             f"weights {model['weights']}, dtype {model['dtype']}",
             f"copy bandwidth {m['copy_bandwidth_gb_s']:.1f} GB/s (read + write)   "
             f"{model['dtype']} matmul {m['matmul_tflops']:.4g} TFLOP/s",
             f"each figure: the median of {result['plan']['steps']} interleaved runs, prefill "
             f"{result['plan']['prefill_steps']} (min-max beside it)", ""]
    decode = result["decode"]
    eager = any("moerun_eager" in d for d in decode)
    compare = "transformers" in result
    headers = ["batch", "context", "step ms", "min-max", "tok/s", "experts/layer", "GB/step", "GB/s", "MBU"]
    headers += ["eager ms"] if eager else []
    headers += ["hf fastest", "hf step ms", "hf min-max", "speedup"] if compare else []
    rows = []
    for d in decode:
        row = [d["batch"], d["context"], f"{d['step_ms']:.3f}", _range(d["moerun"]), f"{d['tokens_per_s']:.1f}",
               f"{d['distinct_experts_per_layer']:.1f}" + ("" if d["experts_counted"] else " (expected)"),
               f"{d['bytes_per_step'] / 1e9:.3f}", f"{d['achieved_bytes_per_s'] / 1e9:.1f}", f"{100 * d['mbu']:.1f}%"]
        row += [f"{d['moerun_eager']['median_ms']:.3f}" if "moerun_eager" in d else "-"] if eager else []
        row += _peer_cells(d) if compare else []
        rows.append(row)
    lines += ["decode" + ("  (step ms: the decode runner, CUDA graphs where on; eager ms: the plain forward)"
                          if eager else ""), format_table(headers, rows, align="right"), ""]
    p = result["prefill"]
    if p:
        headers = ["tokens", "ms", "min-max", "tok/s", "TFLOP", "TFLOP/s", "MFU"]
        row = [p["tokens"], f"{p['ms']:.2f}", _range(p["moerun"]), f"{p['tokens_per_s']:.1f}",
               f"{p['flops'] / 1e12:.4g}", f"{p['flops_per_s'] / 1e12:.4g}", f"{100 * p['mfu']:.1f}%"]
        if compare:
            headers += ["hf fastest", "hf ms", "hf min-max", "speedup"]
            row += _peer_cells(p)
        lines += ["prefill", format_table(headers, [row], align="right")]
    if compare:
        hf = result["transformers"]
        variants = [v for v in hf["variants"] if v not in hf["missing"]]

        def cells(row: dict[str, Any]) -> list[str]:
            timed = row.get("transformers", {})
            diff = max((t["logits_rel_diff"] for t in timed.values()), default=None)
            return [*(f"{timed[v]['median_ms']:.3f}" if v in timed else "-" for v in variants),
                    "-" if diff is None else f"{diff:.1e}"]

        rows = [[d["batch"], *cells(d)] for d in decode] + ([[f"prefill {p['tokens']}", *cells(p)]] if p else [])
        lines += ["", f"transformers {hf['version']} by variant (median ms; experts {hf['experts_implementation']}; "
                  "logits diff: the largest |hf - moerun| / max |moerun| of the variants)",
                  format_table(["batch", *variants, "logits diff"], rows, align="right")]
        lines += [f"transformers {v}: not timed ({why})" for v, why in hf["missing"].items()]
    return "\n".join(lines)


def _peer_cells(row: dict[str, Any]) -> list[str]:
    if "transformers" not in row:
        return ["-", "-", "-", "-"]
    best = row["transformers"][row["transformers_fastest"]]
    return [row["transformers_fastest"], f"{best['median_ms']:.3f}", _range(best), f"{row['speedup']:.2f}x"]


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoerunError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise MoerunError(f"{option}: expected positive integers, got {text!r}")
    return values


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise MoerunError(f"--hf-variants: {', '.join(unknown) or 'none given'} (allowed: {', '.join(VARIANTS)})")
    return names


@click.group(invoke_without_command=True)
@click.option("-c", "--config", type=str, default=None,
              help="YAML target: its backend, backend options, dtype and KV block size (default: the embedded demo).")
@click.option("--small/--full", default=None, help="Miniature dimensions (default: on CPU devices) or MiniMax-M2's.")
@click.option("--layers", type=click.IntRange(1), default=None, help="Decoder layers (default: as many as fit).")
@click.option("--batches", default=None, help="Decode batch sizes [default: 1,8,64,256; small: 1,8,64].")
@click.option("--context", type=click.IntRange(1), default=None, help="Decode context per sequence [2048; small: 64].")
@click.option("--prefill-tokens", type=click.IntRange(0), default=None,
              help="Prefill length, 0 for no prefill [8192; small: 256].")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Timed runs per measurement, interleaved [20; small: 25] (full-size prefill: half of them).")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Untimed runs first [5; small: 3] (full-size prefill: half of them).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Host threads for torch, set for the whole run [default: the config's cpu.threads, else torch's own choice; pinned].")
@click.option("--fp8", is_flag=True, help="Synthetic weights in the M2 release's FP8 block format (128x128, e4m3).")
@click.option("--compare", type=click.Choice(["transformers"]), default=None,
              help="Also time transformers' MiniMaxM2ForCausalLM on the same weights and token ids, interleaved.")
@click.option("--hf-variants", default=",".join(VARIANTS), show_default=True,
              help="transformers variants to time with --compare (the report names the fastest).")
@click.option("--out", default=None,
              help="JSON results file [bench_results/bench-<time>.json].")
@click.option("--seed", type=int, default=0, show_default=True)
def bench(config, small, layers, batches, context, prefill_tokens, steps, warmup, threads, fp8, compare, hf_variants,
          out, seed):
    """Decode and prefill speed of a synthetic MiniMax-M2, with MBU and MFU measured against this device.

    `moerun bench serve` loads an OpenAI-compatible endpoint instead (see `moerun bench serve --help`)."""
    if click.get_current_context().invoked_subcommand:
        return  # a subcommand runs instead of the model benchmark
    config = config or str(resources.files("moerun.configs") / "demo.yaml")
    run = load_run_config(config)
    if out:
        out_path = check_output_path(out)
    else:
        out_path = Path("bench_results") / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
    if compare and fp8:
        raise MoerunError("--compare transformers runs the float weights; drop --fp8")
    variants = _variants(hf_variants)
    previous_threads = torch.get_num_threads()
    try:
        _bench(run, small, layers, batches, context, prefill_tokens, steps, warmup, threads, fp8, compare, variants,
               out_path, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _bench(run: RunConfig, small, layers, batches, context, prefill_tokens, steps, warmup, threads, fp8, compare,
           variants: tuple[str, ...], out_path: Path, seed: int) -> None:
    load_start = os.getloadavg()
    backend_cls = get_backend_class(run.backend)
    backend = backend_cls(run.backend_options, run.dtype)  # may set torch's threads (cpu.threads)
    # --threads wins over the config's; then pinned: every measurement runs on the same pool
    torch.set_num_threads(threads or torch.get_num_threads())
    small = backend.device.type == "cpu" if small is None else small
    default_batches = [1, 8, 64] if small else [1, 8, 64, 256]
    steps = steps or (25 if small else 20)
    warmup = warmup if warmup is not None else (3 if small else 5)
    plan = Plan(small=small, layers=0, batches=_ints(batches, "--batches") if batches else default_batches,
                context=context or (64 if small else 2048),
                prefill_tokens=prefill_tokens if prefill_tokens is not None else (256 if small else 8192),
                steps=steps, warmup=warmup, prefill_steps=steps if small else max(1, steps // 2),
                prefill_warmup=warmup if small else warmup // 2, fp8=fp8, compare=compare)
    dims = SMALL if small else M2
    if layers:
        plan.layers, reason = min(layers, dims["num_layers"]), "--layers"
    else:
        plan.layers, reason = fit_layers(dims, backend, plan, run.kv_block_size or backend.capabilities.kv_block_sizes[0])
    total = 2 + plan.layers + len(plan.batches) + bool(plan.prefill_tokens) + bool(compare)
    with click.progressbar(length=total, label="bench", file=sys.stderr) as bar:
        b = Bench(run, backend, plan, seed, lambda: bar.update(1))
        peer = None
        if compare:
            peer = TransformersPeer(b.cfg, b.synthetic.hf, backend.device, backend.dtype, variants)
            bar.update(1)
        decode = []
        for batch in plan.batches:
            decode.append(b.decode(batch, peer))
            bar.update(1)
        prefill = b.prefill(peer) if plan.prefill_tokens else None
        bar.update(1)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "moerun bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "machine": {"device": b.backend.device_info()["name"],
                    "backend": b.backend.describe(), "host": platform.node(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": load_start, "load_average_end": os.getloadavg(),
                    "copy_bandwidth_gb_s": b.copy_bw / 1e9, "matmul_tflops": b.matmul / 1e12},
        "model": {"name": "MiniMax-M2 miniature" if small else "MiniMax-M2 dimensions", "dims": dims,
                  "layers": plan.layers, "full_layers": dims["num_layers"], "layers_reason": reason,
                  "weights": "fp8 block 128x128" + ("" if b.backend.capabilities.fp8_weights else ", dequantized at load")
                  if fp8 else str(run.dtype).removeprefix("torch."), "dtype": str(run.dtype).removeprefix("torch."),
                  "kv_block_size": b.block_size},
        "plan": dataclasses.asdict(plan),
        "decode": decode,
        "prefill": prefill,
    }
    if peer is not None:
        import transformers

        result["transformers"] = {"version": transformers.__version__, "variants": list(variants),
                                  "experts_implementation": peer.experts_implementation, "missing": peer.missing,
                                  "compile_seconds": peer.compile_seconds}
    click.echo(report(result))
    write_atomically(out_path, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    click.echo(f"\nwrote {out_path}")


bench.add_command(serve)
