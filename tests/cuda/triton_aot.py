"""Compile (never run) the CUDA backend's Triton kernels for an NVIDIA target on a machine without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, what CI runs the kernels under) enforces none of the compiler's rules:
dot shapes (an fp8 tl.dot needs K >= 32), layouts, shared memory. This script makes every kernel launch a real
compile down to a cubin (Triton ships ptxas), through the backend's own launch code at MiniMax-M2's shapes with
meta tensors (no memory), and prints one JSON line per compiled kernel with its shared memory. Run by
tests/test_cuda_compile.py in a subprocess, because it swaps Triton's active driver for a fake one.

    python tests/cuda/triton_aot.py --arch 90 [--smem 232448]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

H, HQ, HKV, D, ROT, E, K, INTER = 3072, 48, 8, 128, 64, 256, 8, 1536
META = "meta"


class _FakeDriver:
    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def install(arch: int, label: list[str]) -> None:
    """Every kernel[grid](...) from now on compiles for sm_<arch>, prints its record, and launches nothing."""
    target = GPUTarget("cuda", arch, 32)
    driver.set_active(_FakeDriver(target))

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        src = self.ASTSource(self, signature, constexprs, attrs)
        kernel = self.compile(src, target=target, options=options.__dict__)
        print(json.dumps({"case": label[0], "kernel": self.fn.__name__, "shared": kernel.metadata.shared,
                          "num_warps": options.num_warps, "num_stages": options.num_stages}), flush=True)
        return None  # run() then returns without a launch

    JITFunction._do_compile = _do_compile


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _meta(query_lens, seq_lens, block_size, width):
    from moerun.backends.base import AttentionMetadata

    n = len(seq_lens)
    return AttentionMetadata(query_start_loc=_t(n + 1, dtype=torch.int32), seq_lens=_t(n, dtype=torch.int32),
                             block_tables=_t(n, width, dtype=torch.int32), slot_mapping=_t(sum(query_lens), dtype=torch.int64),
                             query_lens_host=list(query_lens), seq_lens_host=list(seq_lens), block_size=block_size)


def cases(smem_limit: int, full: bool):
    """(name, thunk) pairs: each thunk launches one backend op at M2's shapes."""
    from moerun.backends.cuda import attention, gemm, kv_cache, moe, norm_rope, routing
    from moerun.backends.cuda.routing import Dispatch

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn

    def dispatch(pairs, block_m):
        cap = routing.dispatch_capacity(pairs, E, block_m)
        return Dispatch(_t(cap, dtype=torch.int32), _t(cap // block_m, dtype=torch.int32), _t(1, dtype=torch.int32),
                        pairs, block_m)

    def experts(tokens, use_fp8, dtype=bf16, block=(128, 128)):
        def run():
            pairs = tokens * K
            cfg = gemm.pick_config(pairs / min(E, pairs), block[1] if use_fp8 else None, False,
                                   torch.empty(0, dtype=dtype).element_size(), smem_limit)
            d = dispatch(pairs, cfg.block_m)
            wdt = fp8 if use_fp8 else dtype
            s13 = _t(E, 2 * INTER // block[0], H // block[1], dtype=torch.float32) if use_fp8 else None
            s2 = _t(E, H // block[0], INTER // block[1], dtype=torch.float32) if use_fp8 else None
            h = _t(pairs, INTER, dtype=dtype)
            gemm.grouped(_t(tokens, H, dtype=dtype), _t(E, 2 * INTER, H, dtype=wdt), h, d, cfg, a_row_div=K, gated=True,
                         scale=s13, block=block)
            gemm.grouped(h, _t(E, H, INTER, dtype=wdt), _t(pairs, H, dtype=dtype), d, cfg, a_row_div=1, gated=False,
                         scale=s2, block=block)
        return run

    def dense_fp8(rows, n, k, block=(128, 128)):
        def run():
            cfg = gemm.pick_config(rows, block[1], False, 2, smem_limit)
            gemm.dense_fp8(_t(rows, k), _t(n, k, dtype=fp8), _t(-(-n // block[0]), k // block[1], dtype=torch.float32),
                           block, _t(rows, n), cfg)
        return run

    cache = _t(2, 4096, HKV, 16, D)
    yield "rms_norm", lambda: [norm_rope.rms_norm(_t(5, n), _t(n), 1e-6) for n in (H, HQ * D, HKV * D)]
    yield "add_rms_norm", lambda: norm_rope.add_rms_norm(_t(5, H), _t(5, H), _t(H), 1e-6)
    yield "rotary", lambda: norm_rope.rotary(_t(5, HQ, D), _t(5, HKV, D), _t(5, ROT), _t(5, ROT))
    yield "kv_write", lambda: kv_cache.write(cache, _t(5, HKV, D), _t(5, HKV, D), _t(5, dtype=torch.int64))
    yield "decode_b1_200k", lambda: attention.decode(_t(1, HQ, D), cache, _meta([1], [200000], 16, 12500), D ** -0.5,
                                                     200000, 132)
    yield "decode_b256", lambda: attention.decode(_t(256, HQ, D), cache, _meta([1] * 256, [4096] * 256, 16, 256),
                                                  D ** -0.5, 4096, 132)
    yield "prefill_long", lambda: attention.prefill(_t(2000, HQ, D), cache, _meta([1000, 1000], [1000, 3000], 16, 200),
                                                    D ** -0.5)
    yield "prefill_short", lambda: attention.prefill(_t(100, HQ, D), cache, _meta([100], [100], 16, 8), D ** -0.5)
    yield "route", lambda: routing.route(_t(7, E, dtype=torch.float32), _t(E, dtype=torch.float32), K)
    yield "align", lambda: routing.align(_t(128, K, dtype=torch.int32), E, 16)
    yield "experts_fp8_decode", experts(1, True)
    yield "experts_fp8_batch256", experts(256, True)
    yield "experts_fp8_prefill", experts(8192, True)
    yield "experts_bf16_prefill", experts(8192, False)
    yield "dense_fp8_decode", dense_fp8(1, HQ * D, H)
    yield "dense_fp8_prefill", dense_fp8(4096, H, HQ * D)
    yield "combine", lambda: moe.combine(_t(7 * K, H), _t(7, K, dtype=torch.float32), 7)
    yield "combine_row_map", lambda: moe.combine(_t(7 * K, H), _t(7, K, dtype=torch.float32), 7,
                                                 _t(7 * K, dtype=torch.int32))
    yield "silu_mul", lambda: moe.silu_mul(_t(7 * K, 2 * INTER))
    # FP8 weight blocks other than M2's: K = 16 (below the fp8 dot's minimum K) and 256 (big tiles)
    yield "dense_fp8_block16", dense_fp8(40, 64, 96, (16, 16))
    if full:
        yield "experts_fp8_block256_prefill", experts(8192, True, block=(128, 256))
        yield "experts_fp8_fp32_prefill", experts(8192, True, torch.float32)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--smem", type=int, default=232448, help="the target's shared memory per block")
    parser.add_argument("--full", action="store_true", help="also the slower, non-M2 cases")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args()
    label = [""]
    install(args.arch, label)
    from moerun.backends.cuda import attention, fp8, moe  # noqa: F401  (the names patched below)

    for module in (attention, fp8, moe):  # launch plans for the target's shared memory, not the host's
        module.max_shared_memory = lambda device, limit=args.smem: limit
    only = set(args.only.split(",")) if args.only else None
    failed = 0
    for name, run in cases(args.smem, args.full):
        if only is not None and name not in only:
            continue
        label[0] = name
        try:
            run()
        except Exception as exc:  # a compile error: report it and go on with the other cases
            failed += 1
            print(json.dumps({"case": name, "error": f"{type(exc).__name__}: {exc}"[-3000:]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
