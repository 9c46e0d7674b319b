"""The one YAML file that picks everything: backend, checkpoint, dtype, KV cache, and each backend's options.

    backend: cpu                 # cpu | cuda | ascend
    model:
      path: ./checkpoint         # HF folder, relative to this YAML file's folder; or builtin:demo (the trained
                                 # demo shipped in the package) or builtin:random-demo (random weights, cached)
      dtype: float32             # float32 | bfloat16 | float16
      num_layers: null           # load only the first N decoder layers (smoke tests of huge checkpoints)
    kv_cache:
      block_size: null           # null: the backend's default
      num_blocks: 512
    scheduler:
      max_num_seqs: 256          # requests in flight at once
      max_num_batched_tokens: 2048   # tokens per forward step (decodes + prefill chunks)
      max_model_len: null        # null: the checkpoint's max_position_embeddings
      enable_prefix_caching: true
    cpu: {threads: 0}            # each backend's own section, validated by that backend

Every unknown key, wrong type or value raises ConfigError naming the key path and what is allowed. The file
itself is bounded before it is parsed: at most 64 KiB of UTF-8, no YAML aliases, at most 16 levels deep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from moerun.backends.base import DTYPES, backend_names, get_backend_class
from moerun.backends.errors import ConfigError, key_name, shown
from moerun.runtime.files import KiB, decode_utf8, read_bytes
from moerun.runtime.model_config import MAX_LAYERS

BUILTIN_DEMO = "builtin:demo"  # the trained demo model shipped in the package (runtime/trained_demo.py)
BUILTIN_RANDOM_DEMO = "builtin:random-demo"  # random weights in the same layout, built into the cache (runtime/demo.py)
BUILTINS = (BUILTIN_DEMO, BUILTIN_RANDOM_DEMO)

MAX_CONFIG_BYTES = 64 * KiB  # a run config is a few hundred bytes
MAX_YAML_DEPTH = 16
MAX_KV_BLOCKS = 1 << 24  # 268M tokens at block 16: beyond any device's memory, below any integer overflow

_TOP_KEYS = {"backend", "model", "kv_cache", "scheduler"}
_MODEL_KEYS = {"path": str, "dtype": str, "num_layers": int}
_KV_KEYS = {"block_size": int, "num_blocks": int}
_SCHEDULER_KEYS = {"max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int,
                   "enable_prefix_caching": bool}
_SCHEDULER_RANGES = {"max_num_seqs": 1 << 16, "max_num_batched_tokens": 1 << 24, "max_model_len": 1 << 24}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True


@dataclasses.dataclass
class RunConfig:
    backend: str
    model_path: str  # a resolved folder, or one of BUILTINS
    dtype: torch.dtype
    num_layers: int | None
    kv_block_size: int | None
    kv_num_blocks: int
    backend_options: dict[str, Any]  # the chosen backend's section, validated, defaults filled
    source: str  # where the config came from, for messages
    scheduler: SchedulerConfig = SchedulerConfig()

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    text = decode_utf8(read_bytes(path, MAX_CONFIG_BYTES, "config file", ConfigError), str(path), ConfigError)
    try:
        raw = yaml.load(text.removeprefix("\ufeff"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or e).strip().splitlines()[0][:120]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    except ValueError as e:  # an int literal beyond Python's digit limit
        raise ConfigError(f"{path}: not valid YAML ({str(e)[:80]})") from None
    return parse_run_config(raw, base_dir=path.resolve().parent, source=str(path))


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load minus what a run config never needs and what makes parsing unbounded: aliases (a few
    hundred bytes of nested aliases expand to gigabytes), nesting deeper than MAX_YAML_DEPTH (the composer
    recurses per level), and a key given twice in one mapping (PyYAML silently keeps the last)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor[:40]}: YAML aliases are not allowed "
                                              "in a moerun config (write the value out)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float)):
                continue  # unhashable keys are refused by PyYAML itself; other odd keys by the schema below
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_run_config(raw: Any, base_dir: Path, source: str = "<config>") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with at least 'backend' and 'model'")
    backend = raw.get("backend")
    if backend is None:
        raise ConfigError(f"{source}: backend: missing (allowed: {', '.join(backend_names())})")
    if not isinstance(backend, str) or backend not in backend_names():
        raise ConfigError(f"{source}: backend: unknown backend {shown(backend)} (allowed: {', '.join(backend_names())})")
    for key in raw:
        if key not in _TOP_KEYS and key not in backend_names():
            allowed = ", ".join(sorted(_TOP_KEYS | set(backend_names())))
            raise ConfigError(f"{source}: {key_name(key)}: unknown key (allowed: {allowed})")

    model = _section(raw, "model", _MODEL_KEYS, source, required=True)
    if "path" not in model:
        raise ConfigError(f"{source}: model.path: missing (an HF checkpoint folder, or one of {', '.join(BUILTINS)})")
    model_path = model["path"]
    if not model_path or "\0" in model_path or len(model_path) > 4096:
        raise ConfigError(f"{source}: model.path: {shown(model_path)} is not a usable path "
                          f"(a folder path of 1 to 4096 characters without NUL, or one of {', '.join(BUILTINS)})")
    if model_path not in BUILTINS:
        try:
            p = Path(model_path).expanduser()
        except RuntimeError:  # ~name of a user that does not exist
            raise ConfigError(f"{source}: model.path: {shown(model_path)}: no such user's home folder") from None
        model_path = str(p if p.is_absolute() else (base_dir / p).resolve())
    dtype_name = model.get("dtype", "bfloat16")
    if dtype_name not in DTYPES:
        raise ConfigError(f"{source}: model.dtype: {shown(dtype_name)} is not allowed (allowed: {', '.join(DTYPES)})")
    num_layers = model.get("num_layers")
    if num_layers is not None:
        _check_range(num_layers, 1, MAX_LAYERS, "model.num_layers", source)

    kv = _section(raw, "kv_cache", _KV_KEYS, source, required=False)
    backend_cls = get_backend_class(backend)
    block_size = kv.get("block_size")
    if block_size is not None and block_size not in backend_cls.capabilities.kv_block_sizes:
        allowed = ", ".join(map(str, backend_cls.capabilities.kv_block_sizes))
        raise ConfigError(f"{source}: kv_cache.block_size: {shown(block_size)} is not supported by backend {backend} (allowed: {allowed})")
    num_blocks = kv.get("num_blocks", 512)
    _check_range(num_blocks, 1, MAX_KV_BLOCKS, "kv_cache.num_blocks", source)

    scheduler = SchedulerConfig(**_section(raw, "scheduler", _SCHEDULER_KEYS, source, required=False))
    for key, most in _SCHEDULER_RANGES.items():  # buffers of these sizes are allocated at start
        if getattr(scheduler, key) is not None:
            _check_range(getattr(scheduler, key), 1, most, f"scheduler.{key}", source)

    dtype = DTYPES[dtype_name]
    if dtype not in backend_cls.capabilities.dtypes:
        allowed = ", ".join(k for k, v in DTYPES.items() if v in backend_cls.capabilities.dtypes)
        raise ConfigError(f"{source}: model.dtype: {dtype_name} is not supported by backend {backend} (allowed: {allowed})")

    # Every backend section present is validated by its backend, so a typo in a section not chosen today is
    # still caught. Backend modules import on any machine: their device libraries load only when used.
    options = {}
    for name in backend_names():
        if name in raw:
            validated = get_backend_class(name).validate_options(_mapping(raw[name], name, source), f"{source}: {name}")
            if name == backend:
                options = validated
    if backend not in raw:
        options = backend_cls.validate_options({}, f"{source}: {backend}")

    return RunConfig(backend=backend, model_path=model_path, dtype=dtype, num_layers=num_layers,
                     kv_block_size=block_size, kv_num_blocks=num_blocks, backend_options=options, source=source,
                     scheduler=scheduler)


def _check_range(value: int, lo: int, hi: int, key: str, source: str) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{source}: {key}: {shown(value)} is out of range (allowed: {lo}..{hi})")


def _mapping(value: Any, key: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {shown(value)}")
    return value


def _section(raw: dict, key: str, schema: dict[str, type], source: str, required: bool) -> dict:
    if key not in raw and required:
        raise ConfigError(f"{source}: {key}: missing")
    section = _mapping(raw.get(key), key, source)
    for k, v in section.items():
        if k not in schema:
            raise ConfigError(f"{source}: {key}.{key_name(k)}: unknown key (allowed: {', '.join(schema)})")
        kind = schema[k]
        if v is not None and (not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool)):
            raise ConfigError(f"{source}: {key}.{k}: expected {kind.__name__}, got {shown(v)}")
    return {k: v for k, v in section.items() if v is not None}
