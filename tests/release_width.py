"""A one-layer checkpoint at the width of the MiniMax-M2.7 release, random weights, for measurements that need the
release's numerics (256 experts of 1536, top-8, hidden 3072, 48/8 heads of 128 with 64 rotated, vocab 200064) on a
machine that cannot hold the release. ~10 GB of bf16 in six shards with an index; the router and its bias fp32.

Scales as the demo checkpoint's: each projection keeps activations near unit RMS, norm weights 1 + 0.2 N(0, 1), a
router gain of 2 and a N(0, 0.5) correction bias (so routing is decided by both), an lm_head gain of 4 (peaked, not
one-hot next-token distributions).

    python tests/release_width.py OUT_FOLDER [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DIMS = dict(hidden_size=3072, num_hidden_layers=1, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
            rotary_dim=64, intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8, vocab_size=200064)


def config() -> dict:
    d = DIMS
    return {
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "attn_type_list": [1],
        "bos_token_id": 200019, "eos_token_id": 200020, "head_dim": d["head_dim"], "hidden_act": "silu",
        "hidden_size": d["hidden_size"], "intermediate_size": d["intermediate_size"],
        "max_position_embeddings": 196608, "num_attention_heads": d["num_attention_heads"],
        "num_experts_per_tok": d["num_experts_per_tok"], "num_hidden_layers": d["num_hidden_layers"],
        "num_key_value_heads": d["num_key_value_heads"], "num_local_experts": d["num_local_experts"],
        "qk_norm_type": "per_layer", "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": d["rotary_dim"],
        "scoring_func": "sigmoid", "shared_intermediate_size": 0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_qk_norm": True, "use_routing_bias": True, "vocab_size": d["vocab_size"],
    }


def write(folder: Path, seed: int = 0) -> None:
    d = DIMS
    hidden, experts, inter = d["hidden_size"], d["num_local_experts"], d["intermediate_size"]
    q_width, kv_width = d["num_attention_heads"] * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16

    def linear(out_dim: int, in_dim: int, gain: float = 1.0, dtype: torch.dtype = bf16) -> torch.Tensor:
        return (torch.randn(out_dim, in_dim, generator=gen) * (gain / in_dim ** 0.5)).to(dtype)

    def norm(dim: int) -> torch.Tensor:
        return (1.0 + 0.2 * torch.randn(dim, generator=gen)).to(bf16)

    p = "model.layers.0."

    def first() -> dict:
        return {
            "model.embed_tokens.weight": torch.randn(d["vocab_size"], hidden, generator=gen).to(bf16),
            p + "input_layernorm.weight": norm(hidden),
            p + "self_attn.q_proj.weight": linear(q_width, hidden),
            p + "self_attn.k_proj.weight": linear(kv_width, hidden),
            p + "self_attn.v_proj.weight": linear(kv_width, hidden),
            p + "self_attn.o_proj.weight": linear(hidden, q_width),
            p + "self_attn.q_norm.weight": norm(q_width),
            p + "self_attn.k_norm.weight": norm(kv_width),
            p + "post_attention_layernorm.weight": norm(hidden),
            p + "block_sparse_moe.gate.weight": linear(experts, hidden, gain=2.0, dtype=torch.float32),
            p + "block_sparse_moe.e_score_correction_bias": 0.5 * torch.randn(experts, generator=gen),
        }

    def expert_range(lo: int, hi: int) -> dict:
        out = {}
        for e in range(lo, hi):
            q = f"{p}block_sparse_moe.experts.{e}."
            out[q + "w1.weight"] = linear(inter, hidden)
            out[q + "w2.weight"] = linear(hidden, inter)
            out[q + "w3.weight"] = linear(inter, hidden)
        return out

    def last() -> dict:
        return {"model.norm.weight": norm(hidden), "lm_head.weight": linear(d["vocab_size"], hidden, gain=4.0)}

    folder.mkdir(parents=True, exist_ok=True)
    # ~1.8 GB a shard: saving one briefly holds it twice (safetensors copies each tensor to bytes).
    quarter = experts // 4
    shards = [first, *(lambda lo=lo: expert_range(lo, lo + quarter) for lo in range(0, experts, quarter)), last]
    weight_map, total = {}, 0
    for i, make in enumerate(shards):  # one shard in memory at a time
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 200019, "eos_token_id": 200020, "do_sample": True, "temperature": 1.0, "top_p": 0.95,
         "top_k": 40}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.seed)
