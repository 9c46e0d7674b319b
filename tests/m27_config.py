"""MiniMax-M2.7's config.json as published (the values of ../shared/reference/minimax_m2.md section 1: the M2.5
file with M2.7's name; the FP8 quantization_config of the release), for the planner's tests: no weights needed."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2",
    "hidden_size": 3072, "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 1536, "num_local_experts": 256, "num_experts_per_tok": 8,
    "scoring_func": "sigmoid", "use_routing_bias": True, "shared_intermediate_size": 0, "vocab_size": 200064,
    "rope_theta": 5000000, "rotary_dim": 64, "max_position_embeddings": 196608, "rms_norm_eps": 1e-06,
    "hidden_act": "silu", "use_qk_norm": True, "qk_norm_type": "per_layer", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "attn_type_list": [1] * 62, "bos_token_id": 200034, "eos_token_id": 200020,
    "quantization_config": {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
}


def write_m27_config(folder: Path, w8a8: bool = False) -> Path:
    """A folder holding only config.json: all `moerun plan` reads. w8a8: as msModelSlim exports it (no
    quantization_config, and a quant_model_description.json, whose presence is all the planner looks at)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in CONFIG.items() if not (w8a8 and k == "quantization_config")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if w8a8:
        (folder / "quant_model_description.json").write_text("{}")
    return folder
