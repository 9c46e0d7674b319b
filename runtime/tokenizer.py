"""A checkpoint's tokenizer and chat template: text <-> token ids, and messages -> prompt text (the template
itself is compiled and rendered, bounded, by chat_template.py)."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from moerun.backends.errors import CheckpointError, MoerunError
from moerun.runtime.chat_template import TemplateFailure, compile_template, render
from moerun.runtime.files import MiB, read_json_object, read_text, regular_file_size

# The M2 end-of-message token. Generation stops on it even if a config forgets to list it.
END_OF_MESSAGE = "[e~["
# Tags the reasoning and tool-call parsers look for in decoded text: kept even where a tokenizer marks them
# special (M2's own tokenizer does not, but re-exported ones do), so skip_special_tokens never drops them.
VISIBLE_TAGS = ("<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>")
MAX_TOKENIZER_BYTES = 512 * MiB  # M2's tokenizer.json is ~10 MB
MAX_SIDE_FILE_BYTES = 16 * MiB  # tokenizer_config.json (it may hold the template), generation_config.json
MAX_TEMPLATE_BYTES = 1 * MiB  # M2's chat template is ~10 KB
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
        if not os.path.lexists(tok_path):
            raise CheckpointError(f"{tok_path}: no tokenizer.json (moerun needs the Hugging Face fast-tokenizer file)")
        if regular_file_size(tok_path) > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{tok_path}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB, the most a tokenizer.json may be")
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
        """Text of `ids`. skip_special_tokens drops the special added tokens except the VISIBLE_TAGS."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skipped_ids]
        return self._backend.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def _skipped_ids(self) -> frozenset[int]:
        return frozenset(i for i, token in self._backend.get_added_tokens_decoder().items()
                         if token.special and token.content not in VISIBLE_TAGS)

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
    def template_source(self) -> str | None:
        """Where the chat template was read from, for messages."""
        return self._template_source

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
            return render(template, context)
        except TemplateFailure as e:
            # raise_exception() in a template means the template rejects these messages: a request problem.
            raise MoerunError(f"{self._template_source}: chat template failed: {e}") from None

    @cached_property
    def _compiled_template(self):
        if self._template_text is None:
            raise CheckpointError(f"{self.folder}: no chat template (looked for chat_template.jinja and "
                                  f"'chat_template' in tokenizer_config.json)")
        try:
            return compile_template(self._template_text)
        except TemplateFailure as e:
            raise CheckpointError(f"{self._template_source}: chat template {e}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_optional_json(path: Path) -> dict[str, Any]:
    """An optional JSON file of the checkpoint: {} when absent, CheckpointError when present but unreadable."""
    if not os.path.lexists(path):
        return {}
    return read_json_object(path, MAX_SIDE_FILE_BYTES, path.name)


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
    if os.path.lexists(jinja_path):
        return read_text(jinja_path, MAX_TEMPLATE_BYTES, "chat template"), str(jinja_path)
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
    if len(template) > MAX_TEMPLATE_BYTES:
        raise CheckpointError(f"{source}: longer than {MAX_TEMPLATE_BYTES >> 20} MiB, the most a chat template may be")
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
        except (ValueError, RecursionError):
            raise MoerunError(f"tool call {function.get('name')!r}: arguments are not valid JSON") from None
        return {**call, "function": {**function, "arguments": arguments}}
    return call
