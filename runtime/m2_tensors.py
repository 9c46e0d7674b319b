"""The tensors of a MiniMax-M2 checkpoint, written once: each one's name, shape and kind, in the release's order
(the census of the released checkpoint). The loader validates and reads a checkpoint by this table; the
demo checkpoint and the synthetic bench model generate their weights by it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from moerun.runtime.model_config import ModelConfig

# The kind decides the dtype: linears may be FP8 block-quantized in the checkpoint and take the model dtype once
# loaded, as do norms and the embedding; the router gate and its correction bias stay fp32.
EMBED, NORM, LINEAR, ROUTER, ROUTER_BIAS = "embed", "norm", "linear", "router", "router_bias"
EXPERT_PARTS = ("w1", "w2", "w3")  # gate_proj [I, H], down_proj [H, I], up_proj [I, H]


@dataclasses.dataclass(frozen=True)
class M2Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def module(self) -> str:
        """The module a weight belongs to ("model.layers.0.self_attn.q_proj"), as modules_to_not_convert names it."""
        return self.name.removesuffix(".weight")


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, M2Tensor]:
    """LayerWeights field -> its tensor, in file order; the experts are listed by expert_tensors."""
    p, h = layer_prefix(i), cfg.hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "input_norm": M2Tensor(f"{p}.input_layernorm.weight", (h,), NORM),
        "q_proj": M2Tensor(f"{p}.self_attn.q_proj.weight", (q, h), LINEAR),
        "k_proj": M2Tensor(f"{p}.self_attn.k_proj.weight", (kv, h), LINEAR),
        "v_proj": M2Tensor(f"{p}.self_attn.v_proj.weight", (kv, h), LINEAR),
        "o_proj": M2Tensor(f"{p}.self_attn.o_proj.weight", (h, q), LINEAR),
        "q_norm": M2Tensor(f"{p}.self_attn.q_norm.weight", (q,), NORM),  # one norm over all heads jointly
        "k_norm": M2Tensor(f"{p}.self_attn.k_norm.weight", (kv,), NORM),
        "post_attention_norm": M2Tensor(f"{p}.post_attention_layernorm.weight", (h,), NORM),
        "router": M2Tensor(f"{p}.block_sparse_moe.gate.weight", (cfg.num_experts, h), ROUTER),
        "router_bias": M2Tensor(f"{p}.block_sparse_moe.e_score_correction_bias", (cfg.num_experts,), ROUTER_BIAS),
    }


def expert_tensors(cfg: ModelConfig, i: int, e: int) -> dict[str, M2Tensor]:
    """"w1", "w2", "w3" -> that weight of expert e in layer i."""
    p, h, inter = f"{layer_prefix(i)}.block_sparse_moe.experts.{e}", cfg.hidden_size, cfg.intermediate_size
    shapes = {"w1": (inter, h), "w2": (h, inter), "w3": (inter, h)}
    return {part: M2Tensor(f"{p}.{part}.weight", shapes[part], LINEAR) for part in EXPERT_PARTS}


def model_tensors(cfg: ModelConfig) -> dict[str, M2Tensor]:
    """ModelWeights field -> its tensor for those outside the layers (no lm_head when it is tied to the embedding)."""
    shape = (cfg.vocab_size, cfg.hidden_size)
    out = {"embed": M2Tensor("model.embed_tokens.weight", shape, EMBED),
           "norm": M2Tensor("model.norm.weight", (cfg.hidden_size,), NORM)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = M2Tensor("lm_head.weight", shape, LINEAR)
    return out


def all_tensors(cfg: ModelConfig, num_layers: int) -> Iterator[M2Tensor]:
    """Every tensor of the first num_layers layers and the rest of the model, in file order."""
    outer = model_tensors(cfg)
    yield outer["embed"]
    for i in range(num_layers):
        yield from layer_tensors(cfg, i).values()
        for e in range(cfg.num_experts):
            yield from expert_tensors(cfg, i, e).values()
    yield outer["norm"]
    if "lm_head" in outer:
        yield outer["lm_head"]
