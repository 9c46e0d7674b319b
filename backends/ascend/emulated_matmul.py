"""CPU emulation of torch_npu.npu_grouped_matmul, unquantized, in the two forms moerun's MoE uses:

* grouped along M (group_type=0), single x [M, K], single stacked weight [E, K, N] ("单单单") or a list of E
  weights [K, N] ("单多单"), split_item 2/3 (one output [M, N]); group_list a 1-D int64 Tensor of per-group
  row counts (group_list_type=1) or their cumsum (0). Group e multiplies rows [start_e, end_e) by its weight.
* no grouping (group_type=-1/None), lists of independent x_i @ w_i, split_item 0/1.

Accumulation in fp32, one rounding to the output dtype. Quantized and weight-only modes are not emulated.
"""

from __future__ import annotations

import torch

from moerun.backends.ascend.emulated_checks import not_emulated, reject_given, require, require_dtype

OP = "npu_grouped_matmul"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUPS = 1024
INNER_LIMIT = 65536  # A2/A3: the last dim of every x_i and weight_i must be smaller
MAX_LIST = 128


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    """-> a list of output tensors: one per weight (split_item 0/1) or a single [M, N] (split_item 2/3)."""
    reject_given(OP, bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                 antiquant_offset=antiquant_offset, per_token_scale=per_token_scale, activation_input=activation_input,
                 activation_quant_scale=activation_quant_scale, activation_quant_offset=activation_quant_offset)
    require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), OP, "x and weight are lists of tensors")
    require(0 < len(x) <= MAX_LIST and 0 < len(weight) <= MAX_LIST, OP, f"x and weight hold 1..{MAX_LIST} tensors")
    require(act_type == 0, OP, "activation fusion (act_type) is for per-token quantization only")
    require(split_item in (0, 1, 2, 3), OP, f"split_item must be 0..3, got {split_item}")
    dtype = x[0].dtype
    for t in list(x) + list(weight):
        require_dtype(t, FLOATS, OP, "x/weight")
        require(t.dtype == dtype, OP, "unquantized x and weight must share one dtype")
        inner = t.shape[-1] if t.stride(-1) == 1 else t.shape[-2]  # contiguous in memory: K of a transposed view
        require(inner < INNER_LIMIT, OP, f"the inner dim of every x/weight must be < {INNER_LIMIT}, got {inner}")
    require(output_dtype is None or output_dtype == dtype, OP, "unquantized output_dtype must be None or x's dtype")
    group_type = -1 if group_type is None else group_type
    require(group_type in (-1, 0, 2), OP, f"group_type must be -1, 0 or 2 on A2/A3, got {group_type}")
    if group_type == 2:
        not_emulated(OP, "group_type 2 (grouping along K)")
    if group_type == -1:
        return _ungrouped(x, weight, group_list, split_item)
    return [_grouped_along_m(x, weight, group_list, group_list_type, split_item)]


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


def _grouped_along_m(x, weight, group_list, group_list_type, split_item):
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
    require(group_list.dim() == 1 and group_list.dtype == torch.int64, OP, "group_list must be 1-D int64")
    groups = group_list.shape[0]
    require(groups <= MAX_GROUPS, OP, f"at most {MAX_GROUPS} groups, got {groups}")
    require(groups == len(weights), OP, f"group_list has {groups} entries for {len(weights)} weights")
    require(group_list_type in (0, 1, 2), OP, f"group_list_type must be 0, 1 or 2, got {group_list_type}")
    require(group_list_type != 2, OP, "group_list_type 2 needs int8 x and weight")
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
    out = torch.empty(rows, weights[0].shape[1], dtype=xs.dtype, device=xs.device)
    start = 0
    for w, end in zip(weights, ends):
        out[start:end] = (xs[start:end].float() @ w.float()).to(xs.dtype)
        start = end
    return out
