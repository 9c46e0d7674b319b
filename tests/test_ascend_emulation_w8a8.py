"""The emulated torch_npu W8A8 ops (npu_dynamic_quant, npu_quant_matmul, int8 npu_grouped_matmul,
npu_dequant_swiglu_quant) against their documented math written independently in numpy (int64 dot products, row
loops), and every documented constraint the backend could trip."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from moerun.backends.ascend import emulation as npu
from moerun.backends.ascend.emulation import ConstraintError, NotEmulatedError

rng = np.random.default_rng(3)

DOCUMENTED = {  # op-plugin op_plugin_functions.yaml (517f2e7)
    "npu_dynamic_quant": "input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode='pertoken', "
                         "dst_type_max=0.0",
    "npu_quant_matmul": "x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, "
                        "group_sizes=None",
    "npu_dequant_swiglu_quant": "x, *, weight_scale=None, activation_scale=None, bias=None, quant_scale=None, "
                                "quant_offset=None, group_index=None, activate_left=False, quant_mode=0, "
                                "dst_type=None, round_mode=None, activate_dim=None, swiglu_mode=0, clamp_limit=7.0, "
                                "glu_alpha=1.702, glu_bias=1.0",
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_signature_matches_torch_npu(name):
    assert str(inspect.signature(getattr(npu, name))) == f"({DOCUMENTED[name]})"


def int8(*shape) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ---- npu_dynamic_quant ----------------------------------------------------------------------------------------

def np_dynamic_quant(x: np.ndarray):
    """scale = rowmax|x| / 127 (1 for a zero row), y = round half to even of x / scale, in float32."""
    x = x.astype(np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    return np.clip(np.rint(x / scale[..., None]), -128, 127).astype(np.int8), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dynamic_quant_per_token(dtype):
    x = t(rng.standard_normal((3, 5, 33)).astype(np.float32) * 4).to(dtype)
    x[1, 2] = 0  # an all-zero token
    y, scale = npu.npu_dynamic_quant(x)
    y_np, scale_np = np_dynamic_quant(x.float().numpy())
    assert y.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 5)
    assert np.array_equal(y.numpy(), y_np) and np.array_equal(scale.numpy(), scale_np)
    assert scale[1, 2] == 1 and (y[1, 2] == 0).all()


def test_dynamic_quant_ties_go_to_even():
    y, _ = npu.npu_dynamic_quant(torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -3.5]]).bfloat16())
    assert y[0].tolist() == [127, 0, 2, 2, -2, -4]


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(input=torch.zeros(4)), ConstraintError, "more than 1 dim"),
    (dict(input=torch.zeros(2, 4, dtype=torch.int8)), ConstraintError, "dtype int8"),
    (dict(quant_mode="pertensor"), ConstraintError, "pertoken only"),
    (dict(dst_type_max=127.0), ConstraintError, "dst_type_max"),
    (dict(dst_type=torch.float8_e4m3fn), ConstraintError, "not supported on A2/A3"),
    (dict(dst_type=torch.quint4x2), NotEmulatedError, "quint4x2"),
    (dict(smooth_scales=torch.ones(4)), NotEmulatedError, "smooth_scales"),
], ids=["1-D", "int input", "per-tensor", "dst_type_max", "fp8 output", "int4", "smooth"])
def test_dynamic_quant_constraints(kwargs, error, message):
    args = {"input": torch.zeros(2, 4, dtype=torch.bfloat16), **kwargs}
    with pytest.raises(error, match=message):
        npu.npu_dynamic_quant(args.pop("input"), **args)


# ---- npu_quant_matmul -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype,scale_dtype,tol", [
    (torch.float32, torch.float32, 0.0), (torch.bfloat16, torch.float32, 2 ** -8),
    (torch.bfloat16, torch.bfloat16, 2 ** -8), (torch.float16, torch.float32, 2 ** -10)],
    ids=["fp32", "bf16 out", "bf16 scale", "fp16 out"])
def test_quant_matmul_per_channel_and_per_token(out_dtype, scale_dtype, tol):
    x1, x2 = int8(7, 96), int8(96, 40)
    scale = rng.uniform(1e-3, 1e-2, 40).astype(np.float32)
    pertoken = rng.uniform(1e-2, 1e-1, 7).astype(np.float32)
    scale_t = t(scale).to(scale_dtype)
    out = npu.npu_quant_matmul(t(x1), t(x2), scale_t, pertoken_scale=t(pertoken), output_dtype=out_dtype)
    acc = x1.astype(np.int64) @ x2.astype(np.int64)  # exact
    expected = acc.astype(np.float32) * scale_t.float().numpy()[None, :] * pertoken[:, None]
    assert out.dtype == out_dtype and out.shape == (7, 40)
    assert np.abs(out.float().numpy() - expected).max() <= tol * np.abs(expected).max()


def test_quant_matmul_one_scale_for_all_channels_and_no_pertoken_scale():
    x1, x2 = int8(3, 16), int8(16, 5)
    out = npu.npu_quant_matmul(t(x1), t(x2), torch.tensor([0.5]), output_dtype=torch.float32)
    assert np.array_equal(out.numpy(), (x1.astype(np.int64) @ x2.astype(np.int64)).astype(np.float32) * 0.5)


def _qmm(**change):
    args = dict(x1=torch.zeros(4, 8, dtype=torch.int8), x2=torch.zeros(8, 6, dtype=torch.int8),
                scale=torch.ones(6), pertoken_scale=torch.ones(4), output_dtype=torch.bfloat16)
    args.update(change)
    return lambda: npu.npu_quant_matmul(args.pop("x1"), args.pop("x2"), args.pop("scale"), **args)


@pytest.mark.parametrize("change,error,message", [
    (dict(x1=torch.zeros(4, 8)), ConstraintError, "x1 dtype float32"),
    (dict(x2=torch.zeros(9, 6, dtype=torch.int8)), ConstraintError, "do not multiply"),
    (dict(x1=torch.zeros(1, 65536, dtype=torch.int8), x2=torch.zeros(65536, 6, dtype=torch.int8)),
     ConstraintError, "<= 65535"),
    (dict(scale=torch.ones(5)), ConstraintError, r"\(1,\) or \(6,\)"),
    (dict(scale=torch.ones(6, dtype=torch.float16)), ConstraintError, "scale dtype float16"),
    (dict(scale=torch.ones(6, dtype=torch.bfloat16), output_dtype=torch.float16), ConstraintError,
     "bfloat16 scale needs output_dtype bfloat16"),
    (dict(pertoken_scale=torch.ones(4, dtype=torch.bfloat16)), ConstraintError, "pertoken_scale dtype"),
    (dict(pertoken_scale=torch.ones(3)), ConstraintError, r"\(4,\)"),
    (dict(output_dtype=None), NotEmulatedError, "int8"),
    (dict(scale=torch.ones(6, dtype=torch.int64)), NotEmulatedError, "int64 scale"),
    (dict(bias=torch.ones(6, dtype=torch.int32)), NotEmulatedError, "bias"),
    (dict(x1=torch.zeros(2, 4, 8, dtype=torch.int8)), NotEmulatedError, "batched"),
], ids=["float x1", "K mismatch", "last dim", "scale length", "fp16 scale", "bf16 scale fp16 out",
        "bf16 pertoken", "pertoken length", "int8 output", "int64 scale", "bias", "batched"])
def test_quant_matmul_constraints(change, error, message):
    with pytest.raises(error, match=message):
        _qmm(**change)()


# ---- npu_grouped_matmul, int8 ---------------------------------------------------------------------------------

COUNTS = [3, 0, 5, 1, 0, 4]  # experts 1 and 4 get no rows


def np_grouped(x, w, counts):
    """Row by row: the group of row r is the first whose running count exceeds r; exact int64 products."""
    ends = np.cumsum(counts)
    out = np.empty((x.shape[0], w.shape[-1]), dtype=np.int64)
    for r in range(x.shape[0]):
        out[r] = x[r].astype(np.int64) @ w[np.argmax(ends > r)].astype(np.int64)
    return out


def test_grouped_matmul_int8_to_exact_int32():
    x, w = int8(sum(COUNTS), 64), int8(len(COUNTS), 64, 24)
    (y,) = npu.npu_grouped_matmul([t(x)], [t(w)], group_list=torch.tensor(COUNTS), split_item=3, group_type=0,
                                  group_list_type=1, output_dtype=torch.int32)
    assert y.dtype == torch.int32 and np.array_equal(y.numpy(), np_grouped(x, w, COUNTS))


@pytest.mark.parametrize("scale_dtype,out_dtype,tol", [
    (torch.bfloat16, torch.bfloat16, 2 ** -8), (torch.float32, torch.float16, 2 ** -10),
    (torch.float32, torch.float32, 1e-7)], ids=["bf16", "fp16", "fp32"])
def test_grouped_matmul_int8_per_channel_and_per_token_scales(scale_dtype, out_dtype, tol):
    x, w = int8(sum(COUNTS), 32), int8(len(COUNTS), 32, 16)
    scale = t(rng.uniform(1e-3, 1e-2, (len(COUNTS), 16)).astype(np.float32)).to(scale_dtype)
    per_token = rng.uniform(1e-2, 1e-1, sum(COUNTS)).astype(np.float32)
    (y,) = npu.npu_grouped_matmul([t(x)], [t(w)], scale=[scale], per_token_scale=[t(per_token)],
                                  group_list=torch.tensor(COUNTS).cumsum(0), split_item=2, group_type=0,
                                  group_list_type=0, output_dtype=out_dtype)
    groups = np.repeat(np.arange(len(COUNTS)), COUNTS)
    expected = np_grouped(x, w, COUNTS).astype(np.float32) * scale.float().numpy()[groups] * per_token[:, None]
    assert y.dtype == out_dtype and np.abs(y.float().numpy() - expected).max() <= tol * np.abs(expected).max()


def _qgmm(**change):
    rows = sum(COUNTS)
    args = dict(x=[torch.zeros(rows, 8, dtype=torch.int8)], weight=[torch.zeros(6, 8, 4, dtype=torch.int8)],
                scale=[torch.ones(6, 4, dtype=torch.bfloat16)], per_token_scale=[torch.ones(rows)],
                group_list=torch.tensor(COUNTS), split_item=2, group_type=0, group_list_type=1,
                output_dtype=torch.bfloat16)
    args.update(change)
    return lambda: npu.npu_grouped_matmul(args.pop("x"), args.pop("weight"), **args)


@pytest.mark.parametrize("change,error,message", [
    (dict(weight=[torch.zeros(6, 8, 4)]), ConstraintError, "int8 x takes an int8 weight"),
    (dict(scale=[torch.ones(6, 4)], output_dtype=torch.bfloat16), ConstraintError, "float32 scale gives"),
    (dict(output_dtype=torch.float16), ConstraintError, "bfloat16 scale gives"),
    (dict(scale=[torch.ones(6, 5, dtype=torch.bfloat16)]), ConstraintError, r"\[6, 4\]"),
    (dict(per_token_scale=[torch.ones(3)]), ConstraintError, r"\[13\]"),
    (dict(per_token_scale=[torch.ones(13, dtype=torch.bfloat16)]), ConstraintError, "per_token_scale dtype"),
    (dict(scale=None, per_token_scale=None), ConstraintError, "int32"),
    (dict(scale=None), ConstraintError, "per_token_scale needs scale"),
    (dict(group_list=torch.tensor([3, 0, 5, 1, 0, 3])), ConstraintError, "sum to M"),
    (dict(scale=[torch.ones(6, 4, dtype=torch.int64)]), NotEmulatedError, "int64"),
    (dict(group_list=torch.tensor([[0, 13]]), group_list_type=2), NotEmulatedError, "group_list_type 2"),
    (dict(weight=[torch.zeros(8, 4, dtype=torch.int8)] * 6), NotEmulatedError, "one stacked weight"),
], ids=["float weight", "fp32 scale bf16 out", "bf16 scale fp16 out", "scale shape", "per-token length",
        "bf16 per-token", "no scale not int32", "per-token alone", "counts off", "int64 scale", "pairs",
        "weight list"])
def test_grouped_matmul_int8_constraints(change, error, message):
    with pytest.raises(error, match=message):
        _qgmm(**change)()


# ---- npu_dequant_swiglu_quant ---------------------------------------------------------------------------------

def np_dequant_swiglu_quant(x, weight_scale, activation_scale, counts, activate_left):
    """Huawei's golden, row by row: dequant in float32, swish of one half times the other, y = rint(v * 127 / max)."""
    half = x.shape[1] // 2
    y, scale = np.zeros((x.shape[0], half), dtype=np.int64), np.zeros(x.shape[0], dtype=np.float32)
    groups = np.repeat(np.arange(len(counts)), counts)
    for r, g in enumerate(groups):
        v = x[r].astype(np.float32) * weight_scale[g] * activation_scale[r]
        a, b = (v[:half], v[half:]) if activate_left else (v[half:], v[:half])
        s = (a / (1 + np.exp(-a)) * b).astype(np.float32)
        row_max = np.abs(s).max()
        y[r] = np.clip(np.rint(s * (np.float32(127) / row_max)), -128, 127)
        scale[r] = row_max / np.float32(127)
    return y, scale


@pytest.mark.parametrize("activate_left", [True, False], ids=["left", "right"])
def test_dequant_swiglu_quant_grouped(activate_left):
    counts = [4, 0, 6, 3]
    rows, half = 15, 64  # two rows past the groups
    x = rng.integers(-30000, 30000, size=(rows, 2 * half)).astype(np.int32)
    weight_scale = rng.uniform(1e-4, 1e-3, (len(counts), 2 * half)).astype(np.float32)
    activation_scale = rng.uniform(1e-3, 1e-2, (rows, 1)).astype(np.float32)
    y, scale = npu.npu_dequant_swiglu_quant(t(x), weight_scale=t(weight_scale), activation_scale=t(activation_scale),
                                            group_index=torch.tensor(counts), activate_left=activate_left, quant_mode=1)
    y_np, scale_np = np_dequant_swiglu_quant(x, weight_scale, activation_scale[:, 0], counts, activate_left)
    used = sum(counts)
    assert y.dtype == torch.int8 and y.shape == (rows, half) and scale.shape == (rows,)
    # numpy's exp and torch's silu may differ in the last bit; a quotient that close to a .5 tie is rare.
    mismatch = y[:used].numpy().astype(np.int64) != y_np[:used]
    assert mismatch.mean() < 0.01 and np.abs(y[:used].numpy() - y_np[:used]).max() <= 1
    assert np.allclose(scale[:used].numpy(), scale_np[:used], rtol=1e-6, atol=0)
    assert (y[used:] == -128).all() and scale[used:].isnan().all()  # unwritten rows stay visibly undefined


def test_dequant_swiglu_quant_takes_the_flat_per_token_scale_too():
    x = t(rng.integers(-999, 999, size=(5, 128)).astype(np.int32))
    act = t(rng.uniform(0.1, 1, 5).astype(np.float32))
    y1, s1 = npu.npu_dequant_swiglu_quant(x, activation_scale=act, activate_left=True, quant_mode=1)
    y2, s2 = npu.npu_dequant_swiglu_quant(x, activation_scale=act[:, None], activate_left=True, quant_mode=1)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


def _dsq(**change):
    args = dict(x=torch.zeros(6, 128, dtype=torch.int32), weight_scale=torch.ones(2, 128),
                activation_scale=torch.ones(6, 1), group_index=torch.tensor([2, 4]), activate_left=True, quant_mode=1)
    args.update(change)
    return lambda: npu.npu_dequant_swiglu_quant(args.pop("x"), **args)


@pytest.mark.parametrize("change,error,message", [
    (dict(x=torch.zeros(6, 2, 64, dtype=torch.int32)), ConstraintError, "2-D"),
    (dict(x=torch.zeros(6, 127, dtype=torch.int32)), ConstraintError, "even"),
    (dict(activation_scale=None), ConstraintError, "needs activation_scale"),
    (dict(activation_scale=torch.ones(5, 1)), ConstraintError, "activation_scale must be"),
    (dict(group_index=torch.tensor([2, 5])), ConstraintError, "beyond the 6 rows"),
    (dict(group_index=torch.tensor([2, 4], dtype=torch.int32)), ConstraintError, "int64"),
    (dict(group_index=torch.tensor([3, -1])), ConstraintError, "count mode"),
    (dict(x=torch.zeros(6, 96, dtype=torch.int32), weight_scale=torch.ones(2, 96)), ConstraintError, "multiple of 64"),
    (dict(weight_scale=torch.ones(3, 128)), ConstraintError, r"\[2, 128\]"),
    (dict(quant_mode=2), ConstraintError, "quant_mode"),
    (dict(quant_mode=0), NotEmulatedError, "static"),
    (dict(swiglu_mode=1), NotEmulatedError, "swiglu_mode"),
    (dict(x=torch.zeros(6, 128, dtype=torch.bfloat16)), NotEmulatedError, "float x"),
    (dict(bias=torch.zeros(128, dtype=torch.int32)), NotEmulatedError, "bias"),
    (dict(round_mode="floor"), NotEmulatedError, "round_mode"),
], ids=["3-D", "odd width", "no activation scale", "activation scale rows", "groups overrun", "int32 groups",
        "negative count", "H not 64-aligned", "scale groups", "quant mode 2", "static", "clamped swiglu", "float x",
        "bias", "round mode"])
def test_dequant_swiglu_quant_constraints(change, error, message):
    with pytest.raises(error, match=message):
        _dsq(**change)()
