"""Errors meant for the person running moerun: the CLI prints them as one line and exits 2.

They live beside the backend interface because both sides raise them: a backend refusing a model or an option,
the runtime refusing a config, a checkpoint or a request. Backends import nothing from moerun.runtime."""

import reprlib


class MoerunError(Exception):
    """A problem with the user's input or setup (config, checkpoint, arguments), not a bug in moerun."""


class ConfigError(MoerunError):
    """A YAML key, value or type that is not allowed. The message names the key path."""


class CheckpointError(MoerunError):
    """A checkpoint folder that is missing, of another model, truncated, or mis-shaped."""


class UnsupportedModelError(MoerunError):
    """A model the chosen backend's kernels cannot run; raised when the model is built, never mid-request."""


class ResourceError(MoerunError):
    """Not enough host or device memory for what the config asks: the message names what was being allocated, how
    much, and what to change (fewer layers, a smaller KV cache, more devices)."""
def shown(value: object, limit: int = 80) -> str:
    """`value` as an error message echoes it: a repr bounded in work and length. Values come from user files, and
    one can be megabytes long or, through YAML aliases, a structure whose full repr is gigabytes."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_name(key: object) -> str:
    """A mapping key as a message names it: plain when it is a short printable string, else shown()."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else shown(key)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 60, 40, 60
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 4
