"""A checkpoint's tokenizer and chat template: text <-> token ids, and messages -> prompt text.

The prompt must be the one the model was trained on, byte for byte, so the template is rendered the way
transformers renders it (same Jinja settings, same `tojson`). Plain Jinja's `tojson` sorts keys and HTML-escapes
`<>&'`, which reorders tool schemas and changes the prompt (MiniMax-M2 is checked for exactly this).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moerun.backends.errors import CheckpointError, MoerunError

# The M2 end-of-message token. Generation stops on it even if a config forgets to list it.
END_OF_MESSAGE = "[e~["
# Names clients use for an assistant turn's reasoning; templates read `reasoning_content` (as in transformers).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    def __init__(self, folder: Path, backend: tokenizers.Tokenizer, tokenizer_config: dict[str, Any],
                 eos_token_ids: tuple[int, ...], chat_template: str | None, chat_template_source: str | None):
        self.folder = folder
        self._backend = backend
        self._config = tokenizer_config
        self.eos_token_ids = eos_token_ids
        self._template_text = chat_template
        self._template_source = chat_template_source

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{tok_path}: no tokenizer.json (moerun needs the Hugging Face fast-tokenizer file)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust loader raises a bare Exception for bad JSON or an unknown layout
            raise CheckpointError(f"{tok_path}: not a valid tokenizer.json ({_first_line(e)})") from None

        tok_config = read_optional_json(folder / "tokenizer_config.json")
        gen_config = read_optional_json(folder / "generation_config.json")
        model_config = read_optional_json(folder / "config.json")
        eos = _eos_ids(backend, gen_config, model_config)
        template, source = _find_template(folder, tok_config)
        return cls(folder, backend, tok_config, eos, template, source)

    # --- text <-> ids -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS: M2's chat template writes BOS itself, and a second one would be a different prompt.
        # Special-token text inside `text` (e.g. "]~b]") still becomes the special token, as in transformers.
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included. The model's vocab_size may be padded beyond it."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def bos_token(self) -> str | None:
        return _token_text(self._config.get("bos_token"))

    @cached_property
    def eos_token(self) -> str | None:
        return _token_text(self._config.get("eos_token"))

    @cached_property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    # --- chat template ------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._template_text is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` (OpenAI-style dicts) to prompt text. Extra kwargs reach the template as variables."""
        template = self._compiled_template
        context: dict[str, Any] = {name: value for name in ("bos_token", "eos_token", "pad_token", "unk_token")
                                   if (value := _token_text(self._config.get(name))) is not None}
        context.update(kwargs)
        context.update(messages=_prepare_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            return template.render(**context)
        except jinja2.TemplateError as e:
            # raise_exception() in a template means the template rejects these messages: a request problem.
            raise MoerunError(f"{self._template_source}: chat template failed: {_first_line(e)}") from None

    @cached_property
    def _compiled_template(self):
        if self._template_text is None:
            raise CheckpointError(f"{self.folder}: no chat template (looked for chat_template.jinja and "
                                  f"'chat_template' in tokenizer_config.json)")
        return _compile_template(self._template_text, self._template_source)


def _compile_template(text: str, source: str | None):
    """Jinja set up as transformers does it, so a checkpoint's template renders the same prompt here as there.
    The sandbox matters: templates come with downloaded checkpoints and are untrusted code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{source}: chat template does not parse (line {e.lineno}: {e.message})") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Keep key order and leave <, >, & as they are: the model saw tool schemas written exactly like this.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_optional_json(path: Path) -> dict[str, Any]:
    """An optional JSON file of the checkpoint: {} when absent, CheckpointError when present but unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as a string or, in older files, as {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(backend: tokenizers.Tokenizer, gen_config: dict, model_config: dict) -> tuple[int, ...]:
    """generation_config.json wins over config.json (it is what `generate` uses); `[e~[` is always added."""
    ids: list[int] = []
    for source in (gen_config, model_config):
        value = source.get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool) and item not in ids:
                ids.append(item)
    end = backend.token_to_id(END_OF_MESSAGE)
    if end is not None and end not in ids:
        ids.append(end)
    return tuple(ids)


def read_chat_template(folder: Path) -> tuple[str | None, str | None]:
    """(template text, where it was found) of a checkpoint folder, or (None, None) when it has none."""
    return _find_template(folder, read_optional_json(folder / "tokenizer_config.json"))


def _find_template(folder: Path, tok_config: dict[str, Any]) -> tuple[str | None, str | None]:
    """chat_template.jinja (what newer transformers versions write) takes precedence over tokenizer_config.json,
    as it does in transformers."""
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja_path}: not UTF-8 text ({e})") from None
    template = tok_config.get("chat_template")
    source = f"{folder / 'tokenizer_config.json'} (chat_template)"
    if isinstance(template, list):
        # Named templates: [{"name": "default", "template": ...}, ...]. The default one frames a plain chat.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None, None
    if not isinstance(template, str):
        raise CheckpointError(f"{source}: expected a string, got {type(template).__name__}")
    return template, source


def _prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages in the shape templates read (the caller's dicts are never changed):
    reasoning under `reasoning_content`, and tool-call arguments as a dict (OpenAI sends a JSON string)."""
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise MoerunError(f"chat messages must be dicts, got {type(message).__name__}")
        message = dict(message)
        if message.get("reasoning_content") is None:
            for name in _REASONING_FIELDS[1:]:
                if message.get(name) is not None:
                    message["reasoning_content"] = message[name]
                    break
        if message.get("tool_calls"):
            message["tool_calls"] = [_parse_arguments(call) for call in message["tool_calls"]]
        prepared.append(message)
    return prepared


def _parse_arguments(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            raise MoerunError(f"tool call {function.get('name')!r}: arguments are not valid JSON") from None
        return {**call, "function": {**function, "arguments": arguments}}
    return call
