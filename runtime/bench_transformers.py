"""transformers' MiniMaxM2ForCausalLM as `moerun bench --compare transformers`'s peer: the very weight tensors
of the synthetic model (no copy), sdpa attention, its grouped_mm experts where available, fed the same token ids
as moerun and doing the same timed work: a prompt prefilled into a cache, and a decode step of one token per
sequence after a context that was prefilled into the cache first.

Variants, each timed (the report names the fastest):
- dynamic: DynamicCache, eager (what `generate` uses by default);
- static: StaticCache sized to the context + 1, eager;
- compiled: the static path through `torch.compile(model.forward, mode="reduce-overhead")`, as transformers'
  docs advise for speed. Where compiling fails (no compiler, an unsupported op) the variant is reported missing
  with the reason, and the others stand.
After each timed run the cache is rewound, untimed (moerun's step just rewrites its slot): the dynamic cache is
cropped back to the context, the static one's write position (StaticLayer.cumulative_length, transformers 5.x)
moved back, so every run decodes at position C, or prefills positions 0..P-1, again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Step = tuple[Callable[[], Any], Callable[[], Any]]  # (timed run, untimed reset after it)

import torch

VARIANTS = ("dynamic", "static", "compiled")
# Prefill chunks of the untimed context: at most this many tokens per forward, so large batches fit.
CONTEXT_CHUNK_TOKENS = 16384


class TransformersPeer:
    def __init__(self, cfg, hf_weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 variants: tuple[str, ...]) -> None:
        from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM
        from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2RotaryEmbedding

        self.device, self.dtype, self.variants = device, dtype, variants
        hf_cfg = MiniMaxM2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, partial_rotary_factor=cfg.rotary_dim / cfg.head_dim,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            tie_word_embeddings=False)
        # partial_rotary_factor beside rotary_dim: transformers 5.17 ignores the legacy field (full RoPE)
        hf_cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = MiniMaxM2ForCausalLM(hf_cfg)
        model.load_state_dict(hf_weights, strict=True, assign=True)
        model.model.rotary_emb = MiniMaxM2RotaryEmbedding(hf_cfg).to(device)  # non-persistent buffers
        self.experts_implementation = "eager"
        try:
            model.set_experts_implementation("grouped_mm")
            self.experts_implementation = "grouped_mm"
        except Exception:  # noqa: BLE001 - older transformers or torch: keep its eager loop
            pass
        self.model = model.eval()
        self.config = hf_cfg
        self.compiled = None
        if "compiled" in variants:
            self.compiled = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
        self.missing: dict[str, str] = {}  # variant -> why it could not be timed
        self.compile_seconds: list[float] = []

    def _forward(self, variant: str) -> Callable[..., Any]:
        return self.compiled if variant == "compiled" else self.model

    def _positions(self, start: int, end: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache_position = torch.arange(start, end, device=self.device)
        return cache_position.expand(batch, -1), cache_position

    def _fill(self, cache, ids: torch.Tensor) -> None:
        """Prefill ids [B, C] into cache, in chunks of at most CONTEXT_CHUNK_TOKENS tokens (untimed)."""
        batch, context = ids.shape
        chunk = max(1, CONTEXT_CHUNK_TOKENS // batch)
        for start in range(0, context, chunk):
            end = min(context, start + chunk)
            position_ids, cache_position = self._positions(start, end, batch)
            self.model(input_ids=ids[:, start:end], position_ids=position_ids, cache_position=cache_position,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)

    def _ready(self, variant: str, step: Step) -> bool:
        """Run the step once (the compiled variant compiles here); a failure marks the variant missing."""
        if variant in self.missing:
            return False
        start = time.perf_counter()
        try:
            step[0]()
            step[1]()
        except Exception as exc:  # noqa: BLE001 - report any failure of the peer's optional paths, keep the rest
            self.missing[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            return False
        if variant == "compiled":
            self.compile_seconds.append(time.perf_counter() - start)
        return True

    @torch.inference_mode()
    def decode_steps(self, context_ids: torch.Tensor, next_ids: torch.Tensor) -> dict[str, Step]:
        """{variant: step}: each step decodes next_ids [B] at position C after context_ids [B, C] (prefilled
        into that variant's cache here, untimed) and returns the B logit rows."""
        from transformers import DynamicCache, StaticCache

        batch, context = context_ids.shape
        ids = next_ids.to(self.device).view(batch, 1)
        context_ids = context_ids.to(self.device)
        position_ids, cache_position = self._positions(context, context + 1, batch)
        steps: dict[str, Step] = {}
        if "dynamic" in self.variants:
            dynamic = DynamicCache(config=self.config)
            self._fill(dynamic, context_ids)
            steps["dynamic"] = (lambda: self.model(input_ids=ids, position_ids=position_ids, cache_position=cache_position,
                                                   past_key_values=dynamic, use_cache=True, logits_to_keep=1).logits,
                                lambda: dynamic.crop(-1))
        static_variants = [v for v in ("static", "compiled") if v in self.variants]
        if static_variants:
            static = StaticCache(config=self.config, max_cache_len=context + 1)  # one cache: both write slot C alike
            self._fill(static, context_ids)
            for variant in static_variants:
                forward = self._forward(variant)
                steps[variant] = (lambda forward=forward: forward(
                    input_ids=ids, position_ids=position_ids, cache_position=cache_position, past_key_values=static,
                    use_cache=True, logits_to_keep=1).logits, lambda: rewind(static, 1))
        return {v: s for v, s in steps.items() if self._ready(v, s)}

    @torch.inference_mode()
    def prefill_steps(self, prompt: torch.Tensor) -> dict[str, Step]:
        """{variant: step}: each step prefills prompt [P] into an empty cache and returns the last token's logits."""
        from transformers import DynamicCache, StaticCache

        ids = prompt.to(self.device).view(1, -1)
        position_ids, cache_position = self._positions(0, ids.shape[1], 1)
        steps: dict[str, Step] = {}
        if "dynamic" in self.variants:
            steps["dynamic"] = (lambda: self.model(
                input_ids=ids, position_ids=position_ids, cache_position=cache_position,
                past_key_values=DynamicCache(config=self.config), use_cache=True, logits_to_keep=1).logits, lambda: None)
        static_variants = [v for v in ("static", "compiled") if v in self.variants]
        if static_variants:
            static = StaticCache(config=self.config, max_cache_len=ids.shape[1])  # each run rewrites slots 0..P-1
            for variant in static_variants:
                forward = self._forward(variant)
                steps[variant] = (lambda forward=forward: forward(
                    input_ids=ids, position_ids=position_ids, cache_position=cache_position, past_key_values=static,
                    use_cache=True, logits_to_keep=1).logits, lambda: rewind(static, ids.shape[1]))
        return {v: s for v, s in steps.items() if self._ready(v, s)}


def rewind(cache, tokens: int) -> None:
    """Move a StaticCache's write position back by `tokens` (the slots are overwritten by the next run)."""
    for layer in cache.layers:
        layer.cumulative_length.sub_(tokens)
