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
    cpu: {threads: 0}            # each backend's own section, validated by that backend

Every unknown key, wrong type or value raises ConfigError naming the key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from moerun.backends.base import DTYPES, backend_names, get_backend_class
from moerun.backends.errors import ConfigError

BUILTIN_DEMO = "builtin:demo"  # the trained demo model shipped in the package (runtime/trained_demo.py)
BUILTIN_RANDOM_DEMO = "builtin:random-demo"  # random weights in the same layout, built into the cache (runtime/demo.py)
BUILTINS = (BUILTIN_DEMO, BUILTIN_RANDOM_DEMO)

_TOP_KEYS = {"backend", "model", "kv_cache"}
_MODEL_KEYS = {"path": str, "dtype": str, "num_layers": int}
_KV_KEYS = {"block_size": int, "num_blocks": int}


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

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', e)})") from None
    return parse_run_config(raw, base_dir=path.resolve().parent, source=str(path))


def parse_run_config(raw: Any, base_dir: Path, source: str = "<config>") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with at least 'backend' and 'model'")
    backend = raw.get("backend")
    if backend is None:
        raise ConfigError(f"{source}: backend: missing (allowed: {', '.join(backend_names())})")
    if not isinstance(backend, str) or backend not in backend_names():
        raise ConfigError(f"{source}: backend: unknown backend {backend!r} (allowed: {', '.join(backend_names())})")
    for key in raw:
        if key not in _TOP_KEYS and key not in backend_names():
            allowed = ", ".join(sorted(_TOP_KEYS | set(backend_names())))
            raise ConfigError(f"{source}: {key}: unknown key (allowed: {allowed})")

    model = _section(raw, "model", _MODEL_KEYS, source, required=True)
    if "path" not in model:
        raise ConfigError(f"{source}: model.path: missing (an HF checkpoint folder, or one of {', '.join(BUILTINS)})")
    model_path = model["path"]
    if model_path not in BUILTINS:
        p = Path(model_path).expanduser()
        model_path = str(p if p.is_absolute() else (base_dir / p).resolve())
    dtype_name = model.get("dtype", "bfloat16")
    if dtype_name not in DTYPES:
        raise ConfigError(f"{source}: model.dtype: {dtype_name!r} is not allowed (allowed: {', '.join(DTYPES)})")
    num_layers = model.get("num_layers")
    if num_layers is not None and num_layers <= 0:
        raise ConfigError(f"{source}: model.num_layers: must be a positive int, got {num_layers}")

    kv = _section(raw, "kv_cache", _KV_KEYS, source, required=False)
    backend_cls = get_backend_class(backend)
    block_size = kv.get("block_size")
    if block_size is not None and block_size not in backend_cls.capabilities.kv_block_sizes:
        allowed = ", ".join(map(str, backend_cls.capabilities.kv_block_sizes))
        raise ConfigError(f"{source}: kv_cache.block_size: {block_size} is not supported by backend {backend} (allowed: {allowed})")
    num_blocks = kv.get("num_blocks", 512)
    if num_blocks <= 0:
        raise ConfigError(f"{source}: kv_cache.num_blocks: must be a positive int, got {num_blocks}")

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
                     kv_block_size=block_size, kv_num_blocks=num_blocks, backend_options=options, source=source)


def _mapping(value: Any, key: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
    return value


def _section(raw: dict, key: str, schema: dict[str, type], source: str, required: bool) -> dict:
    if key not in raw and required:
        raise ConfigError(f"{source}: {key}: missing")
    section = _mapping(raw.get(key), key, source)
    for k, v in section.items():
        if k not in schema:
            raise ConfigError(f"{source}: {key}.{k}: unknown key (allowed: {', '.join(schema)})")
        kind = schema[k]
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise ConfigError(f"{source}: {key}.{k}: expected {kind.__name__}, got {v!r}")
    return {k: v for k, v in section.items() if v is not None}
