"""Errors meant for the person running moerun: the CLI prints them as one line and exits 2.

They live beside the backend interface because both sides raise them: a backend refusing a model or an option,
the runtime refusing a config, a checkpoint or a request. Backends import nothing from moerun.runtime."""


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
