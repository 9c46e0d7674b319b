"""Checkpoint -> ModelWeights on the backend's device.

Strict: the checkpoint must hold exactly the tensors the config implies (layers beyond num_hidden_layers, the
unpublished MTP modules, are ignored), each of the right shape and dtype; any difference is an error naming the
tensor and the file. FP8 block weights are dequantized into the model dtype on the device unless the backend
executes FP8 itself, in which case it receives the float8 weight and its block scales.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from moerun.backends.base import Backend, ExpertWeights, LinearWeight
from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.runtime.checkpoint import Checkpoint
from moerun.backends.errors import CheckpointError
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.shard_plan import ShardPlan
from moerun.runtime.weights import LayerWeights, ModelWeights

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exporters save; recomputed, never read


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def _linear_shapes(cfg: ModelConfig, num_layers: int) -> dict[str, tuple[int, int]]:
    """Every linear module of the model and its [out, in] shape."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"lm_head": (cfg.vocab_size, h)} if not cfg.tie_word_embeddings else {}
    for i in range(num_layers):
        p = layer_prefix(i)
        shapes[f"{p}.self_attn.q_proj"] = (cfg.num_heads * d, h)
        shapes[f"{p}.self_attn.k_proj"] = (cfg.num_kv_heads * d, h)
        shapes[f"{p}.self_attn.v_proj"] = (cfg.num_kv_heads * d, h)
        shapes[f"{p}.self_attn.o_proj"] = (h, cfg.num_heads * d)
        shapes[f"{p}.block_sparse_moe.gate"] = (cfg.num_experts, h)
        for e in range(cfg.num_experts):
            shapes[f"{p}.block_sparse_moe.experts.{e}.w1"] = (inter, h)
            shapes[f"{p}.block_sparse_moe.experts.{e}.w3"] = (inter, h)
            shapes[f"{p}.block_sparse_moe.experts.{e}.w2"] = (h, inter)
    return shapes


def is_quantized(cfg: ModelConfig, module: str) -> bool:
    """FP8 checkpoints quantize every linear except the modules_to_not_convert (gate and lm_head in M2)."""
    if cfg.fp8_block is None:
        return False
    return not any(module == m or module.endswith("." + m) or f".{m}." in f".{module}." for m in cfg.fp8_modules_not_converted)


def expected_tensors(cfg: ModelConfig, num_layers: int) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """name -> (shape, required safetensors dtype or None for 'any float')."""
    h = cfg.hidden_size
    out: dict[str, tuple[tuple[int, ...], str | None]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, h), None),
        "model.norm.weight": ((h,), None),
    }
    for i in range(num_layers):
        p = layer_prefix(i)
        out[f"{p}.input_layernorm.weight"] = ((h,), None)
        out[f"{p}.post_attention_layernorm.weight"] = ((h,), None)
        out[f"{p}.self_attn.q_norm.weight"] = ((cfg.num_heads * cfg.head_dim,), None)
        out[f"{p}.self_attn.k_norm.weight"] = ((cfg.num_kv_heads * cfg.head_dim,), None)
        out[f"{p}.block_sparse_moe.e_score_correction_bias"] = ((cfg.num_experts,), None)
    for module, (rows, cols) in _linear_shapes(cfg, num_layers).items():
        if is_quantized(cfg, module):
            bn, bk = cfg.fp8_block
            out[f"{module}.weight"] = ((rows, cols), "F8_E4M3")
            out[f"{module}.weight_scale_inv"] = ((-(-rows // bn), -(-cols // bk)), "F32")
        else:
            out[f"{module}.weight"] = ((rows, cols), None)
    return out


def validate_checkpoint(ckpt: Checkpoint, cfg: ModelConfig, num_layers: int) -> None:
    expected = expected_tensors(cfg, num_layers)
    problems = []
    for name in sorted(ckpt.names()):
        m = _LAYER.match(name)
        skipped_layer = m is not None and int(m.group(1)) >= num_layers  # MTP layers, or beyond a smoke cut
        tied_copy = cfg.tie_word_embeddings and name == "lm_head.weight"  # some exporters save the tied copy too
        if name not in expected and not skipped_layer and not tied_copy and not _IGNORED.search(name):
            problems.append(f"{name}: unexpected tensor in {ckpt.file_of[name].name}")
    for name, (shape, dtype) in expected.items():
        if name not in ckpt.file_of:
            problems.append(f"{name}: missing from checkpoint {ckpt.folder}")
            continue
        file = ckpt.file_of[name].name
        actual = ckpt.shape(name)
        if actual != shape:
            problems.append(f"{name}: shape {list(actual)} in {file}, expected {list(shape)} from config.json")
        actual_dtype = ckpt.dtype(name)
        if dtype is not None and actual_dtype != dtype:
            problems.append(f"{name}: dtype {actual_dtype} in {file}, expected {dtype}")
        if dtype is None and actual_dtype not in ("F32", "BF16", "F16"):
            problems.append(f"{name}: dtype {actual_dtype} in {file}, expected a float (F32, BF16, F16)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


class WeightLoader:
    """Reads each tensor once from the memory-mapped checkpoint and hands it to the backend.

    Linear and expert weights are assembled on the host (experts stacked per layer) and moved by the backend's
    prepare_* exactly once, so no layer is ever held twice on the device. FP8 weights are dequantized on the
    device when the backend allows it (fast), else on the host."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, backend: Backend, plan: ShardPlan | None = None) -> None:
        self.ckpt, self.cfg, self.backend = ckpt, cfg, backend
        self.plan = plan or ShardPlan()
        self.device, self.dtype = backend.device, backend.dtype
        # The backend runs FP8 itself, or we dequantize here.
        self.keep_fp8 = cfg.fp8_block is not None and backend.capabilities.fp8_weights
        self.dequant_device = backend.device if backend.capabilities.dequantize_on_device else torch.device("cpu")
        self.bytes_read = 0  # of the checkpoint, by this rank: about 1/N of it on each of N ranks

    def load(self, num_layers: int, progress: Callable[[int, int], None] | None = None) -> ModelWeights:
        """progress(layers_done, num_layers) after each layer."""
        validate_checkpoint(self.ckpt, self.cfg, num_layers)
        layers = []
        for i in range(num_layers):
            layers.append(self._layer(i))
            if progress:
                progress(i + 1, num_layers)
        embed = self._dense("model.embed_tokens.weight", field="embed")
        lm_head = (self.backend.prepare_linear(LinearWeight(embed)) if self.cfg.tie_word_embeddings
                   else self._linear("lm_head", "lm_head"))
        return ModelWeights(embed=embed, layers=layers, norm=self._dense("model.norm.weight"), lm_head=lm_head)

    def _read(self, name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        tensor = self.ckpt.read_slice(name, rows, cols)
        self.bytes_read += tensor.nbytes
        return tensor

    def _dense(self, name: str, dtype: torch.dtype | None = None, field: str = "") -> torch.Tensor:
        rows, _ = self.plan.tensor_slice(field, self.cfg)
        return self._read(name, rows).to(self.device, dtype or self.dtype)

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dev = self.dequant_device
        return dequantize_fp8_block(weight.to(dev), scale.to(dev), self.cfg.fp8_block, self.dtype)

    def _fp8_slice(self, module: str, rows: range | None, cols: range | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 weight and the block scales of a slice that starts and ends on block edges (or the tensor's)."""
        (bn, bk), scale_name = self.cfg.fp8_block, f"{module}.weight_scale_inv"
        blocks = lambda r, b: None if r is None else range(r.start // b, -(-r.stop // b))  # noqa: E731
        return self._read(f"{module}.weight", rows, cols), self._read(scale_name, blocks(rows, bn), blocks(cols, bk))

    def _dequantized_slice(self, module: str, rows: range | None, cols: range | None) -> torch.Tensor:
        """A slice of an FP8 weight in the model dtype, exact wherever it starts: the blocks covering it are read
        and dequantized with their scales, then cut to the slice."""
        (bn, bk), (num_rows, num_cols) = self.cfg.fp8_block, self.ckpt.shape(f"{module}.weight")
        cover = lambda r, b, n: None if r is None else range(r.start // b * b, min(-(-r.stop // b) * b, n))  # noqa: E731
        cover_rows, cover_cols = cover(rows, bn, num_rows), cover(cols, bk, num_cols)
        weight = self._dequantize(*self._fp8_slice(module, cover_rows, cover_cols))
        cut = lambda r, c: slice(None) if r is None else slice(r.start - c.start, r.stop - c.start)  # noqa: E731
        return weight[cut(rows, cover_rows), cut(cols, cover_cols)]

    def _linear(self, module: str, field: str) -> object:
        rows, cols = self.plan.tensor_slice(field, self.cfg)
        if not is_quantized(self.cfg, module):
            return self.backend.prepare_linear(LinearWeight(self._read(f"{module}.weight", rows, cols).to(self.dtype)))
        if self.keep_fp8:  # the plan allows only block-edge splits here (ShardPlan.check)
            return self.backend.prepare_linear(LinearWeight(*self._fp8_slice(module, rows, cols), self.cfg.fp8_block))
        return self.backend.prepare_linear(LinearWeight(self._dequantized_slice(module, rows, cols).contiguous()))

    def _layer(self, i: int) -> LayerWeights:
        p = layer_prefix(i)
        return LayerWeights(
            input_norm=self._dense(f"{p}.input_layernorm.weight"),
            q_proj=self._linear(f"{p}.self_attn.q_proj", "q_proj"),
            k_proj=self._linear(f"{p}.self_attn.k_proj", "k_proj"),
            v_proj=self._linear(f"{p}.self_attn.v_proj", "v_proj"),
            o_proj=self._linear(f"{p}.self_attn.o_proj", "o_proj"),
            q_norm=self._dense(f"{p}.self_attn.q_norm.weight", field="q_norm"),
            k_norm=self._dense(f"{p}.self_attn.k_norm.weight", field="k_norm"),
            post_attention_norm=self._dense(f"{p}.post_attention_layernorm.weight"),
            # Router gate and correction bias stay fp32 whatever the model dtype (selection is knife-edge).
            router=self._dense(f"{p}.block_sparse_moe.gate.weight", torch.float32),
            router_bias=self._dense(f"{p}.block_sparse_moe.e_score_correction_bias", torch.float32),
            experts=self._experts(p),
        )

    def _experts(self, p: str) -> object:
        """Stack this rank's experts (and its slice of their intermediate) on the host into [E, 2I, H] (w1 rows,
        then w3 rows) and [E, H, I], in the checkpoint's storage dtype (float8 with block-scale stacks for FP8),
        then convert once and hand over."""
        cfg = self.cfg
        local, inter_slice = self.plan.local_experts(cfg.num_experts), self.plan.local_intermediate(cfg.intermediate_size)
        h, inter = cfg.hidden_size, len(inter_slice)
        whole = None if inter == cfg.intermediate_size else inter_slice
        quantized = is_quantized(cfg, f"{p}.block_sparse_moe.experts.0.w1")
        # Gate and up rows share one [2I, H] stack, so FP8 stacks (with their scale stacks) need I to split at a
        # block edge, and so does a rank's slice of I. Otherwise each expert is dequantized before stacking.
        stacked_fp8 = quantized and inter % cfg.fp8_block[0] == 0 and inter_slice.start % cfg.fp8_block[0] == 0
        if quantized and self.keep_fp8 and not stacked_fp8:
            raise CheckpointError(f"{p}: intermediate {inter} per rank is not a multiple of the FP8 block "
                                  f"{cfg.fp8_block[0]}, which FP8 execution needs")
        store = torch.float8_e4m3fn if stacked_fp8 else self.dtype
        w13 = torch.empty(len(local), 2 * inter, h, dtype=store)
        w2 = torch.empty(len(local), h, inter, dtype=store)
        s13 = s2 = None
        if stacked_fp8:
            bn, bk = cfg.fp8_block
            s13 = torch.empty(len(local), 2 * inter // bn, -(-h // bk), dtype=torch.float32)
            s2 = torch.empty(len(local), -(-h // bn), -(-inter // bk), dtype=torch.float32)
        # (destination, scale destination, first row there, rows read, columns read)
        parts = {"w1": (w13, s13, 0, whole, None), "w3": (w13, s13, inter, whole, None), "w2": (w2, s2, 0, None, whole)}
        for slot, e in enumerate(local):
            for part, (dest, scale_dest, row0, rows, cols) in parts.items():
                module = f"{p}.block_sparse_moe.experts.{e}.{part}"
                if stacked_fp8:
                    weight, scale = self._fp8_slice(module, rows, cols)
                    bn = cfg.fp8_block[0]
                    scale_dest[slot, row0 // bn:row0 // bn + scale.shape[0]] = scale
                elif quantized:
                    weight = self._dequantized_slice(module, rows, cols).cpu()
                else:
                    weight = self._read(f"{module}.weight", rows, cols)
                dest[slot, row0:row0 + weight.shape[0]] = weight.to(store)
        shard = {"first_expert": local.start, "layer_experts": cfg.num_experts}
        if stacked_fp8 and self.keep_fp8:
            return self.backend.prepare_experts(ExpertWeights(w13, w2, s13, s2, block=cfg.fp8_block, **shard))
        if stacked_fp8:
            w13, w2 = self._dequantize(w13, s13), self._dequantize(w2, s2)
        return self.backend.prepare_experts(ExpertWeights(w13=w13, w2=w2, **shard))
