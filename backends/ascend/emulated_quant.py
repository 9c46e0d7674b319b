"""CPU emulation of torch_npu's W8A8 ops: npu_dynamic_quant (per-token int8), npu_quant_matmul (int8 GEMM with
per-channel and per-token scales) and npu_dequant_swiglu_quant (int32 -> dequant -> SwiGLU -> per-token int8).

Signatures follow op-plugin's op_plugin_functions.yaml (517f2e7); semantics, dtype tables and limits the op-plugin
docs (docs/zh/custom_APIs/torch_npu/torch_npu-<op>.md). Where a doc gives only a formula, the arithmetic follows
Huawei's goldens: hicann/ops-nn quant/dynamic_quant/tests/assets/golden.py (scale = rowmax|x| / 127 in fp32,
y = round(x / scale), an all-zero row gets scale 1) and op-plugin test/test_custom_ops/test_npu_dequant_swiglu_quant.py
(fp32 throughout; the requantization multiplies by 127 / rowmax; round half to even, "rint", which is also the
round_mode vllm-ascend passes). Integer products are summed exactly.

The one widening of the emulation (emulated_attention) extends here: float32 activations and outputs are accepted
next to float16/bfloat16, so W8A8 layouts can be checked against the CPU reference without 16-bit noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moerun.backends.ascend.emulated_checks import (
    not_emulated, reject_given, require, require_dtype, undefined_like)

HARDWARE_FLOATS = (torch.float16, torch.bfloat16)
EMULATED_FLOATS = HARDWARE_FLOATS + (torch.float32,)  # the emulation's widening, see the module docstring
INT8_MAX = 127
MATMUL_LAST_DIM_LIMIT = 65535  # npu_quant_matmul: the last dim of x1 and of x2
SWIGLU_H_LIMIT = 10496  # npu_dequant_swiglu_quant with group_index: H (half the last dim) <= 10496, 64-aligned
SWIGLU_H_ALIGN = 64


def exact_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 b [K, N] -> int32, exact (|products| <= 2^14, K < 2^16: no partial sum leaves int32)."""
    return a.to(torch.int32) @ b.to(torch.int32)


def _round_to_int8(values: torch.Tensor) -> torch.Tensor:
    return torch.round(values).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)  # torch.round: half to even


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None,  # noqa: A002 (torch_npu's name)
                      quant_mode="pertoken", dst_type_max=0.0):
    """-> (y int8 like input, scale fp32 input.shape[:-1]): symmetric per-token quantization of the last dim."""
    op = "npu_dynamic_quant"
    reject_given(op, smooth_scales=smooth_scales, group_index=group_index)
    require(input.dim() > 1, op, f"input must have more than 1 dim, got {input.dim()}")
    require_dtype(input, EMULATED_FLOATS, op, "input")
    if dst_type == torch.quint4x2:
        not_emulated(op, "dst_type quint4x2 (int4 packed in int32)")
    require(dst_type in (None, torch.int8), op, f"dst_type {dst_type} is not supported on A2/A3 (int8, quint4x2)")
    # A2/A3 do not take these two parameters ("暂不支持"); the kernel would quantize per token whatever was asked.
    require(quant_mode == "pertoken", op, f"quant_mode {quant_mode!r} is not supported on A2/A3 (pertoken only)")
    require(dst_type_max == 0.0, op, "dst_type_max is not supported on A2/A3")
    xf = input.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return _round_to_int8(xf / scale[..., None]), scale


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     group_sizes=None):
    """int8 x1 [M, K] @ int8 x2 [K, N] summed exactly, then * scale (per output channel, or one) * pertoken_scale
    (per row) in fp32, rounded once to output_dtype."""
    op = "npu_quant_matmul"
    reject_given(op, offset=offset, bias=bias, group_sizes=group_sizes)
    for name, t in (("x1", x1), ("x2", x2)):
        require(2 <= t.dim() <= 6, op, f"{name} must have 2 to 6 dims, got {t.dim()}")
        if t.dtype == torch.int32:
            not_emulated(op, f"{name} int32 (int4 packed)")
        require_dtype(t, (torch.int8,), op, name)
        require(t.shape[-1] <= MATMUL_LAST_DIM_LIMIT, op,
                f"the last dim of {name} must be <= {MATMUL_LAST_DIM_LIMIT}, got {t.shape[-1]}")
    if x1.dim() > 2 or x2.dim() > 2:
        not_emulated(op, "batched (3-6 dim) inputs")
    require(x1.shape[1] == x2.shape[0], op, f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} do not multiply")
    m, n = x1.shape[0], x2.shape[1]
    if scale.dtype == torch.int64:
        not_emulated(op, "int64 scale (from npu_trans_quant_param)")
    require_dtype(scale, (torch.float32, torch.bfloat16), op, "scale")
    require(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale must be (1,) or ({n},), got {tuple(scale.shape)}")
    if pertoken_scale is not None:
        require_dtype(pertoken_scale, (torch.float32,), op, "pertoken_scale")
        require(pertoken_scale.shape == (m,), op, f"pertoken_scale must be ({m},), got {tuple(pertoken_scale.shape)}")
    out_dtype = torch.int8 if output_dtype is None else output_dtype
    if out_dtype in (torch.int8, torch.int32):
        not_emulated(op, f"output_dtype {out_dtype} (quantized or raw integer output)")
    require(out_dtype in EMULATED_FLOATS, op, f"output_dtype {out_dtype} is not supported (int8, float16, bfloat16, int32)")
    # The A2/A3 dtype table: a bfloat16 scale only for bfloat16 output.
    require(scale.dtype == torch.float32 or out_dtype == torch.bfloat16, op,
            f"a bfloat16 scale needs output_dtype bfloat16, got {out_dtype}")
    out = exact_int8_matmul(x1, x2).float() * scale.float()
    if pertoken_scale is not None:
        out = out * pertoken_scale[:, None]
    return out.to(out_dtype)


def npu_dequant_swiglu_quant(x, *, weight_scale=None, activation_scale=None, bias=None, quant_scale=None,
                             quant_offset=None, group_index=None, activate_left=False, quant_mode=0, dst_type=None,
                             round_mode=None, activate_dim=None, swiglu_mode=0, clamp_limit=7.0, glu_alpha=1.702,
                             glu_bias=1.0):
    """int32 x [M, 2H] -> (y int8 [M, H], scale fp32 [M]). Per group g of rows (group_index: row counts):
    x * weight_scale[g] * activation_scale[row] in fp32, swish of one half times the other (the left half is
    swished when activate_left), then dynamic int8 quantization per row. Rows past the groups are unwritten."""
    op = "npu_dequant_swiglu_quant"
    reject_given(op, bias=bias, quant_scale=quant_scale, quant_offset=quant_offset)
    require(x.dim() == 2, op, f"x must be 2-D [tokens, 2H], got {x.dim()}-D")
    if x.dtype in HARDWARE_FLOATS:
        not_emulated(op, "float x (SwiGLU + quantization without dequantization)")
    require_dtype(x, (torch.int32,), op, "x")
    rows, width = x.shape
    require(width % 2 == 0, op, f"the last dim of x must be even, got {width}")
    half = width // 2
    require(quant_mode in (0, 1), op, f"quant_mode must be 0 (static) or 1 (dynamic), got {quant_mode}")
    if quant_mode == 0:
        not_emulated(op, "quant_mode 0 (static quantization)")
    require(swiglu_mode in (0, 1, 2), op, f"swiglu_mode must be 0, 1 or 2, got {swiglu_mode}")
    if swiglu_mode != 0:
        not_emulated(op, f"swiglu_mode {swiglu_mode} (clamped SwiGLU variants)")
    if dst_type not in (None, torch.int8):
        not_emulated(op, f"dst_type {dst_type}")
    if round_mode not in (None, "rint"):
        not_emulated(op, f"round_mode {round_mode!r}")
    if activate_dim not in (None, -1, 1):
        not_emulated(op, f"activate_dim {activate_dim}")
    require(activation_scale is not None, op, "an int32 x needs activation_scale (the per-token dequantization)")
    require_dtype(activation_scale, (torch.float32,), op, "activation_scale")
    # The doc gives [tokens, 1]; vllm-ascend passes the flat [tokens] scale of npu_moe_init_routing_v2.
    require(tuple(activation_scale.shape) in ((rows, 1), (rows,)), op,
            f"activation_scale must be [{rows}, 1] (or [{rows}]), got {tuple(activation_scale.shape)}")

    if group_index is None:
        counts = [rows]
    else:
        require(group_index.dim() == 1 and group_index.dtype == torch.int64, op, "group_index must be 1-D int64")
        counts = group_index.tolist()
        require(all(c >= 0 for c in counts), op, f"group_index holds row counts (count mode), got {counts}")
        # The kernel does not check: counts beyond the rows read out of bounds.
        require(sum(counts) <= rows, op, f"group_index sums to {sum(counts)}, beyond the {rows} rows of x")
        require(half <= SWIGLU_H_LIMIT and half % SWIGLU_H_ALIGN == 0, op,
                f"with group_index, H = {half} must be <= {SWIGLU_H_LIMIT} and a multiple of {SWIGLU_H_ALIGN}")
    if weight_scale is None:
        scales = torch.ones(len(counts), width)
    else:
        require_dtype(weight_scale, (torch.float32,), op, "weight_scale")
        scales = weight_scale.reshape(1, -1) if weight_scale.dim() == 1 else weight_scale
        require(tuple(scales.shape) == (len(counts), width), op,
                f"weight_scale must be [{len(counts)}, {width}] (one row per group), got {tuple(weight_scale.shape)}")

    y = undefined_like((rows, half), torch.int8, x.device)
    out_scale = undefined_like((rows,), torch.float32, x.device)
    act = activation_scale.reshape(-1)
    start = 0
    for g, count in enumerate(counts):
        end = start + count
        dequant = x[start:end].float() * scales[g].float() * act[start:end, None]
        left, right = dequant[:, :half], dequant[:, half:]
        swiglu = F.silu(left) * right if activate_left else F.silu(right) * left
        row_max = swiglu.abs().amax(dim=-1)
        safe_max = torch.where(row_max == 0, torch.ones_like(row_max), row_max)  # an all-zero row stays zero
        y[start:end] = _round_to_int8(swiglu * (INT8_MAX / safe_max)[:, None])
        out_scale[start:end] = row_max / INT8_MAX
        start = end
    return y, out_scale
