"""Tiny MiniMax-M2 checkpoints written by transformers' own MiniMaxM2ForCausalLM (the independent reference).

Weights are re-drawn larger than transformers' init (std 0.02 gives near-uniform logits that would hide bugs),
norm weights and the routing bias are random and non-zero, so every part of the math moves the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    # name: kwargs for MiniMaxM2Config. Mirrors real M2 ratios at toy size: q_proj wider than hidden, partial RoPE.
    "gqa4_half_rope": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, rotary_dim=8,
                           intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2),
    "mha_full_rope": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=12, rotary_dim=12,
                          intermediate_size=24, num_local_experts=4, num_experts_per_tok=1, num_hidden_layers=2),
    "gqa6_quarter_rope": dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=2, head_dim=32, rotary_dim=8,
                              intermediate_size=40, num_local_experts=16, num_experts_per_tok=4, num_hidden_layers=3),
    # MiniMax-M2's attention geometry at toy width: head_dim 128 with half of it rotated (Ascend's native FIA size).
    "m2_like": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=128, rotary_dim=64,
                    intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2),
}


def build_hf_model(shape: dict, seed: int = 0, vocab_size: int = 211, bos_token_id: int = 1, eos_token_id: int = 2,
                   max_position_embeddings: int = 512):
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    # transformers 5.17 (the GPU image's) ignores the legacy rotary_dim and rotates every dim; partial_rotary_factor
    # means the same in every 5.x, so the reference keeps partial RoPE whichever transformers runs it
    rope = {"partial_rotary_factor": shape["rotary_dim"] / shape["head_dim"]} if "rotary_dim" in shape else {}
    cfg = MiniMaxM2Config(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                          bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=None, **shape, **rope)
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5))
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.copy_(0.5 * torch.randn(cfg.num_local_experts, generator=gen))
    return model


def save_hf_checkpoint(model, folder: Path, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """Save as the real M2 release does: non-quantized tensors in `dtype`, the router gate and bias in fp32."""
    folder = Path(folder)
    model = model.to(dtype)
    for layer in model.model.layers:
        layer.mlp.gate.float()
        layer.mlp.e_score_correction_bias.data = layer.mlp.e_score_correction_bias.data.float()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def save_chat_checkpoint(shape: str, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A transformers-saved model that can chat: the random demo's byte-level BPE tokenizer, M2 special tokens and
    chat template beside weights of `shape` with a vocabulary the tokenizer's size (so every id is a token)."""
    from moerun.runtime import demo

    tokenizer_json, ids = demo.build_tokenizer_json()
    bos, eos = ids[demo.BOS], ids[demo.EOS]
    model = build_hf_model(SHAPES[shape], seed, vocab_size=len(ids), bos_token_id=bos, eos_token_id=eos,
                           max_position_embeddings=4096)  # the longest probes with tool schemas are ~900 tokens
    folder = save_hf_checkpoint(model, folder, dtype)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(demo._tokenizer_config(ids)), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(demo.CHAT_TEMPLATE, encoding="utf-8")
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "bos_token_id": bos, "eos_token_id": eos}))
    return folder


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """transformers' next-token logits for every position of one sequence, fp32 [T, vocab].
    Eager attention (fp32 softmax) and an fp32 router, as the checkpoint stores it."""
    model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        layer.mlp.gate.float()
        layer.mlp.e_score_correction_bias.data = layer.mlp.e_score_correction_bias.data.float()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
