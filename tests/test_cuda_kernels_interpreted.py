"""Every Triton kernel of the CUDA backend, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1), against
the reference ops of moerun.backends.cpu.ops or against plain math written here; then the whole backend
(device: cpu under the interpreter) against transformers. Small shapes: the interpreter runs each program in
numpy.

TRITON_INTERPRET must be set before the kernels are defined, and must not leak into GPU tests of the same pytest
process. So unless it is already set, this file runs itself once in a subprocess that sets it (the single test
`test_kernels_under_triton_interpreter`), and its output shows which case failed.

Tolerances (the interpreter computes products of bf16/fp8 values exactly in fp32 and sums them in numpy's order;
the kernels reproduce the reference's rounding steps; see backends/cuda/triton_utils.py):
- fp32: results differ from the reference only by the order of fp32 sums: relative 1e-5.
- bf16/fp16 norms, rotary, MoE, FP8 linear vs its emulation: the same rounding steps as the reference, so at most
  one unit in the last place, where an fp32 sum in another order lands on the other side of a rounding boundary
  (plus that fp32 difference itself, 1e-5 of the largest output, for outputs that cancel to near zero).
- FP8 experts in bf16 vs their emulation: as above, but a one-ulp difference in the bf16 intermediate
  silu(gate) * up can move that element by one e4m3 step (2^-4) when it is re-quantized for the down GEMM, which
  moves the output by 2^-4 * |h_i| * |w2[:, i]|. Observed: half the seeds bit-identical, the rest a few elements
  apart, <= 0.5% Frobenius; we require <= 1% (quantization itself costs 3.6%). In fp32 nothing is rounded
  between the GEMMs, so there it must match to 1e-5.
- bf16 attention: P (the softmax probabilities) is rounded to bf16 before P @ V, as FlashAttention does, while the
  reference keeps it fp32. Each probability then carries a relative error <= 2^-9, so the output's error is at
  most 2^-9 * sum_i p_i |v_i| <= 2^-9 * max|V|, plus the final rounding (2^-9 |out|): we allow twice that.
- FP8 vs the dequantized (unquantized-activation) reference: e4m3 keeps 3 mantissa bits, so each activation
  carries a rounding error of up to 2^-4 (RMS 2^-4/sqrt(3) = 3.6%); in a dot product of random-sign terms these
  add in quadrature, so the output's relative RMS error is ~3.6%. We require <= 6% (Frobenius).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if not INTERPRETED:

    def test_kernels_under_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
        assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout[-30000:]}\n{proc.stderr[-5000:]}"

else:
    sys.path.insert(0, str(Path(__file__).parent / "cuda"))  # tests/cuda/cuda_references.py: oracles shared with GPU tests
    from conftest import run_yaml
    from fp8_checkpoints import make_fp8_pair, quantize_block
    from hf_checkpoints import hf_logits
    from cuda_references import (assert_attention_close, assert_ulp_close, emulated_fp8_experts, fake_quant, filled_caches,
                            frobenius_rel, make_meta, quantize_block_fast, random_experts, rel)

    from moerun.backends.base import ExpertWeights, LinearWeight, ModelSpec, register_backend
    from moerun.backends.cpu import ops
    from moerun.backends.cuda import attention, fp8, kv_cache, moe, norm_rope, routing
    from moerun.backends.cuda.backend import CudaBackend
    from moerun.runtime.engine import Engine
    from moerun.backends.errors import ConfigError, UnsupportedModelError

    DTYPES = [torch.float32, torch.bfloat16, torch.float16]

    # ---- norms and rotary ----------------------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("cols", [96, 1000])
    def test_rms_norm_and_fused_residual(dtype, cols):
        gen = torch.Generator().manual_seed(cols)
        x, r = (torch.randn(9, cols, generator=gen).to(dtype) for _ in range(2))
        w = (1 + 0.3 * torch.randn(cols, generator=gen)).to(dtype)
        assert_ulp_close(norm_rope.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
        normed, summed = norm_rope.add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(summed, x + r)
        assert_ulp_close(normed, ops.rms_norm(x + r, w, 1e-6))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("heads,kv_heads,head_dim,rot", [(8, 2, 16, 8), (6, 6, 12, 12), (4, 1, 32, 8)])
    def test_rotary_partial_neox(dtype, heads, kv_heads, head_dim, rot):
        gen = torch.Generator().manual_seed(head_dim)
        q = torch.randn(11, heads, head_dim, generator=gen).to(dtype)
        k = torch.randn(11, kv_heads, head_dim, generator=gen).to(dtype)
        angles = torch.arange(11)[:, None] * torch.rand(rot // 2, generator=gen)
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        q_out, k_out = norm_rope.rotary(q, k, cos, sin)
        q_ref, k_ref = ops.rotary(q, k, cos, sin)
        assert_ulp_close(q_out, q_ref)
        assert_ulp_close(k_out, k_ref)

    # ---- KV cache and attention ----------------------------------------------------------------------------------

    def test_write_kv_matches_reference_layout_and_skips_negative_slots():
        ref, ours = filled_caches([37, 5, 70], 2, 16, 16, 20, torch.bfloat16)
        assert torch.equal(kv_cache.to_reference_layout(ours), ref)
        before = ours.clone()
        kv_cache.write(ours, torch.ones(2, 2, 16), torch.ones(2, 2, 16), torch.tensor([-1, -1]))
        assert torch.equal(ours, before)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(8, 2, 16, 16), (6, 6, 12, 32), (12, 2, 32, 16)])
    def test_attention_prefill_chunked_and_mixed(dtype, heads, kv_heads, head_dim, block_size):
        seq_lens = [37, 5, 70]
        ref_cache, cache = filled_caches(seq_lens, kv_heads, head_dim, block_size, 24, dtype)
        gen = torch.Generator().manual_seed(7)
        # whole prompts; chunks after a cached prefix; a mixed step with a decode token
        for query_lens in (seq_lens, [10, 5, 33], [1, 2, 64]):
            meta = make_meta(query_lens, seq_lens, block_size, 24)
            q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype)
            ref = ops.attention(q, ref_cache, meta.query_start_loc.tolist(), seq_lens, meta.block_tables, head_dim ** -0.5)
            assert_attention_close(attention.prefill(q, cache, meta, head_dim ** -0.5), ref, cache)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("sms", [1, 64], ids=["one_partition", "split_kv"])
    def test_attention_decode_split_kv(dtype, sms):
        seq_lens = [300, 1, 130, 64]  # partition edges, a length-1 sequence, exact block multiples
        heads, kv_heads, head_dim = 8, 2, 16
        ref_cache, cache = filled_caches(seq_lens, kv_heads, head_dim, 16, 64, dtype)
        meta = make_meta([1] * 4, seq_lens, 16, 64)
        q = torch.randn(4, heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
        part_len, splits = attention.plan_decode_splits(4, kv_heads, max(seq_lens), sms, 64)
        assert (splits == 1) == (sms == 1) and (sms == 1 or splits >= 4)
        out = attention.decode(q, cache, meta, head_dim ** -0.5, max(seq_lens), sms)
        ref = ops.attention(q, ref_cache, list(range(5)), seq_lens, meta.block_tables, head_dim ** -0.5)
        assert_attention_close(out, ref, cache)

    def test_attention_decode_padded_rows_are_zero():
        """Rows of length 0 (a captured graph's padding) give 0, not NaN, and leave real rows unchanged."""
        _, cache = filled_caches([40], 2, 16, 16, 8, torch.float32)
        meta = make_meta([1], [40], 16, 8)
        padded = dataclasses.replace(meta, seq_lens=torch.tensor([40, 0], dtype=torch.int32),
                                     block_tables=torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)]),
                                     query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
                                     query_lens_host=[1, 1], seq_lens_host=[40, 0])
        q = torch.randn(2, 8, 16)
        for sms in (1, 64):
            out = attention.decode(q, cache, padded, 0.25, 64, sms)
            assert torch.equal(out[1], torch.zeros_like(out[1]))
            assert rel(out[:1], attention.decode(q[:1], cache, meta, 0.25, 40, sms)) <= 1e-6

    # ---- routing and dispatch --------------------------------------------------------------------------------------

    @pytest.mark.parametrize("tokens,experts,top_k", [(5, 16, 4), (9, 8, 2), (3, 256, 8), (2, 4, 1)])
    def test_route_matches_reference(tokens, experts, top_k):
        gen = torch.Generator().manual_seed(experts)
        logits, bias = 2 * torch.randn(tokens, experts, generator=gen), 0.5 * torch.randn(experts, generator=gen)
        weights, ids = routing.route(logits, bias, top_k)
        ref_weights, ref_ids = ops.route(logits, bias, top_k)
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
        assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
        order, ref_order = ids.long().argsort(-1), ref_ids.long().argsort(-1)
        assert (weights.gather(1, order) - ref_weights.gather(1, ref_order)).abs().max() <= 1e-6

    @pytest.mark.parametrize("tokens,experts,top_k,block_m", [(5, 16, 4, 16), (40, 8, 2, 16), (3, 256, 8, 16),
                                                               (1, 256, 8, 64), (100, 16, 4, 64)])
    def test_align_kernel_equals_sort_and_is_a_valid_dispatch(tokens, experts, top_k, block_m):
        ids = ops.route(torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)),
                        torch.zeros(experts), top_k)[1]
        kernel, by_sort = routing.align(ids, experts, block_m), routing.align_torch(ids, experts, block_m)
        used = int(by_sort.num_padded)
        assert torch.equal(kernel.sorted_pairs, by_sort.sorted_pairs) and int(kernel.num_padded) == used
        assert torch.equal(kernel.block_expert[:used // block_m], by_sort.block_expert[:used // block_m])
        # the dispatch itself, checked from the definition: every pair once, in stable order, in its expert's block
        counts = torch.bincount(ids.flatten().long(), minlength=experts)
        assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
        pairs = by_sort.sorted_pairs[:used]
        real = pairs[pairs < ids.numel()].long()
        assert torch.equal(real.sort().values, torch.arange(ids.numel()))
        block_of_slot = by_sort.block_expert[:used // block_m].repeat_interleave(block_m)
        assert torch.equal(ids.flatten().long()[real], block_of_slot[pairs < ids.numel()].long())
        for e in range(experts):
            mine = real[ids.flatten()[real] == e]
            assert torch.equal(mine, mine.sort().values)

    # ---- experts -------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", [(11, 64, 32, 8, 2), (3, 96, 40, 16, 4), (1, 48, 24, 4, 1)])
    def test_experts_triton_matches_reference(dtype, tokens, hidden, inter, experts, top_k):
        w13, w2 = random_experts(experts, hidden, inter, dtype)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
        weights, ids = ops.route(torch.randn(tokens, experts, generator=torch.Generator().manual_seed(2)),
                                 torch.zeros(experts), top_k)
        out = moe.experts_triton(x, weights, ids, ExpertWeights(w13, w2))
        assert_ulp_close(out, ops.experts(x, weights, ids, w13, w2))

    @pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
    def test_experts_grouped_mm_matches_reference():
        w13, w2 = random_experts(16, 96, 40, torch.bfloat16)
        x = torch.randn(13, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        weights, ids = ops.route(torch.randn(13, 16, generator=torch.Generator().manual_seed(2)), torch.zeros(16), 4)
        out = moe.experts_grouped_mm(x, weights, ids, ExpertWeights(w13, w2))
        assert_ulp_close(out, ops.experts(x, weights, ids, w13, w2))

    # ---- FP8 -------------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("block,rows,cols", [((16, 16), 40, 96), ((24, 32), 40, 72)], ids=["aligned", "ragged"])
    def test_fp8_linear(dtype, block, rows, cols):
        gen = torch.Generator().manual_seed(0)
        q, s = quantize_block(torch.randn(rows, cols, generator=gen) / 10, block)
        x = torch.randn(6, cols, generator=gen).to(dtype)
        out = fp8.linear(x, fp8.prepare(LinearWeight(q, s, block), torch.device("cpu")))
        w = ops.dequantize_fp8_block(q, s, block, torch.float64)
        assert_ulp_close(out, (fake_quant(x, block[1]).double() @ w.T).to(dtype))
        assert frobenius_rel(out, x.double() @ w.T) <= 0.06

    def fp8_experts(experts, hidden, inter, block, seed=0):
        w13, w2 = random_experts(experts, hidden, inter, torch.float32, seed)
        (q13, s13), (q2, s2) = quantize_block_fast(w13, block), quantize_block_fast(w2, block)
        return ExpertWeights(q13, q2, s13, s2, block)

    def test_vectorized_block_quantizer_matches_tilewise():
        w = torch.randn(3, 70, 50)
        q, s = quantize_block_fast(w, (32, 16))
        for e in range(3):
            q_ref, s_ref = quantize_block(w[e], (32, 16))
            assert torch.equal(q[e].float(), q_ref.float()) and torch.equal(s[e], s_ref)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("seed", [0, 1])
    def test_fp8_experts(dtype, seed):
        w = fp8_experts(8, 64, 32, (16, 16), seed)
        x = torch.randn(7, 64, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        weights, ids = ops.route(torch.randn(7, 8, generator=torch.Generator().manual_seed(2)), torch.zeros(8), 2)
        out = moe.experts_triton(x, weights, ids, w)
        emulated = emulated_fp8_experts(x, weights, ids, w)
        if dtype == torch.float32:
            assert_ulp_close(out, emulated)
        else:
            assert frobenius_rel(out, emulated) <= 0.01
        dequantized = ops.experts(x, weights, ids, *(ops.dequantize_fp8_block(a, s, w.block, dtype)
                                                     for a, s in ((w.w13, w.w13_scale_inv), (w.w2, w.w2_scale_inv))))
        assert frobenius_rel(out, dequantized) <= 0.06

    # ---- the whole backend (device: cpu under the interpreter) ------------------------------------------------------
    # Marked whole_backend: the Triton 3.6 run (tests/test_triton_device_version.py) takes the kernel tests above only.

    TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]

    def cuda_yaml(folder, dtype="float32", **cuda_options):
        return run_yaml(folder, backend="cuda", dtype=dtype, cuda={"device": "cpu", **cuda_options})

    @pytest.mark.whole_backend
    def test_model_float32_matches_transformers(hf_checkpoint, write_yaml):
        folder, model = hf_checkpoint("gqa4_half_rope", torch.float32)
        ours = Engine.from_config(write_yaml(cuda_yaml(folder))).logits(TOKENS)
        ref = hf_logits(model.float(), TOKENS)
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    @pytest.mark.whole_backend
    def test_model_bfloat16_matches_transformers_and_cpu_backend(hf_checkpoint, write_yaml):
        """The bf16 band of tests/test_hf_parity.py against transformers; against the CPU backend on the same
        checkpoint the only differences are attention's bf16 P and fp32 sum orders."""
        folder, model = hf_checkpoint("gqa6_quarter_rope", torch.bfloat16, seed=3)
        ours = Engine.from_config(write_yaml(cuda_yaml(folder, "bfloat16"))).logits(TOKENS)
        ref = hf_logits(model.to(torch.bfloat16), TOKENS)
        logp_ref, logp_ours = ref.log_softmax(-1), ours.log_softmax(-1)
        assert (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1).mean() < 2e-3
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        cpu = Engine.from_config(write_yaml(run_yaml(folder, dtype="bfloat16"), "cpu.yaml")).logits(TOKENS)
        assert (ours - cpu).abs().max() <= 0.05 * cpu.abs().max()

    @pytest.mark.whole_backend
    def test_greedy_decode_matches_transformers_generate(hf_checkpoint, write_yaml):
        """Prefill then single-token decode steps (the split-KV kernel) over the paged cache."""
        from moerun.runtime.sampling_params import SamplingParams

        folder, model = hf_checkpoint("gqa4_half_rope", torch.float32)
        engine = Engine.from_config(write_yaml(cuda_yaml(folder)))
        prompts = [TOKENS[:7], TOKENS[5:9]]
        ours = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        model.config._attn_implementation = "eager"
        for prompt, out in zip(prompts, ours):
            with torch.no_grad():
                ref = model.float().generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                             pad_token_id=0, min_new_tokens=12)[0, len(prompt):].tolist()
            assert out.output_token_ids == ref
        assert engine.stats().kv_blocks_used == 0

    @pytest.mark.whole_backend
    def test_fp8_checkpoint_runs_fp8_and_matches_emulation(hf_checkpoint, write_yaml, tmp_path):
        folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
        make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
        engine = Engine.from_config(write_yaml(cuda_yaml(tmp_path / "fp8")))
        assert isinstance(engine.model.weights.layers[0].q_proj, fp8.Fp8Linear)
        assert engine.model.weights.layers[0].experts.w13.dtype == torch.float8_e4m3fn
        ours = engine.logits(TOKENS)
        register_backend("fp8emu", "cuda_references:Fp8EmulationBackend")
        ref = Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8", backend="fp8emu"), "emu.yaml")).logits(TOKENS)
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    @pytest.mark.whole_backend
    def test_fp8_off_dequantizes_at_load(hf_checkpoint, write_yaml, tmp_path):
        from transformers import MiniMaxM2ForCausalLM

        folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
        make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
        engine = Engine.from_config(write_yaml(cuda_yaml(tmp_path / "fp8", fp8="off")))
        assert not engine.backend.capabilities.fp8_weights
        assert engine.model.weights.layers[0].experts.w13.dtype == torch.float32
        ours = engine.logits(TOKENS)
        ref = hf_logits(MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32), TOKENS)
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


    @pytest.mark.whole_backend
    def test_graph_runner_static_inputs_match_eager_decode(hf_checkpoint, write_yaml):
        """What a captured decode graph computes, without the capture (which needs a GPU): this step copied into
        a larger bucket's buffers (padded rows: slot -1, length 0), the ops in graph mode (attention bounded by
        the block-table capacity). The eager step's logits and K/V, and nothing written outside this step's slots."""
        from moerun.backends.cuda.graphs import DecodeGraphs, batch_buckets
        from moerun.runtime.step_builder import StepSequence

        assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
        folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
        engine = Engine.from_config(write_yaml(cuda_yaml(folder)))
        runner, caches, block_size = engine.runner, engine.runner.kv_caches, engine.block_size
        graphs = DecodeGraphs(engine.backend, engine.model.forward, max_batch=8, max_blocks_per_seq=6)
        lengths = (5, 17, 33)
        blocks = [list(range(4 * i, 4 * i + 3)) for i in range(3)]  # three blocks of 16 each, not shared
        with torch.inference_mode():
            prefill = runner.builder.build([StepSequence(TOKENS[:n], 0, b) for n, b in zip(lengths, blocks)], [0])
            engine.model.forward(prefill.input_ids, prefill.positions, prefill.meta, caches)
            inputs = runner.builder.build([StepSequence([7], n, b) for n, b in zip(lengths, blocks)], [0, 1, 2])
            before = [c.clone() for c in caches]
            eager = engine.model.forward(inputs.input_ids, inputs.positions, inputs.meta, caches)
            eager_cache = [c.clone() for c in caches]
            for c, b in zip(caches, before):
                c.copy_(b)
            bucket = graphs.bucket_for(3)
            width = graphs.table_width_for(inputs.meta.max_seq_len, block_size)
            assert (bucket, width) == (4, 6)  # 34 tokens -> the 1024-token length bucket, capped at 6 blocks of 16
            graphs.load(inputs.input_ids, inputs.positions, inputs.meta, 3, bucket)
            with engine.backend.graph_mode():
                static = engine.model.forward(*graphs.static_inputs(bucket, width, block_size), caches)
        assert (static[:3] - eager).abs().max() <= 1e-5 * eager.abs().max()
        assert torch.isfinite(static).all()
        # the written K/V agree to fp32 sum order (a matmul over 4 rows may block differently than over 3)
        for now, ref, old in zip(caches, eager_cache, before):
            assert (now - ref).abs().max() <= 1e-5 * ref.abs().max()
            as_ref, old_ref = kv_cache.to_reference_layout(now), kv_cache.to_reference_layout(old)
            untouched = torch.ones(as_ref.shape[1] * as_ref.shape[2], dtype=torch.bool)
            untouched[inputs.meta.slot_mapping] = False
            assert torch.equal(as_ref.flatten(1, 2)[:, untouched], old_ref.flatten(1, 2)[:, untouched])  # padding inert

    # ---- options and refusals -------------------------------------------------------------------------------------

    def spec(**changes):
        base = dict(hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=16, rotary_dim=8, num_experts=8, top_k=2,
                    intermediate_size=32, vocab_size=211, dtype=torch.bfloat16, kv_block_size=16, fp8_block=None)
        return ModelSpec(**{**base, **changes})

    def test_backend_declares_and_refuses_with_one_line():
        backend = CudaBackend({"device": "cpu"}, torch.bfloat16)
        assert backend.capabilities.fp8_weights and backend.device == torch.device("cpu")
        backend.check_model(spec())
        backend.check_model(spec(fp8_block=(128, 128), intermediate_size=256))
        for bad, match in [(spec(kv_block_size=8), "block_size 8"), (spec(head_dim=512), "head_dim 512"),
                           (spec(fp8_block=(128, 96), intermediate_size=256), r"FP8 weight block \[128, 96\]"),
                           (spec(fp8_block=(128, 128), intermediate_size=192), "intermediate_size 192"),
                           (spec(num_experts=2048), "2048 experts")]:
            with pytest.raises(UnsupportedModelError, match=match) as err:
                backend.check_model(bad)
            assert "\n" not in str(err.value)
        with pytest.raises(UnsupportedModelError, match="not FP8"):
            CudaBackend({"device": "cpu", "fp8": "on"}, torch.bfloat16).check_model(spec())
        assert not CudaBackend({"device": "cpu", "fp8": "off"}, torch.bfloat16).capabilities.fp8_weights
        assert CudaBackend.capabilities.fp8_weights  # the class keeps its declaration; instances narrow it

    @pytest.mark.parametrize("options,match", [({"fp8": "maybe"}, r"cuda\.fp8: 'maybe' is not allowed"),
                                               ({"cuda_graphs": "yes"}, r"cuda\.cuda_graphs: expected bool"),
                                               ({"graphs": True}, r"cuda\.graphs: unknown key"),
                                               ({"graph_max_batch": 0}, r"cuda\.graph_max_batch: 0 is out of range \(allowed: 1\.\.4096\)")])
    def test_option_errors_name_the_key(options, match):
        with pytest.raises(ConfigError, match=match):
            CudaBackend.validate_options(options, "cuda")
