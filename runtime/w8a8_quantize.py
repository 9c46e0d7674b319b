"""A bf16 (or any float) or FP8 MiniMax-M2 checkpoint -> msModelSlim's W8A8_DYNAMIC format (w8a8_format), for
operators without msModelSlim, and for tests.

Attention projections and expert weights become per-output-channel symmetric int8 (scale = max|w| / 127 of each
row, in fp32; FP8 blocks are dequantized to fp32 first); everything else is copied as stored (router gate and bias
in fp32, norms and embeddings in the checkpoint dtype). There is no rotation: msModelSlim's recipe applies QuaRot
(Hadamard rotations folded into the weights, which shrink outliers before int8) and calibrates nothing else for
W8A8_DYNAMIC, so this output has the same format and more quantization error than its export.

Streaming: the source is memory-mapped and read one tensor at a time; shards are planned from headers alone and
each output tensor goes straight to disk (shard_writer). Atomic: everything is written into a temporary folder
beside DST, renamed to DST at the very end; any error, Ctrl-C or SIGTERM removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.backends.cpu.w8a8 import quantize_rows
from moerun.backends.errors import CheckpointError, MoerunError
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.loader import expected_tensors, validate_checkpoint
from moerun.runtime.model_config import ModelConfig, load_model_config
from moerun.runtime.shard_writer import SAFETENSORS_DTYPES, PlannedTensor, ShardWriter, plan_shards
from moerun.runtime.w8a8_format import (
    DESCRIPTION_FILE, FLOAT, INDEX_FILE, QUANTIZABLE, W8A8_DYNAMIC, WEIGHTS_PREFIX, description_json, is_w8a8_folder)

# Files copied next to the weights, as msModelSlim copies them: configs, tokenizer, chat templates, model code.
SIDE_FILE_SUFFIXES = (".json", ".txt", ".jinja", ".py", ".model", ".tiktoken")
NOT_COPIED = ("index.json", DESCRIPTION_FILE)
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Output:
    """One tensor of the W8A8 checkpoint: its plan, description entry and how to compute it."""

    planned: PlannedTensor
    quant_type: str
    compute: Callable[[], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Summary:
    tensors: int
    quantized_linears: int
    shards: int
    bytes: int


def quantize_w8a8(src: Path, dst: Path, max_shard_bytes: int,
                  progress: Callable[[int, int], None] | None = None) -> Summary:
    src, dst = Path(src), Path(dst)
    _check_destination(dst)
    if is_w8a8_folder(src):
        raise CheckpointError(f"{src}: already a W8A8 checkpoint ({DESCRIPTION_FILE})")
    cfg = load_model_config(src)
    ckpt = Checkpoint(src)
    validate_checkpoint(ckpt, cfg, cfg.num_layers)
    outputs = list(_outputs(ckpt, cfg))
    shards = plan_shards([o.planned for o in outputs], max_shard_bytes)
    with _staging_folder(dst) as tmp, _sigterm_as_interrupt():
        writer = ShardWriter(tmp, WEIGHTS_PREFIX, shards)
        try:
            for i, out in enumerate(outputs):
                writer.write(out.planned.name, out.compute())
                if progress:
                    progress(i + 1, len(outputs))
            writer.finish(INDEX_FILE)
        finally:
            writer.close()
        description = description_json({o.planned.name: o.quant_type for o in outputs}, W8A8_DYNAMIC)
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        _copy_side_files(src, tmp)
    return Summary(tensors=len(outputs), quantized_linears=sum(o.planned.name.endswith(".weight_scale") for o in outputs),
                   shards=len(shards), bytes=sum(o.planned.nbytes for o in outputs))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out, 1]): symmetric per output channel."""
    q, scale = quantize_rows(weight)
    return q, scale[:, None]


def _outputs(ckpt: Checkpoint, cfg: ModelConfig) -> Iterator[Output]:
    """Every tensor the runtime reads, in name order: quantizable linears as weight, weight_scale, weight_offset;
    other FP8 weights dequantized to the checkpoint dtype; the rest as stored. Layers past num_hidden_layers (the
    unpublished MTP modules) are left out, as msModelSlim's export leaves them out."""
    float_dtype = getattr(torch, cfg.checkpoint_dtype, torch.bfloat16)
    expected = expected_tensors(cfg, cfg.num_layers)
    for name in sorted(expected):
        if name.endswith(".weight_scale_inv"):
            continue  # consumed with its FP8 weight
        module = name.removesuffix(".weight")
        fp8 = f"{module}.weight_scale_inv" in expected
        read = _float_reader(ckpt, cfg, name, module) if fp8 else (lambda name=name: ckpt.read(name))
        shape = ckpt.shape(name)
        if name.endswith(".weight") and QUANTIZABLE.search(module):
            yield from _quantized_outputs(module, shape, read)
        elif fp8:
            yield Output(PlannedTensor(name, shape, float_dtype), FLOAT, lambda read=read: read().to(float_dtype))
        else:
            yield Output(PlannedTensor(name, shape, TORCH_DTYPES[ckpt.dtype(name)]), FLOAT, read)


def _float_reader(ckpt: Checkpoint, cfg: ModelConfig, name: str, module: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        return dequantize_fp8_block(ckpt.read(name), ckpt.read(f"{module}.weight_scale_inv"), cfg.fp8_block,
                                    torch.float32)
    return read


def _quantized_outputs(module: str, shape: tuple[int, ...], read: Callable[[], torch.Tensor]) -> Iterator[Output]:
    """weight, weight_scale, weight_offset of one module; quantized once when the weight is written, the small
    scale kept for the two entries after it."""
    held: dict[str, torch.Tensor] = {}

    def weight() -> torch.Tensor:
        held["weight"], held["scale"] = quantize_weight(read())
        return held.pop("weight")

    rows = shape[0]
    yield Output(PlannedTensor(f"{module}.weight", shape, torch.int8), W8A8_DYNAMIC, weight)
    yield Output(PlannedTensor(f"{module}.weight_scale", (rows, 1), torch.float32), W8A8_DYNAMIC,
                 lambda: held.pop("scale"))
    yield Output(PlannedTensor(f"{module}.weight_offset", (rows, 1), torch.float32), W8A8_DYNAMIC,
                 lambda: torch.zeros(rows, 1))


def _check_destination(dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise MoerunError(f"{dst}: exists and is not a folder; give a new or empty folder as DST")
    if dst.is_dir() and any(dst.iterdir()):
        raise MoerunError(f"{dst}: exists and is not empty; give a new or empty folder as DST")
    if not dst.parent.is_dir():
        raise MoerunError(f"{dst.parent}: folder does not exist (DST's parent must)")


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if not path.is_file() or not path.name.endswith(SIDE_FILE_SUFFIXES) or path.name.endswith(NOT_COPIED):
            continue
        if path.name == "config.json":
            config = json.loads(path.read_text())
            config.pop("quantization_config", None)  # the weights are no longer FP8; msModelSlim drops it too
            (dst / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, dst / path.name)


@contextlib.contextmanager
def _staging_folder(dst: Path) -> Iterator[Path]:
    """A temporary folder beside dst, renamed to dst when the block succeeds, removed whatever else happens."""
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result gets the usual permissions
        if dst.is_dir():
            dst.rmdir()  # empty, checked before starting
        os.rename(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoerunError(f"{dst}: cannot write the W8A8 checkpoint ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the staging folder is removed either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
