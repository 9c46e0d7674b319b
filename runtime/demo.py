"""The random demo checkpoint (`builtin:random-demo`): a tiny random-weight MiniMax-M2 model, generated on first
use into the user cache. (`builtin:demo`, the default, is the trained model shipped in the package:
runtime/trained_demo.py; it reuses this module's config, tokenizer-config and shard writers.)

It gives tests a checkpoint in the real M2 layout with exact, fixed shapes: the
config.json fields of the release (legacy `rotary_dim` included), the real tensor names, bf16 weights with an
fp32 router, two safetensors shards with an index, a byte-level BPE tokenizer.json with the M2 special tokens, and
a chat template with the M2 framing. Everything is derived from fixed seeds and fixed text, so the same code
and library versions always build the same bytes; a manifest of hashes tells a complete folder from a damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import pre_tokenizers

from moerun.backends.errors import MoerunError
from moerun.runtime.demo_corpus import CORPUS
from moerun.runtime.files import read_text
from moerun.runtime.m2_tensors import EMBED, NORM, ROUTER, ROUTER_BIAS, M2Tensor, all_tensors
from moerun.runtime.model_config import ModelConfig, parse_model_config

if TYPE_CHECKING:
    import torch

# Bump when anything below changes the files: a cache built by older code is then simply not looked at.
# (tests/test_demo.py pins the hashes of the text files per version to catch a forgotten bump.)
DEMO_VERSION = "demo-v1"
MANIFEST = "moerun-demo.json"
SEED = 1234
NUM_MERGES = 320

# M2's special tokens (minimax_m2.md 4.1). In the real tokenizer the think and tool-call tags are added tokens
# that are *not* special (llama.cpp reads them as user-defined tokens that stay visible when decoding), so
# skip_special_tokens keeps them and the reasoning / tool-call parsers can see them in the text.
ADDED_TOKENS = (
    ("]!p~[", True),  # pad
    ("]~b]", True),  # role begin
    ("[e~[", True),  # end of message = EOS
    ("]!d~[", True),
    ("]~!b[", True),  # BOS
    ("<think>", False),
    ("</think>", False),
    ("<minimax:tool_call>", False),
    ("</minimax:tool_call>", False),
)
BOS, EOS, PAD = "]~!b[", "[e~[", "]!p~["

# Toy sizes with M2's ratios: q_proj (8 x 32 = 256) wider than hidden (128), GQA 4, RoPE on half the head dim.
DIMS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            rotary_dim=16, intermediate_size=64, num_local_experts=16, num_experts_per_tok=4)
SHARDS = 2

# The files a complete demo folder has; the manifest is written last and lists them with their hashes.
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "model.safetensors.index.json")
FILES += tuple(f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1))


# --- where it lives, and building it exactly once ------------------------------------------------------------

def cache_root() -> Path:
    if os.environ.get("MOERUN_CACHE"):
        return Path(os.environ["MOERUN_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "moerun"
    return Path.home() / ".cache" / "moerun"


def ensure_demo_checkpoint() -> Path:
    """The demo checkpoint folder, built on first use. The folder only ever appears by renaming a complete
    build into place, so a crash or a concurrent first run can never leave a half-written folder that is used."""
    root = cache_root()
    final = root / DEMO_VERSION
    if is_valid_demo(final):
        return final
    try:
        return _build_in_place(root, final)
    except OSError as e:  # unwritable cache, full disk: one clear line for the CLI instead of a traceback
        raise MoerunError(f"{root}: cannot write the demo checkpoint there ({e.strerror or e}); "
                          f"set MOERUN_CACHE to a writable folder") from None


def _build_in_place(root: Path, final: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _remove_old_leftovers(root)
    build = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}.tmp-", dir=root))
    try:
        write_demo_checkpoint(build)
        os.chmod(build, 0o755)  # mkdtemp makes it owner-only; a cache folder is normally world-readable
        for _ in range(5):
            try:
                os.rename(build, final)  # atomic; fails if `final` exists (POSIX: non-empty dir, Windows: any)
                return final
            except OSError:
                if is_valid_demo(final):  # another process finished first: use its build
                    return final
                # A broken folder (a file deleted, or written by something else): move it aside, then retry.
                # Renaming away rather than deleting in place keeps `final` from ever being half-deleted.
                stale = root / f".{DEMO_VERSION}.stale-{uuid.uuid4().hex}"
                try:
                    os.rename(final, stale)
                except OSError:
                    pass  # gone already (another process moved it): just retry
                shutil.rmtree(stale, ignore_errors=True)
        raise OSError(f"could not rename {build.name} to {final.name}")
    finally:
        shutil.rmtree(build, ignore_errors=True)  # no-op once renamed


def is_valid_demo(folder: Path) -> bool:
    """True only for a folder whose manifest matches this version and every file's size and hash."""
    return matches_manifest(folder, DEMO_VERSION, FILES)


def matches_manifest(folder: Path, version: str, names: tuple[str, ...]) -> bool:
    """True only if the folder's manifest has this version, lists exactly `names`, and every file has the size
    and sha256 it lists."""
    try:
        # Only a regular file is read: a FIFO planted in the cache would block the read forever.
        manifest = json.loads(read_text(folder / MANIFEST, 1 << 20, "demo manifest"))
        if manifest.get("version") != version or set(manifest.get("files", {})) != set(names):
            return False
        for name, expected in manifest["files"].items():
            path = folder / name
            if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MoerunError):
        return False


def _remove_old_leftovers(root: Path, older_than_s: float = 3600.0) -> None:
    # Temp builds of interrupted runs. Only old ones: a young one may be a concurrent run still writing.
    for path in root.glob(f".{DEMO_VERSION}.*-*"):
        try:
            if time.time() - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_demo_checkpoint(folder: Path) -> None:
    """Write every demo file into the existing, empty `folder`; the manifest goes last."""
    folder = Path(folder)
    tokenizer_json, ids = build_tokenizer_json()
    vocab_size = -(-len(ids) // 64) * 64  # padded like M2's 200064, so the model has ids the tokenizer lacks
    _write_text(folder / "tokenizer.json", tokenizer_json)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(ids))
    _write_text(folder / "chat_template.jinja", CHAT_TEMPLATE)
    config = _model_config(ids, vocab_size)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", _generation_config(ids))
    _write_weights(folder, _weights(parse_model_config(config), tokenizer_vocab=len(ids)))
    write_manifest(folder, DEMO_VERSION, FILES)


def write_manifest(folder: Path, version: str, names: tuple[str, ...]) -> None:
    """The manifest goes last: it lists each file's size and sha256, so a folder without it is incomplete."""
    for name in names:
        os.chmod(folder / name, 0o644)  # safetensors writes owner-only files; make all files alike
    files = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}
    _write_json(folder / MANIFEST, {"version": version, "files": files})


def _write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))  # bytes, so no platform newline translation changes the hash


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --- tokenizer ------------------------------------------------------------------------------------------------

def build_tokenizer_json() -> tuple[str, dict[str, int]]:
    """A byte-level BPE tokenizer.json with merges learned from CORPUS, and the full token -> id map.
    The merges are learned here in Python with a total order on ties, so the result never depends on hash
    seeds or thread scheduling (as a library trainer's could)."""
    # Split the corpus exactly as the tokenizer will split text at encode time (GPT-2 regex, bytes -> chars).
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    word_counts = Counter(piece for piece, _ in splitter.pre_tokenize_str(CORPUS))
    byte_chars = _byte_chars()
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    merges = _learn_merges(word_counts, NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    ids = dict(vocab)
    added = []
    for content, special in ADDED_TOKENS:
        ids[content] = len(ids)
        added.append({"id": ids[content], "content": content, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": special})
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  # "a b" strings: the merge format every tokenizers version reads (no token holds a space:
                  # byte-level maps it to "Ġ").
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n", ids


def _byte_chars() -> list[str]:
    """The byte-level alphabet in byte order: byte b is written as one printable character. Printable Latin-1
    bytes stand for themselves; the others (controls, space, ...) are moved to U+0100 onwards in byte order.
    This is the mapping the ByteLevel pre-tokenizer and decoder use."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _learn_merges(word_counts: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair), counting pairs
    inside pre-tokenized words only. Pair counts are updated only for the words a merge touches."""
    words = [list(w) for w in sorted(word_counts)]
    freq = [word_counts[w] for w in sorted(word_counts)]
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and pair_counts:
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < 2:
            break  # a pair seen once is noise, not a subword
        merges.append(best)
        a, b = best
        for i in sorted(where.pop(best, ())):
            w = words[i]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= freq[i]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freq[i]
                where.setdefault(pair, set()).add(i)
    return merges


def _tokenizer_config(ids: dict[str, int]) -> dict:
    # As a transformers-saved checkpoint has it. BOS is not added by the tokenizer: the chat template writes it.
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": special}
            for content, special in ADDED_TOKENS
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": 4096,
        "pad_token": PAD,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": None,
    }


# Written for moerun: the M2 prompt framing (minimax_m2.md 4.2). Every literal goes through an expression and
# every tag trims whitespace, so the template's own layout never leaks into the prompt.
CHAT_TEMPLATE = r"""{#- moerun demo chat template: MiniMax-M2 framing. -#}
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set system_text = text_of(messages[0].content) if has_system else '' -%}
{{- ']~!b[' ~ ']~b]system\n' ~ (system_text or 'You are a helpful assistant.') -}}
{%- if tools -%}
    {{- '\n\n# Tools\nYou can call the tools below. Each is described in JSON Schema:\n\n<tools>\n' -}}
    {%- for tool in tools -%}
        {{- '<tool>' ~ (tool.function if tool.function is defined else tool) | tojson ~ '</tool>\n' -}}
    {%- endfor -%}
    {{- '</tools>\n\nTo call tools, answer with this XML (one <invoke> per call):\n\n<minimax:tool_call>\n'
        ~ '<invoke name="tool-name">\n<parameter name="parameter-name">value</parameter>\n...\n</invoke>\n'
        ~ '</minimax:tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- for m in messages -%}
    {%- if loop.first and has_system -%}
    {%- elif m.role == 'system' -%}
        {{- ']~b]system\n' ~ text_of(m.content) ~ '[e~[\n' -}}
    {%- elif m.role == 'user' -%}
        {{- ']~b]user\n' ~ text_of(m.content) ~ '[e~[\n' -}}
    {%- elif m.role == 'assistant' -%}
        {%- set content = text_of(m.content) -%}
        {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
        {%- if '</think>' in content -%}
            {%- set reasoning = reasoning or content.split('</think>')[0].split('<think>')[-1] -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {{- ']~b]ai\n' -}}
        {#- Reasoning is replayed only for turns after the last user message (the current tool loop). -#}
        {%- if reasoning and loop.index0 > ns.last_user -%}
            {{- '<think>\n' ~ reasoning.strip('\n') ~ '\n</think>\n\n' -}}
        {%- endif -%}
        {{- content -}}
        {%- if m.tool_calls -%}
            {{- '<minimax:tool_call>\n' -}}
            {%- for call in m.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {{- '<invoke name="' ~ fn.name ~ '">\n' -}}
                {%- for key, value in (fn.arguments or {}).items() -%}
                    {{- '<parameter name="' ~ key ~ '">' ~ (value if value is string else value | tojson)
                        ~ '</parameter>\n' -}}
                {%- endfor -%}
                {{- '</invoke>\n' -}}
            {%- endfor -%}
            {{- '</minimax:tool_call>' -}}
        {%- endif -%}
        {{- '[e~[\n' -}}
    {%- elif m.role == 'tool' -%}
        {#- Consecutive tool results share one tool turn. -#}
        {%- if loop.first or loop.previtem.role != 'tool' -%}{{- ']~b]tool' -}}{%- endif -%}
        {{- '\n<response>' ~ text_of(m.content) ~ '</response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '[e~[\n' -}}{%- endif -%}
    {%- else -%}
        {{- raise_exception('unsupported message role: ' ~ m.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ']~b]ai\n<think>\n' -}}
{%- endif -%}
"""


# --- config files ---------------------------------------------------------------------------------------------

def _model_config(ids: dict[str, int], vocab_size: int, dims: dict[str, int] = DIMS) -> dict:
    """config.json as the M2 release writes it, at toy size: the legacy `rotary_dim` *and* rope_parameters
    (newer transformers), the MTP fields of a release without MTP weights, and M2's routing fields."""
    d = dims
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "attention_dropout": 0.0,
        "attn_type_list": [1] * d["num_hidden_layers"],
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "hidden_size": d["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": d["intermediate_size"],
        "max_position_embeddings": 4096,
        "model_type": "minimax_m2",
        "mtp_transformer_layers": 1,
        "num_attention_heads": d["num_attention_heads"],
        "num_experts_per_tok": d["num_experts_per_tok"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_key_value_heads": d["num_key_value_heads"],
        "num_local_experts": d["num_local_experts"],
        "num_mtp_modules": 3,
        "output_router_logits": False,
        "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"partial_rotary_factor": d["rotary_dim"] / d["head_dim"], "rope_theta": 5000000.0,
                            "rope_type": "default"},
        "rope_theta": 5000000,
        "rotary_dim": d["rotary_dim"],
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "use_mtp": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": vocab_size,
    }


def _generation_config(ids: dict[str, int]) -> dict:
    # MiniMax's recommended sampling for every M2 version.
    return {"bos_token_id": ids[BOS], "do_sample": True, "eos_token_id": ids[EOS], "temperature": 1.0,
            "top_k": 40, "top_p": 0.95, "transformers_version": "4.46.1"}


# --- weights --------------------------------------------------------------------------------------------------

def _weights(cfg: ModelConfig, tokenizer_vocab: int) -> dict[str, torch.Tensor]:
    """Random weights with unit-gain scales (each projection keeps activations near unit RMS), non-trivial norm
    weights and a non-zero routing bias, so every part of the M2 math changes the logits. The lm_head scale gives
    peaked but not one-hot next-token distributions. bf16 like the release, except the fp32 router."""
    import torch  # here, not at the top: checking or locating the cached demo needs no torch

    gen = torch.Generator().manual_seed(SEED)
    bf16 = torch.bfloat16

    def linear(shape: tuple[int, int], gain: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * (gain / shape[1] ** 0.5)

    def make(t: M2Tensor) -> torch.Tensor:
        if t.kind == NORM:
            return (1.0 + 0.2 * torch.randn(t.shape, generator=gen)).to(bf16)
        if t.kind == ROUTER:  # stays fp32, as in the release: bf16 noise can flip the top-k choice
            return linear(t.shape, gain=2.0)
        if t.kind == ROUTER_BIAS:
            return 0.5 * torch.randn(t.shape, generator=gen)
        if t.kind == EMBED or t.name == "lm_head.weight":
            w = torch.randn(t.shape, generator=gen) if t.kind == EMBED else linear(t.shape, gain=4.0)
            w[tokenizer_vocab:] = 0.0  # padding ids: no token maps to them
            return w.to(bf16)
        return linear(t.shape).to(bf16)

    return {t.name: make(t) for t in all_tensors(cfg, cfg.num_layers)}


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], layers: int = DIMS["num_hidden_layers"]) -> None:
    """Split by layer into SHARDS files plus model.safetensors.index.json, like the multi-file release."""
    from safetensors.torch import save_file

    per_shard = -(-layers // SHARDS)

    def shard_of(name: str) -> int:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) // per_shard
        return 0 if name == "model.embed_tokens.weight" else SHARDS - 1

    weight_map, total = {}, 0
    for shard in range(SHARDS):
        file = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {name: t.contiguous() for name, t in tensors.items() if shard_of(name) == shard}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        for name, t in part.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
