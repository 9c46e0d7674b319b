"""CPU emulation of torch_npu.npu_grouped_matmul in the forms moerun's MoE uses:

* grouped along M (group_type=0), single x [M, K], single stacked weight [E, K, N] ("单单单") or a list of E
  weights [K, N] ("单多单"), split_item 2/3 (one output [M, N]); group_list a 1-D int64 Tensor of per-group
  row counts (group_list_type=1) or their cumsum (0). Group e multiplies rows [start_e, end_e) by its weight.
* no grouping (group_type=-1/None), lists of independent x_i @ w_i, split_item 0/1.
* int8 x and weight ("全量化", the W8A8 MoE), grouped along M with a stacked weight: products summed exactly, then
  either returned as int32 (no scale, output_dtype int32: what vllm-ascend feeds npu_dequant_swiglu_quant) or
  dequantized in fp32 as (x_e @ w_e) * scale[e] (* per_token_scale[row]) and rounded once to output_dtype, with
  the A2/A3 dtype table: a bfloat16 scale gives bfloat16, a float32 scale float16 (float32 too under emulation:
  the widening of emulated_quant).

Float accumulation in fp32, one rounding to the output dtype. Weight-only (antiquant) modes are not emulated.
"""

from __future__ import annotations

import torch

from moerun.backends.ascend.emulated_checks import not_emulated, reject_given, require, require_dtype
from moerun.backends.ascend.emulated_quant import exact_int8_matmul

OP = "npu_grouped_matmul"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# int8 x int8 with a weight scale: the scale dtype decides the output dtype (float32 -> float32 is the widening).
QUANTIZED_OUTPUTS = {torch.bfloat16: (torch.bfloat16,), torch.float32: (torch.float16, torch.float32)}
MAX_GROUPS = 1024
INNER_LIMIT = 65536  # A2/A3: the last dim of every x_i and weight_i must be smaller
MAX_LIST = 128


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    """-> a list of output tensors: one per weight (split_item 0/1) or a single [M, N] (split_item 2/3)."""
    reject_given(OP, bias=bias, offset=offset, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                 activation_input=activation_input, activation_quant_scale=activation_quant_scale,
                 activation_quant_offset=activation_quant_offset)
    require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), OP, "x and weight are lists of tensors")
    require(0 < len(x) <= MAX_LIST and 0 < len(weight) <= MAX_LIST, OP, f"x and weight hold 1..{MAX_LIST} tensors")
    require(act_type == 0, OP, "activation fusion (act_type) is not emulated here; moerun passes 0")
    require(split_item in (0, 1, 2, 3), OP, f"split_item must be 0..3, got {split_item}")
    quantized = x[0].dtype == torch.int8
    dtype = x[0].dtype
    for t in list(x) + list(weight):
        if quantized:
            require_dtype(t, (torch.int8,), OP, "x/weight (int8 x takes an int8 weight)")
        else:
            require_dtype(t, FLOATS, OP, "x/weight")
            require(t.dtype == dtype, OP, "unquantized x and weight must share one dtype")
        inner = t.shape[-1] if t.stride(-1) == 1 else t.shape[-2]  # contiguous in memory: K of a transposed view
        require(inner < INNER_LIMIT, OP, f"the inner dim of every x/weight must be < {INNER_LIMIT}, got {inner}")
    group_type = -1 if group_type is None else group_type
    require(group_type in (-1, 0, 2), OP, f"group_type must be -1, 0 or 2 on A2/A3, got {group_type}")
    if group_type == 2:
        not_emulated(OP, "group_type 2 (grouping along K)")
    if quantized:
        if group_type != 0 or len(weight) != 1:
            not_emulated(OP, "int8 matmuls other than grouped along M with one stacked weight")
        product = _quantized_product(weight[0], scale, per_token_scale, output_dtype, x[0].shape[0])
        return [_grouped_along_m(x, weight, group_list, group_list_type, split_item, product)]
    if scale is not None or per_token_scale is not None:
        not_emulated(OP, "scale / per_token_scale with float x")
    require(output_dtype is None or output_dtype == dtype, OP, "unquantized output_dtype must be None or x's dtype")
    if group_type == -1:
        return _ungrouped(x, weight, group_list, split_item)
    return [_grouped_along_m(x, weight, group_list, group_list_type, split_item, _float_product)]


def _float_product(rows: torch.Tensor, w: torch.Tensor, group: int, row_slice: slice) -> torch.Tensor:
    return (rows.float() @ w.float()).to(rows.dtype)


def _quantized_product(stacked, scale, per_token_scale, output_dtype, num_rows):
    """The per-group product of the int8 form, after checking its scales against the A2/A3 dtype table."""
    require(stacked.dim() == 3, OP, "a single weight must be stacked [E, K, N]")
    experts, _, n = stacked.shape
    if scale is None:
        require(per_token_scale is None, OP, "per_token_scale needs scale")
        require(output_dtype == torch.int32, OP,
                f"int8 x and weight without scale give int32 (output_dtype int32), got {output_dtype}")
        return lambda rows, w, group, row_slice: exact_int8_matmul(rows, w)
    require(isinstance(scale, (list, tuple)) and len(scale) == 1, OP, "scale is a list of one tensor here")
    weight_scale = scale[0]
    if weight_scale.dtype == torch.int64:
        not_emulated(OP, "int64 scale (int8 output)")
    require_dtype(weight_scale, tuple(QUANTIZED_OUTPUTS), OP, "scale")
    require(tuple(weight_scale.shape) == (experts, n), OP,
            f"scale of a stacked weight must be [{experts}, {n}], got {tuple(weight_scale.shape)}")
    allowed = QUANTIZED_OUTPUTS[weight_scale.dtype]
    require(output_dtype in allowed, OP, f"a {str(weight_scale.dtype).removeprefix('torch.')} scale gives output_dtype "
            f"{' or '.join(str(d).removeprefix('torch.') for d in allowed)}, got {output_dtype}")
    token_scale = None
    if per_token_scale is not None:
        require(isinstance(per_token_scale, (list, tuple)) and len(per_token_scale) == 1, OP,
                "per_token_scale is a list of one tensor (one per x)")
        token_scale = per_token_scale[0]
        require_dtype(token_scale, (torch.float32,), OP, "per_token_scale")
        require(tuple(token_scale.shape) == (num_rows,), OP,
                f"per_token_scale must be 1-D [{num_rows}] (one per row of x), got {tuple(token_scale.shape)}")

    def product(rows: torch.Tensor, w: torch.Tensor, group: int, row_slice: slice) -> torch.Tensor:
        out = exact_int8_matmul(rows, w).float() * weight_scale[group].float()
        if token_scale is not None:
            out = out * token_scale[row_slice, None]
        return out.to(output_dtype)

    return product


def _ungrouped(x, weight, group_list, split_item):
    require(group_list is None, OP, "group_type -1 takes no group_list")
    require(split_item in (0, 1), OP, "group_type -1 (independent matmuls) needs split_item 0 or 1")
    require(len(x) == len(weight), OP, "x and weight lists must have the same length")
    out = []
    for xi, wi in zip(x, weight):
        require(wi.dim() == 2, OP, "weights of independent matmuls are 2-D")
        require(xi.shape[-1] == wi.shape[0], OP, f"x {tuple(xi.shape)} and weight {tuple(wi.shape)} do not multiply")
        out.append((xi.float() @ wi.float()).to(xi.dtype))
    return out


def _grouped_along_m(x, weight, group_list, group_list_type, split_item, product):
    require(split_item in (2, 3), OP, "grouping along M with a single x needs split_item 2 or 3 (one output)")
    require(len(x) == 1 and x[0].dim() == 2, OP, "grouping along M takes a single 2-D x [M, K]")
    xs = x[0]
    require(xs.stride(-1) == 1, OP, "x must not be transposed")
    if len(weight) == 1:
        require(weight[0].dim() == 3, OP, "a single weight must be stacked [E, K, N]")
        weights = list(weight[0].unbind(0))
    else:
        require(all(w.dim() == 2 for w in weight), OP, "a list of weights holds 2-D [K, N] tensors")
        require(len({w.shape[1] for w in weight}) == 1, OP, "every weight's N must be equal")
        weights = list(weight)
    for w in weights:  # a transposed (non-contiguous) weight view is allowed; its last dim is then K
        require(w.shape[0] == xs.shape[1], OP, f"x [M, {xs.shape[1]}] and weight {tuple(w.shape)} do not multiply")
    require(isinstance(group_list, torch.Tensor), OP,
            "group_list must be a Tensor here (the List[int] form is not emulated)")
    require(group_list_type in (0, 1, 2), OP, f"group_list_type must be 0, 1 or 2, got {group_list_type}")
    if group_list_type == 2:
        require(xs.dtype == torch.int8, OP, "group_list_type 2 needs int8 x and weight")
        not_emulated(OP, "group_list_type 2 ((group, size) pairs)")
    require(group_list.dim() == 1 and group_list.dtype == torch.int64, OP, "group_list must be 1-D int64")
    groups = group_list.shape[0]
    require(groups <= MAX_GROUPS, OP, f"at most {MAX_GROUPS} groups, got {groups}")
    require(groups == len(weights), OP, f"group_list has {groups} entries for {len(weights)} weights")
    values = group_list.tolist()
    rows = xs.shape[0]
    require(all(v >= 0 for v in values), OP, f"group_list must be non-negative, got {values}")
    if group_list_type == 0:
        require(all(b >= a for a, b in zip(values, values[1:])), OP,
                f"a cumsum group_list must be non-decreasing, got {values}")
        require(values[-1] == rows, OP, f"a cumsum group_list must end at M = {rows}, got {values[-1]}")
        ends = values
    else:
        require(sum(values) == rows, OP, f"a count group_list must sum to M = {rows}, got {sum(values)}")
        ends = torch.tensor(values).cumsum(0).tolist()
    parts, start = [], 0
    for group, (w, end) in enumerate(zip(weights, ends)):
        parts.append(product(xs[start:end], w, group, slice(start, end)))
        start = end
    return torch.cat(parts)
