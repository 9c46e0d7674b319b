"""Checkpoint -> ModelWeights on the backend's device.

Strict: the checkpoint must hold exactly the tensors the config implies (layers beyond num_hidden_layers, the
unpublished MTP modules, are ignored), each of the right shape and dtype; any difference is an error naming the
tensor and the file. FP8 block weights are dequantized into the model dtype unless the backend executes FP8
itself, in which case it receives the float8 weight and its block scales. An msModelSlim W8A8 folder (its
quant_model_description.json) loads its W8A8_DYNAMIC modules as int8 with their channel scales, for a backend that
executes W8A8 (w8a8_weights); what its description marks FLOAT loads like any float tensor.

Within memory: each tensor is allocated once in its final dtype (and, for experts, in the backend's layout), then
filled: by a plain read straight into it when the stored bytes need no conversion, else a band of rows at a time
through a small reused staging buffer per worker thread, FP8 dequantized band by band on the way. Nothing the size
of a layer is ever held twice, so the peak resident memory of a load is the loaded weights plus tens of MB (plus,
for a backend that dequantizes on the host for a device that cannot hold float8, one layer's experts on the host).
Before anything is allocated, the weights' bytes are checked against the free memory where they will live.

On several ranks each reads only the slices its ShardPlan gives it (rows of q/k/v and the norms, columns of o_proj,
its experts and their intermediate slice, its vocabulary rows), into tensors of the slice's size: the bytes read
and held per rank are about 1/N of the checkpoint. An FP8 slice is read as the blocks covering it; a W8A8 slice
with the channel scales (and offsets) of its output rows: the rows' own for a row slice, every row's for a column
slice (o_proj, w2).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import torch

from moerun.backends.base import Backend, ExpertWeights, LinearWeight, W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.backends.errors import CheckpointError
from moerun.runtime import w8a8_format, w8a8_weights
from moerun.runtime.checkpoint import TORCH_DTYPES, Checkpoint
from moerun.runtime.load_workers import STAGING_BYTES, load_workers
from moerun.runtime.m2_tensors import (LINEAR, ROUTER, ROUTER_BIAS, M2Tensor, all_tensors, expert_tensors,
                                       layer_prefix, layer_tensors, model_tensors)
from moerun.runtime.memory import allocating, count, format_bytes, tensor_bytes
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.shard_plan import ShardPlan
from moerun.runtime.weights import LayerWeights, ModelWeights, tensors

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exporters save; recomputed, never read
HOST = torch.device("cpu")
FEWER_LAYERS = ("load fewer layers (--layers N, or model.num_layers in the YAML), or spread the model over more "
                "devices (the parallel: section, under torchrun; see `moerun plan`)")


def is_quantized(cfg: ModelConfig, module: str) -> bool:
    """FP8 checkpoints quantize every linear except the modules_to_not_convert (gate and lm_head in M2)."""
    if cfg.fp8_block is None:
        return False
    return not any(module == m or module.endswith("." + m) or f".{m}." in f".{module}." for m in cfg.fp8_modules_not_converted)


def _fp8(cfg: ModelConfig, t: M2Tensor) -> bool:
    return t.kind == LINEAR and is_quantized(cfg, t.module)


@dataclasses.dataclass(frozen=True)
class _Part:
    """The rows (and, of a 2-D tensor, the columns) of stored tensor `name` that this rank loads."""

    name: str
    stored_shape: tuple[int, ...]
    rows: range
    cols: range | None  # None: a 1-D tensor

    @classmethod
    def of(cls, name: str, shape: tuple[int, ...], rows: range | None = None, cols: range | None = None) -> _Part:
        rows = range(shape[0]) if rows is None else rows
        return cls(name, shape, rows, None if len(shape) == 1 else range(shape[1]) if cols is None else cols)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),) if self.cols is None else (len(self.rows), len(self.cols))

    @property
    def col_slice(self) -> range | None:
        """The columns to read, when not all of them."""
        return None if self.cols is None or len(self.cols) == self.stored_shape[1] else self.cols

    def blocks(self, block: tuple[int, int]) -> _Part:
        """The FP8 block scales that cover this part of a weight: its part of `{module}.weight_scale_inv`."""
        (bn, bk), (rows, cols) = block, self.stored_shape
        return _Part.of(self.name.removesuffix(".weight") + ".weight_scale_inv", (-(-rows // bn), -(-cols // bk)),
                        _covering(self.rows, bn), _covering(self.cols, bk))

    def covered(self, block: tuple[int, int]) -> _Part:
        """The part of the weight that those blocks span: this part widened to block edges."""
        scales = self.blocks(block)
        (bn, bk), (rows, cols) = block, self.stored_shape
        return _Part.of(self.name, self.stored_shape, range(scales.rows.start * bn, min(scales.rows.stop * bn, rows)),
                        range(scales.cols.start * bk, min(scales.cols.stop * bk, cols)))


def _covering(r: range, block: int) -> range:
    """The blocks of `block` elements that cover r."""
    return range(r.start // block, -(-r.stop // block))


def expected_tensors(cfg: ModelConfig, num_layers: int,
                     description: w8a8_format.Description | None = None) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """name -> (shape, required safetensors dtype or None for 'any float'); a W8A8 checkpoint's when given its
    description (w8a8_format.expected_tensors: int8 weights with their scales and offsets)."""
    out: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for t in all_tensors(cfg, num_layers):
        if _fp8(cfg, t):
            (bn, bk), (rows, cols) = cfg.fp8_block, t.shape
            out[t.name] = (t.shape, "F8_E4M3")
            out[f"{t.module}.weight_scale_inv"] = ((-(-rows // bn), -(-cols // bk)), "F32")
        else:
            out[t.name] = (t.shape, None)
    return out if description is None else w8a8_format.expected_tensors(out, description)


def validate_checkpoint(ckpt: Checkpoint, cfg: ModelConfig, num_layers: int) -> None:
    expected = expected_tensors(cfg, num_layers, ckpt.description)
    if ckpt.description is not None:
        w8a8_format.check_description_matches(ckpt.description, ckpt.file_of)
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
    """Reads each tensor once into its final place and hands it to the backend's prepare_* (see the module doc).

    Tensors are built on the backend's device. FP8 weights are dequantized where the backend allows float8 tensors
    (on its device: fast, and the FP8 bytes cross to the device once), else on the host, and then moved once.
    Reads and conversions run on worker threads (load_workers), a layer at a time."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, backend: Backend, plan: ShardPlan | None = None) -> None:
        self.ckpt, self.cfg, self.backend = ckpt, cfg, backend
        self.plan = plan or ShardPlan()
        self.device, self.dtype = backend.device, backend.dtype
        # The backend runs FP8 itself, or we dequantize here.
        self.keep_fp8 = cfg.fp8_block is not None and backend.capabilities.fp8_weights
        self.dequant_device = backend.device if backend.capabilities.dequantize_on_device else HOST
        # The router gate and its bias stay fp32 whatever the model dtype (selection is knife-edge); float64 in a
        # float64 run.
        self.router_dtype = torch.promote_types(self.dtype, torch.float32)
        self._advice = FEWER_LAYERS
        self.bytes_read = 0  # of the checkpoint, by this rank: about 1/N of it on each of N ranks
        # An msModelSlim W8A8 checkpoint: the modules its description marks W8A8_DYNAMIC load as int8 + scales.
        self.description = ckpt.description
        if self.description is not None:
            w8a8_weights.check_loadable(backend)

    def load(self, num_layers: int, progress: Callable[[int, int], None] | None = None) -> ModelWeights:
        """progress(bytes_read, bytes_total) of the checkpoint, as tensors are read."""
        validate_checkpoint(self.ckpt, self.cfg, num_layers)  # whether they fit was checked before (limits)
        share = f" (rank {self.plan.rank}'s share: {self.plan.describe()})" if self.plan.world_size > 1 else ""
        self._advice = (f"the weights of {count(num_layers, 'layer')}{share} need "
                        f"{format_bytes(self.weight_bytes(num_layers))} in all: {FEWER_LAYERS}")
        total = sum(self._bytes_to_read(t, part) for t, part in self._parts(num_layers))
        self.bytes_read = 0

        def done(nbytes: int) -> None:
            self.bytes_read += nbytes
            if progress:
                progress(self.bytes_read, total)

        outer = self._outer_parts()
        with load_workers() as self._workers:  # in file order: embedding, layers, final norm, lm_head
            embed = self._load(*outer["embed"], done)
            layers = [self._layer(i, done) for i in range(num_layers)]
            norm = self._load(*outer["norm"], done)
            lm_head = (self._prepare_linear("lm_head", LinearWeight(embed)) if self.cfg.tie_word_embeddings
                       else self._load(*outer["lm_head"], done))
        return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)

    def weight_bytes(self, num_layers: int) -> int:
        """Bytes of the loaded weights on the backend's device, this rank's share of them: the model dtype, fp32
        for the router, float8 plus block scales for FP8 weights a backend executes itself, int8 plus channel
        scales for W8A8 ones."""
        total = 0
        for t, part in self._parts(num_layers):
            if self._w8a8(t):
                total += w8a8_weights.held_bytes(part.shape)
            elif _fp8(self.cfg, t) and self.keep_fp8:
                scales = part.blocks(self.cfg.fp8_block)
                total += tensor_bytes(part.shape, torch.float8_e4m3fn) + tensor_bytes(scales.shape, torch.float32)
            else:
                total += tensor_bytes(part.shape, self._float_dtype(t))
        return total

    def _bytes_to_read(self, t: M2Tensor, part: _Part) -> int:
        """The checkpoint bytes that loading `part` reads (an FP8 weight dequantized here: the blocks covering it)."""
        stored = lambda p: tensor_bytes(p.shape, TORCH_DTYPES[self.ckpt.dtype(p.name)])  # noqa: E731
        if self._w8a8(t):  # the int8 weight, and the fp32 [out, 1] scale and offset of its rows
            return stored(part) + 2 * 4 * len(part.rows)
        if not _fp8(self.cfg, t):
            return stored(part)
        weight = part if self.keep_fp8 else part.covered(self.cfg.fp8_block)
        return stored(weight) + stored(part.blocks(self.cfg.fp8_block))

    # ---- this rank's parts of the tensors (ShardPlan) ----------------------------------------------------------
    def _sliced(self, t: M2Tensor, field: str) -> tuple[M2Tensor, _Part]:
        return t, _Part.of(t.name, t.shape, *self.plan.tensor_slice(field, self.cfg))

    def _outer_parts(self) -> dict[str, tuple[M2Tensor, _Part]]:
        return {field: self._sliced(t, field) for field, t in model_tensors(self.cfg).items()}

    def _layer_parts(self, i: int) -> dict[str, tuple[M2Tensor, _Part]]:
        return {field: self._sliced(t, field) for field, t in layer_tensors(self.cfg, i).items()}

    def _expert_parts(self, i: int, e: int) -> dict[str, tuple[M2Tensor, _Part]]:
        """w1 and w3 rows, w2 columns: this rank's slice of the expert's intermediate."""
        inter = self.plan.local_intermediate(self.cfg.intermediate_size)
        return {part: (t, _Part.of(t.name, t.shape, cols=inter) if part == "w2" else _Part.of(t.name, t.shape, inter))
                for part, t in expert_tensors(self.cfg, i, e).items()}

    def _parts(self, num_layers: int) -> Iterator[tuple[M2Tensor, _Part]]:
        """Every tensor this rank loads, with its part, in file order (the tied lm_head is the embedding)."""
        outer = self._outer_parts()
        yield outer["embed"]
        for i in range(num_layers):
            yield from self._layer_parts(i).values()
            for e in self.plan.local_experts(self.cfg.num_experts):
                yield from self._expert_parts(i, e).values()
        yield outer["norm"]
        if "lm_head" in outer:
            yield outer["lm_head"]

    def _w8a8(self, t: M2Tensor) -> bool:
        return self.description is not None and self.description.is_quantized(t.module)

    def _float_dtype(self, t: M2Tensor) -> torch.dtype:
        """What a float tensor is held in: the router's dtype, the backend's choice for a linear weight stored as
        a float (backend.weight_dtype), else the model dtype (also for FP8 weights dequantized here)."""
        if t.kind in (ROUTER, ROUTER_BIAS):
            return self.router_dtype
        # Counted before validate_checkpoint has looked at the stored dtypes (the memory check comes first).
        stored = TORCH_DTYPES.get(self.ckpt.dtype(t.name)) if t.name in self.ckpt.file_of else None
        if t.kind == LINEAR and not _fp8(self.cfg, t) and stored is not None and stored.is_floating_point:
            return self.backend.weight_dtype(stored)
        return self.dtype

    # ---- planning: each tensor's destination, allocated once, and the tasks that fill it ------------------------
    def _load(self, t: M2Tensor, part: _Part, done: Callable[[int], None]) -> object:
        out, tasks = self._plan(t, part)
        self._workers.run(tasks, done)
        return self._finish(t, out)

    def _layer(self, i: int, done: Callable[[int], None]) -> LayerWeights:
        planned, tasks = {}, []
        for field, (t, part) in self._layer_parts(i).items():
            out, fill = self._plan(t, part)
            planned[field] = (t, out)
            tasks += fill
        stacks, fill = self._plan_experts(i)
        self._workers.run(tasks + fill, done)
        fields = {field: self._finish(t, out) for field, (t, out) in planned.items()}
        what = f"{layer_prefix(i)}.block_sparse_moe.experts"
        with allocating(what, nbytes_of(stacks), self.device, self._advice):
            return LayerWeights(**fields, experts=self.backend.prepare_experts(stacks))

    def _plan(self, t: M2Tensor, part: _Part) -> tuple[object, list[Callable[[], int]]]:
        if self._w8a8(t):  # the int8 weight as stored and its channel scales, laid out by the backend's prepare
            weight = self._empty(t.name, part.shape, torch.int8, self.device)
            scale = self._empty(f"{t.module}.weight_scale", part.shape[:1], w8a8_weights.SCALE_DTYPE, self.device)
            return W8A8LinearWeight(weight, scale), self._fill_tasks(part, weight) + [
                lambda: self._fill_scale(t.module, scale, part.rows.start)]
        if not _fp8(self.cfg, t):
            out = self._empty(t.name, part.shape, self._float_dtype(t), self.device)
            return out, self._fill_tasks(part, out)
        if self.keep_fp8:  # a backend that executes FP8 holds float8 on its device (slices on block edges)
            scales = part.blocks(self.cfg.fp8_block)
            weight = self._empty(t.name, part.shape, torch.float8_e4m3fn, self.device)
            scale = self._empty(scales.name, scales.shape, torch.float32, self.device)
            return (weight, scale), self._fill_tasks(part, weight) + self._fill_tasks(scales, scale)
        out = self._empty(t.name, part.shape, self.dtype, self.dequant_device)
        return out, [lambda: self._dequantize_into(part, out)]

    def _finish(self, t: M2Tensor, out: object) -> object:
        if t.kind != LINEAR:
            return out
        if isinstance(out, W8A8LinearWeight):
            return self._prepare_linear(t.name, out)
        weight = LinearWeight(*out, self.cfg.fp8_block) if isinstance(out, tuple) else LinearWeight(out)
        return self._prepare_linear(t.name, weight)

    def _plan_experts(self, i: int) -> tuple[ExpertWeights | W8A8ExpertWeights, list[Callable[[], int]]]:
        """This rank's experts of layer i (and its slice I of their intermediate) go into stacks w13 [E, 2I, H]
        (w1 rows, then w3 rows) and w2 [E, H, I], one task per expert: float8 stacks with stacked block scales for
        a backend that executes FP8, else stacks in the backend's own layout (empty_experts) and the dtype
        _float_dtype gives the first expert's w1, or int8 with stacked channel scales for W8A8."""
        cfg, local = self.cfg, self.plan.local_experts(self.cfg.num_experts)
        h, inter = cfg.hidden_size, len(self.plan.local_intermediate(cfg.intermediate_size))
        what = f"{layer_prefix(i)}.block_sparse_moe.experts"
        first = expert_tensors(cfg, i, local.start)["w1"]
        quantized = _fp8(cfg, first)
        fp8_stacks = quantized and self.keep_fp8
        w8a8 = self._w8a8(first)  # w8a8_format checked that one layer's experts share one format
        if fp8_stacks:
            stacks = self._fp8_stacks(what, len(local), inter)
        else:
            dtype = torch.int8 if w8a8 else self._float_dtype(first)
            nbytes = len(local) * 3 * h * inter * dtype.itemsize
            with allocating(what, nbytes, self.dequant_device, self._advice):
                stacks = self.backend.empty_experts(len(local), h, inter, dtype, self.dequant_device)
        shard = {"first_expert": local.start, "layer_experts": cfg.num_experts}
        if w8a8:  # w1/w3 scales of the intermediate rows held, w2 scales of every row
            n, f32 = len(local), w8a8_weights.SCALE_DTYPE
            stacks = W8A8ExpertWeights(w13=stacks.w13, w2=stacks.w2,
                                       w13_scale=self._empty(what, (n, 2 * inter), f32, self.dequant_device),
                                       w2_scale=self._empty(what, (n, h), f32, self.dequant_device), **shard)
        else:
            stacks = dataclasses.replace(stacks, **shard)

        def expert(slot: int, e: int) -> int:
            read = 0
            for name, (t, part) in self._expert_parts(i, e).items():
                rows = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter), "w2": slice(None)}[name]
                out = (stacks.w2 if name == "w2" else stacks.w13)[slot, rows]
                if fp8_stacks:
                    bn, scales = cfg.fp8_block[0], part.blocks(cfg.fp8_block)
                    scale_stack = stacks.w2_scale_inv if name == "w2" else stacks.w13_scale_inv
                    scale_rows = slice(None) if name == "w2" else slice(rows.start // bn, rows.stop // bn)
                    read += self._fill(part.name, out, part.rows.start, part.col_slice)
                    read += self._fill(scales.name, scale_stack[slot, scale_rows], scales.rows.start, scales.col_slice)
                elif quantized:
                    read += self._dequantize_into(part, out)
                else:
                    read += self._fill(part.name, out, part.rows.start, part.col_slice)
                if w8a8:
                    scale = (stacks.w2_scale if name == "w2" else stacks.w13_scale)[slot, rows]
                    read += self._fill_scale(t.module, scale, part.rows.start)
            return read

        return stacks, [lambda slot=slot, e=e: expert(slot, e) for slot, e in enumerate(local)]

    def _fp8_stacks(self, what: str, num_experts: int, inter: int) -> ExpertWeights:
        """float8 stacks and their block-scale stacks, on the device (a backend that executes FP8 holds float8).
        Gate and up rows share one [2I, H] stack, so I (this rank's slice of it) must split at a block edge."""
        cfg = self.cfg
        h, (bn, bk) = cfg.hidden_size, cfg.fp8_block
        if inter % bn or inter % bk:
            raise CheckpointError(f"{what}: intermediate {inter} per rank is not a multiple of the FP8 block "
                                  f"{bn}x{bk}, which FP8 execution needs")
        f8, f32 = torch.float8_e4m3fn, torch.float32
        return ExpertWeights(
            w13=self._empty(what, (num_experts, 2 * inter, h), f8, self.device),
            w2=self._empty(what, (num_experts, h, inter), f8, self.device),
            w13_scale_inv=self._empty(what, (num_experts, 2 * inter // bn, -(-h // bk)), f32, self.device),
            w2_scale_inv=self._empty(what, (num_experts, -(-h // bn), -(-inter // bk)), f32, self.device),
            block=cfg.fp8_block)

    # ---- the tasks: reads and conversions, on a worker ---------------------------------------------------------
    def _empty(self, what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with allocating(what, tensor_bytes(shape, dtype), device, self._advice):
            return torch.empty(shape, dtype=dtype, device=device)

    def _staged(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor over this worker's reused staging bytes."""
        allocate = lambda n: self._empty("a read buffer", (n,), torch.uint8, HOST)  # noqa: E731
        return self._workers.staging(tensor_bytes(shape, dtype), allocate).view(dtype).view(shape)

    def _fill_tasks(self, part: _Part, out: torch.Tensor) -> list[Callable[[], int]]:
        """Tasks that fill `out` with `part`, a band of rows each, so a large tensor is read in parallel."""
        rows = out.shape[0]
        band = max(1, STAGING_BYTES // max(1, out[0].numel() * out.element_size()))
        return [lambda r0=r0: self._fill(part.name, out[r0:r0 + band], part.rows.start + r0, part.col_slice)
                for r0 in range(0, rows, band)]

    def _fill(self, name: str, out: torch.Tensor, first_row: int = 0, cols: range | None = None) -> int:
        """Read rows first_row.. (and columns `cols`, else all) of tensor `name` into `out`, whatever its dtype,
        strides or device: straight into it when it is a contiguous host tensor of the stored dtype, else through
        the staging buffer."""
        stored = TORCH_DTYPES[self.ckpt.dtype(name)]
        if out.device == HOST and out.dtype == stored and out.is_contiguous():
            self.ckpt.read_into(name, out, first_row, cols)
        else:
            staged = self._staged(tuple(out.shape), stored)
            self.ckpt.read_into(name, staged, first_row, cols)
            out.copy_(staged)
        return tensor_bytes(tuple(out.shape), stored)

    def _fill_scale(self, module: str, out: torch.Tensor, first_row: int) -> int:
        """A W8A8 module's channel scales ([out, 1] as stored) of rows first_row.. into `out` (a rank's output
        channels: all of them for a row-parallel slice), checked with the same rows of its offset."""
        return self._fill(f"{module}.weight_scale", out, first_row) + w8a8_weights.check_scale(
            self.ckpt, module, out, first_row)

    def _dequantize_into(self, part: _Part, out: torch.Tensor) -> int:
        """Dequantize `part` of an FP8 weight into `out` (the model dtype), a band of whole block rows at a time.
        A part that starts or ends inside a block (a rank's slice, when a dequantized run splits anywhere) is read
        as the blocks covering it, dequantized a band at a time and cut: exact, and never more than a band beyond
        the part is held."""
        block = self.cfg.fp8_block
        scales, cover = part.blocks(block), part.covered(block)
        exact = cover == part
        scale = torch.empty(scales.shape, dtype=torch.float32)
        self.ckpt.read_into(scales.name, scale, scales.rows.start, scales.col_slice)
        scale = scale.to(out.device)
        first, width = cover.rows.start, len(cover.cols)
        band = max(1, STAGING_BYTES // (block[0] * width)) * block[0]
        cut_cols = slice(part.cols.start - cover.cols.start, part.cols.stop - cover.cols.start)
        for r0 in range(first, cover.rows.stop, band):
            r1 = min(r0 + band, cover.rows.stop)
            staged = self._staged((r1 - r0, width), torch.float8_e4m3fn)
            self.ckpt.read_into(part.name, staged, r0, cover.col_slice)
            band_scales = scale[(r0 - first) // block[0]:-(-(r1 - first) // block[0])]
            lo, hi = max(r0, part.rows.start), min(r1, part.rows.stop)
            dest = out[lo - part.rows.start:hi - part.rows.start]
            if exact:
                dequantize_fp8_block(staged.to(out.device), band_scales, block, self.dtype, out=dest)
            else:
                whole = dequantize_fp8_block(staged.to(out.device), band_scales, block, self.dtype)
                dest.copy_(whole[lo - r0:hi - r0, cut_cols])
        return tensor_bytes(cover.shape, torch.float8_e4m3fn) + scale.nbytes

    def _prepare_linear(self, what: str, w: LinearWeight) -> object:
        with allocating(what, w.weight.nbytes, self.device, self._advice):
            return self.backend.prepare_linear(w)


def nbytes_of(w: ExpertWeights | W8A8ExpertWeights) -> int:
    return sum(t.nbytes for t in tensors(w))
