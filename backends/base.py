"""The backend interface: the device ops the MiniMax-M2 graph calls, the capabilities a backend declares,
and a registry by name.

The graph in moerun.runtime never knows which device it runs on. Everything that differs between devices
(kernels, cache layout, weight layout, FP8 execution) sits behind `Backend`. A backend only knows the model
through `ModelSpec` and the weight containers below. Every op here has a pure-PyTorch reference in
backends/cpu, and every other backend's op is tested against it.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from moerun.backends.errors import ConfigError, key_name, shown

# float64 is for high-precision reference runs (the CPU backend only; `moerun parity` measures noise floors with it).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    dtypes: tuple[torch.dtype, ...]
    kv_block_sizes: tuple[int, ...]  # the first one is the default
    fp8_weights: bool  # True: the backend executes FP8 block-quantized weights itself (no dequant at load)
    # True: float8 tensors may be moved to the device and dequantized there (fast); else the loader dequantizes
    # on the host (a device that may not hold float8 tensors at all, e.g. Ascend A2/A3).
    dequantize_on_device: bool = False
    # True: the backend executes W8A8_DYNAMIC weights (int8 weights, activations quantized per token at run time;
    # prepare_* receive W8A8LinearWeight / W8A8ExpertWeights); else the loader refuses a W8A8 checkpoint.
    w8a8: bool = False


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a backend may know of the model: the dimensions its kernels care about."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    num_experts: int
    top_k: int
    intermediate_size: int
    vocab_size: int
    dtype: torch.dtype
    kv_block_size: int
    fp8_block: tuple[int, int] | None  # weight block of an FP8 checkpoint, None for a float checkpoint


@dataclasses.dataclass
class LinearWeight:
    """A [out, in] weight: float in the model dtype, or FP8 e4m3 with one fp32 scale per block."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None  # [ceil(out/bn), ceil(in/bk)], multiplied in (DeepSeek-V3 convention)
    block: tuple[int, int] | None = None


@dataclasses.dataclass(kw_only=True)
class ExpertRange:
    """Expert parallelism: a layer's stacks (w13 [E, ...]) hold experts first_expert .. first_expert + E - 1 of the
    layer's layer_experts (0: the stacks hold them all). Routing ids are the layer's; pairs routed to experts
    outside the stacks are another rank's and contribute nothing here (the graph sums the ranks' outputs)."""

    first_expert: int = 0
    layer_experts: int = 0

    @property
    def holds_all_experts(self) -> bool:
        return self.layer_experts in (0, self.w13.shape[0])


@dataclasses.dataclass
class ExpertWeights(ExpertRange):
    """All experts of one MoE layer (or this rank's: ExpertRange), stacked. w13 holds gate_proj (w1) rows first,
    then up_proj (w3) rows."""

    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    w13_scale_inv: torch.Tensor | None = None  # [E, ceil(2I/bn), ceil(H/bk)] for FP8
    w2_scale_inv: torch.Tensor | None = None  # [E, ceil(H/bn), ceil(I/bk)]
    block: tuple[int, int] | None = None

    @classmethod
    def empty_transposed(cls, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                         device: torch.device) -> ExpertWeights:
        """Stacks whose memory is (E, H, 2I) and (E, I, H), seen as the usual [E, 2I, H] and [E, H, I]: filled
        through these views by the loader, they are already in the layout a grouped matmul computing
        x @ w[e]^T reads contiguously (what the NPU's grouped matmul wants)."""
        return cls(w13=torch.empty(num_experts, hidden_size, 2 * intermediate_size, dtype=dtype, device=device).mT,
                   w2=torch.empty(num_experts, intermediate_size, hidden_size, dtype=dtype, device=device).mT)


@dataclasses.dataclass
class W8A8LinearWeight:
    """A W8A8_DYNAMIC linear (msModelSlim's format): int8 [out, in] weights, symmetric per output channel, so
    W ~ weight * scale[:, None]; the input is quantized per token (symmetric int8) when the layer runs."""

    weight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out]


@dataclasses.dataclass
class W8A8ExpertWeights(ExpertRange):
    """All experts of one MoE layer (or this rank's: ExpertRange) in W8A8_DYNAMIC, stacked like ExpertWeights
    (gate w1 rows first in w13)."""

    w13: torch.Tensor  # int8 [E, 2I, H]
    w13_scale: torch.Tensor  # fp32 [E, 2I]
    w2: torch.Tensor  # int8 [E, H, I]
    w2_scale: torch.Tensor  # fp32 [E, H]


@dataclasses.dataclass
class AttentionMetadata:
    """One forward step over a packed batch of sequences (prefill, decode, or a mix), built once per step.

    Query tokens of all sequences are packed along one axis T. Sequence b owns query rows
    query_start_loc[b]:query_start_loc[b+1]; these are its last q_len tokens, so its
    tokens sit at positions seq_lens[b]-q_len .. seq_lens[b]-1 and attend causally to the cached prefix.
    """

    query_start_loc: torch.Tensor  # int32 [B+1], on the device
    seq_lens: torch.Tensor  # int32 [B]: KV length of each sequence once this step's tokens are written
    block_tables: torch.Tensor  # int32 [B, max_blocks]: cache block ids, padded with 0 past the end
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block * block_size + offset) of each query token
    query_lens_host: list[int]  # host copies, for kernels that take lengths as lists
    seq_lens_host: list[int]
    block_size: int
    query_start_loc_host: list[int] | None = None  # [B+1]; derived from query_lens_host when not given
    max_query_len: int = dataclasses.field(init=False)
    max_seq_len: int = dataclasses.field(init=False)
    # What a backend derives from this step's metadata once and reuses in every layer (e.g. the CPU backend's
    # attention index plan). Not copied by dataclasses.replace: a changed step derives afresh.
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.query_start_loc_host is None:
            self.query_start_loc_host = [0, *itertools.accumulate(self.query_lens_host)]
        self.max_query_len = max(self.query_lens_host, default=0)
        self.max_seq_len = max(self.seq_lens_host, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token: the paged-decode kernels apply."""
        return self.max_query_len == 1


class Backend(abc.ABC):
    """One device's implementation of the graph's ops. Subclasses set `name` and `capabilities`."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # YAML options of this backend's own section, with their defaults; `validate_options` checks against them.
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: dict[str, Any], dtype: torch.dtype) -> None:
        self.options = options
        self.dtype = dtype

    # ---- setup -------------------------------------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict[str, Any] | None, key_path: str) -> dict[str, Any]:
        """Check the backend's YAML section; return it with defaults filled. Errors name the key path."""
        options = dict(options or {})
        for key, value in options.items():
            if key not in cls.default_options:
                allowed = ", ".join(sorted(cls.default_options)) or "none"
                raise ConfigError(f"{key_path}.{key_name(key)}: unknown key (allowed: {allowed})")
            default = cls.default_options[key]
            if not _same_kind(value, default):
                raise ConfigError(f"{key_path}.{key}: expected {type(default).__name__}, got {shown(value)}")
        return {**cls.default_options, **options}

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where tensors for this backend live."""

    def check_model(self, spec: ModelSpec) -> None:
        """Raise UnsupportedModelError naming the limit when the kernels cannot run this model."""

    @classmethod
    def options_for_rank(cls, options: dict[str, Any], local_rank: int, world_size: int) -> dict[str, Any]:
        """The options of the process that is local rank `local_rank` of a world of several ranks, one device per
        process: a backend with several devices per host points each process at its own here."""
        return options

    @classmethod
    def keeps_fp8(cls, options: dict[str, Any]) -> bool:
        """Whether this backend, built with `options` on the hardware it targets, executes FP8 block weights as
        stored (the capacity planner's question; a built backend answers with capabilities.fp8_weights)."""
        return cls.capabilities.fp8_weights

    @property
    def process_group_backend(self) -> str:
        """The torch.distributed backend for collectives between ranks on this kind of device."""
        return "gloo"

    def device_info(self) -> dict[str, Any]:
        """{"name": str, "memory_total": int | None, "memory_free": int | None} in bytes; None when unknown."""
        return {"name": str(self.device), "memory_total": None, "memory_free": None}

    def decode_runner(self, forward: Callable[..., torch.Tensor], max_num_seqs: int,
                      max_blocks_per_seq: int) -> Callable[..., torch.Tensor]:
        """The graph's forward(input_ids, positions, meta, kv_caches, observe=None) as this backend runs decode
        steps (every sequence adds one token). A backend may capture and replay device graphs here."""
        return forward

    def describe(self) -> str:
        """One line for logs and the smoke table: backend, device, and anything an operator should know."""
        return f"{self.name} backend on {self.device}"

    # ---- weights -----------------------------------------------------------------------------------------------
    def weight_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype the loader gives a float weight the checkpoint stores as `stored` (FP8 weights it dequantizes
        go to the model dtype). The default converts everything to the model dtype at load."""
        return self.dtype

    def prepare_linear(self, w: LinearWeight) -> Any:
        """Move a linear weight to the device in the layout `linear` expects (a W8A8LinearWeight too when
        capabilities.w8a8)."""
        return w.weight.to(self.device)

    def empty_experts(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                      device: torch.device) -> ExpertWeights:
        """Uninitialized stacks for one layer's experts, w13 [E, 2I, H] and w2 [E, H, I], which the loader fills
        expert by expert and then hands to prepare_experts. A backend whose kernels want another memory layout
        returns views of tensors in that layout, so that prepare_experts gets it without a second copy."""
        return ExpertWeights(w13=torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device),
                             w2=torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device))

    def prepare_experts(self, w: ExpertWeights) -> Any:
        """Move one layer's stacked experts (built on the host) to the device in the layout `experts` expects
        (W8A8ExpertWeights too when capabilities.w8a8)."""
        return dataclasses.replace(w, w13=w.w13.to(self.device), w2=w.w2.to(self.device))

    # ---- KV cache ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype) -> Any:
        """One layer's paged K and V cache, in this backend's layout (opaque to the graph)."""

    @abc.abstractmethod
    def write_kv(self, kv_cache: Any, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store k, v [T, Hkv, D] of this step's tokens at meta.slot_mapping."""

    # ---- ops ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        """x [T, in] @ w^T -> [T, out], w as returned by prepare_linear."""

    @abc.abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * normalize(x) over the last dim, statistics in fp32."""

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual): the pre-norm residual step; backends may fuse it."""
        summed = x + residual
        return self.rms_norm(summed, weight, eps), summed

    @abc.abstractmethod
    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NeoX rotary on the first cos.shape[-1] dims of q [T, Hq, D] and k [T, Hkv, D]; the rest passes through.

        cos, sin: [T, rotary_dim] in the model dtype, the frequencies repeated twice (cat(f, f))."""

    @abc.abstractmethod
    def attention(self, q: torch.Tensor, kv_cache: Any, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Causal GQA attention of q [T, Hq, D] over the paged cache (this step's K/V already written) -> [T, Hq, D]."""

    @abc.abstractmethod
    def route(self, router_logits: torch.Tensor, bias: torch.Tensor,
              top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid top-k routing: select by sigmoid(logits) + bias, weigh by the unbiased scores, renormalized.

        router_logits [T, E] fp32, bias [E] fp32 -> (weights fp32 [T, k], expert ids int32 [T, k])."""

    @abc.abstractmethod
    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Any) -> torch.Tensor:
        """sum_j weights[t, j] * SwiGLU_expert(ids[t, j])(x[t]) -> [T, H] in x's dtype, over the pairs whose expert
        the stacks hold (ExpertRange.first_expert: ids are global, other ranks compute the rest)."""

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, bias: torch.Tensor, top_k: int,
            experts: Any) -> torch.Tensor:
        """The whole routed-expert block; a backend may fuse routing, dispatch, compute and combine."""
        weights, ids = self.route(router_logits, bias, top_k)
        return self.experts(x, weights, ids, experts)

    def synchronize(self) -> None:
        """Wait for queued device work (for timings)."""


def device_of_local_rank(name: str, local_rank: int) -> str:
    """The device of local rank r when a backend's option names "kind:N" (or "kind"): "kind:N+r", one device per
    process, in the order the devices are visible (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES choose them).
    A name that is no "kind:N" is left for the backend to refuse."""
    kind, _, index = name.partition(":")
    if kind == "cpu" or not (index or "0").isdigit():
        return name
    return f"{kind}:{int(index or 0) + local_rank}"


def _same_kind(value: Any, default: Any) -> bool:
    """YAML type check against the default: bools are not ints, ints are fine where floats are expected."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# name -> "module:Class", imported only when chosen, so that a CUDA or Ascend import never runs elsewhere.
_REGISTRY: dict[str, str] = {
    "cpu": "moerun.backends.cpu.backend:CpuBackend",
    "cuda": "moerun.backends.cuda.backend:CudaBackend",
    "ascend": "moerun.backends.ascend.backend:AscendBackend",
}


def register_backend(name: str, target: str) -> None:
    """Add or replace a backend, given as "module:Class"."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise ConfigError(f"backend: unknown backend {shown(name)} (allowed: {', '.join(backend_names())})")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
