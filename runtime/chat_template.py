"""A checkpoint's chat template, compiled and rendered with bounded time, output and intermediate sizes.

The prompt must be the one the model was trained on, byte for byte, so the template is set up the way
transformers sets it up (same Jinja options, same `tojson`). Plain Jinja's `tojson` sorts keys and HTML-escapes
`<>&'`, which reorders tool schemas and changes the prompt (MiniMax-M2 is checked for exactly this).

Templates come with downloaded checkpoints: they are untrusted code. Jinja's sandbox keeps them from Python's
internals, but not from running forever or building a gigabyte string, and any exception (ZeroDivisionError,
RecursionError, OverflowError...) would escape as a traceback. So rendering here is bounded:
- time: compiling and rendering run in a thread of their own, which a watchdog interrupts past
  MAX_RENDER_SECONDS (an exception delivered between two bytecodes, so a loop with an empty body stops too, at
  no cost while the template runs, and raised again until the thread ends);
- size: every value the template builds (operators, `~`, calls, filters, attributes, namespace assignments)
  and the rendered text are held to MAX_TEMPLATE_CHARS characters, counting nested lists and dicts as written
  out (so `[x, x]` nested 60 times cannot become a 2**60-character string), and the operations that turn a small
  input into a huge one (`*`, `**`, `%` and format widths, replace/join/center...) are checked before they run;
- errors: anything the template raises becomes one TemplateFailure naming the exception.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
import time
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_CHARS = 4 << 20  # the rendered prompt and any value built on the way: ~1M tokens, beyond any context
MAX_INT_BITS = 1 << 16  # integers a template may build (about 20000 digits)
MAX_RENDER_SECONDS = 5.0
# The flags, width and precision of each %-conversion, and the spec after ':' of each {} field.
_FORMAT_SPECS = re.compile(r"%[^a-zA-Z%]*|\{[^{}:]*:([^{}]*)\}")
_JINJA_STATE = (jinja2.Environment, jinja2.runtime.Context, jinja2.nodes.EvalContext)


class TemplateFailure(Exception):
    """The template raised, or went past a bound; the message is one line."""


def compile_template(text: str) -> jinja2.Template:
    """Raises TemplateFailure for a template that does not compile (syntax, nesting Python cannot compile)."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                         finalize=_written)
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, namespace=BoundedNamespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return _within_time_limit(env.from_string, text)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateFailure(f"does not parse (line {e.lineno}: {_first_line(e.message or '')})") from None
    except TemplateFailure:
        raise
    except Exception as e:  # RecursionError, MemoryError, SyntaxError from nesting Python cannot compile
        raise TemplateFailure(f"does not compile ({_describe(e)})") from None


def render(template: jinja2.Template, context: dict[str, Any]) -> str:
    """The rendered text, or TemplateFailure naming what the template did wrong."""
    try:
        return _within_time_limit(_render, template, context)
    except TemplateFailure:
        raise
    except jinja2.TemplateError as e:  # raise_exception() in the template: it rejects these messages
        raise TemplateFailure(_first_line(str(e)) or type(e).__name__) from None
    except Exception as e:  # untrusted code: whatever it raises is the template's fault, reported as one line
        raise TemplateFailure(f"raised {_describe(e)}") from None


def _render(template: jinja2.Template, context: dict[str, Any]) -> str:
    parts, size = [], 0
    for chunk in template.generate(**context):
        size += len(chunk)
        if size > MAX_TEMPLATE_CHARS:
            raise TemplateFailure(f"the rendered prompt is longer than {MAX_TEMPLATE_CHARS} characters")
        parts.append(chunk)
    return "".join(parts)


class _OutOfTime(SystemExit):
    """Raised into the template's thread by the watchdog. A BaseException, so no `except Exception` inside Jinja
    or a filter swallows it; a SystemExit, so one landing as that thread ends is dropped silently by threading."""


STOP_GRACE_SECONDS = 1.0  # past the deadline, how long the watchdog keeps raising before the caller gives up


def _within_time_limit(fn, *args):
    """fn(*args) in a thread of its own, which the watchdog stops past MAX_RENDER_SECONDS.

    The stop is an exception raised into that thread between two bytecodes (so an empty loop stops too). CPython
    drops such an exception when it lands in a weakref callback or a __del__ ("Exception ignored in..."), so the
    watchdog raises it again until the thread ends; running fn in its own thread is what makes that safe: a late
    exception can only land in the thread it was meant for, never in the caller's code after the render. (Work
    spending nearly all its time inside such callbacks would lose every stop; a sandboxed template cannot define
    one, and those it may trigger, in garbage collection, are brief.) A thread stuck in a single C call (bounded
    by the size checks) cannot be interrupted: the caller is released after STOP_GRACE_SECONDS all the same, and
    the daemon thread ends when the call does."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the caller, which reports it)
            outcome["error"] = e

    thread = threading.Thread(target=work, name="chat-template", daemon=True)
    thread.start()
    thread.join(MAX_RENDER_SECONDS)
    if thread.is_alive():
        give_up = time.monotonic() + STOP_GRACE_SECONDS
        while thread.is_alive() and time.monotonic() < give_up:
            _raise_in_thread(thread.ident, _OutOfTime)
            thread.join(0.02)
        raise TemplateFailure(f"still running after {MAX_RENDER_SECONDS:g} s: a loop that does not end, "
                              f"or far too much work")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _raise_in_thread(thread_id: int, exception: type[BaseException]) -> None:
    """CPython's PyThreadState_SetAsyncExc: `exception` is raised in that thread at its next bytecode."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exception))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every operator, call and attribute read checked against the size bounds.
    Intercepting `*`, `**` and `%` also keeps Jinja from folding them at compile time (`10 ** 10 ** 10`)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _is_int(times) and hasattr(seq, "__len__") and not _is_int(seq):
                    _require_size(len(seq) * max(times, 0), "a repetition")
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            _require_bits(abs(left).bit_length() * right if abs(left) > 1 else 1, "a power")
        elif operator == "%" and isinstance(left, str):
            _require_widths(left, right)
            for arg in right if isinstance(right, tuple) else [right]:
                _written(arg)
        return _checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        return _checked(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        return _checked(super().getitem(obj, argument))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list, tuple)):
            _check_method_call(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return _checked(ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        # The sandbox hands templates its own wrapper of str.format; widths in the format string still count.
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None

        def bounded(*args, **kwargs):
            _require_widths(value.__self__, [*args, *kwargs.values()])
            for arg in [*args, *kwargs.values()]:
                _written(arg)
            return _checked(wrapper(*args, **kwargs))

        return bounded


class _BoundedTemplate(jinja2.Template):
    """Compiled templates join `a ~ b` with jinja2.runtime's str_join / markup_join, names looked up in the
    template's own module namespace: bound them there, for this environment's templates only."""

    @classmethod
    def _from_namespace(cls, environment, namespace, globals):
        namespace.update(str_join=_bounded_join(namespace["str_join"]),
                         markup_join=_bounded_join(namespace["markup_join"]))
        return super()._from_namespace(environment, namespace, globals)


BoundedSandbox.template_class = _BoundedTemplate


class BoundedNamespace(Namespace):
    """`namespace()` whose attribute assignments (`{% set ns.x = ... %}`) are size-checked like any value."""

    def __setitem__(self, name, value):
        super().__setitem__(name, _written(value))


def _check_method_call(owner: str | list | tuple, name: str, args: tuple, kwargs: dict) -> None:
    """Bound the str methods that build a much larger string than their inputs before they run."""
    values = list(args) + list(kwargs.values())
    for value in values:
        if _is_int(value) and value > MAX_TEMPLATE_CHARS:  # center/ljust/zfill/expandtabs widths, counts
            raise TemplateFailure(f"{name}() with {value}: larger than {MAX_TEMPLATE_CHARS}")
    if name == "replace" and len(values) >= 2 and isinstance(values[0], str) and isinstance(values[1], str):
        matches = len(owner) + 1 if not values[0] else len(owner) // len(values[0])
        _require_size(len(owner) + matches * len(values[1]), "replace()")
    elif name == "join" and values and isinstance(values[0], (list, tuple)):
        _require_size(len(owner) * len(values[0]) + sum(len(v) for v in values[0] if isinstance(v, str)), "join()")
    elif name in ("format", "format_map") and isinstance(owner, str):
        _require_widths(owner, values)
    elif name == "translate" and values and isinstance(values[0], dict):
        longest = max((len(v) for v in values[0].values() if isinstance(v, str)), default=1)
        _require_size(len(owner) * longest, "translate()")


def _bounded_filter(name: str, f):
    """A filter with the size checks of a method call: no int argument beyond the size bound (`x|center(10**9)`,
    `x|slice(10**9)`), and replace, format, indent and join estimated before they run."""

    @functools.wraps(f)  # keeps Jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        values = [a for a in args if not isinstance(a, _JINJA_STATE)]
        subject, rest = (values[0], values[1:]) if values else (None, [])
        _written(subject)  # tojson, string, join... write their input out
        for value in [*rest, *kwargs.values()]:
            if _is_int(value) and abs(value) > MAX_TEMPLATE_CHARS:
                raise TemplateFailure(f"filter {name} with {value}: larger than {MAX_TEMPLATE_CHARS}")
        if name in ("replace", "format") and isinstance(subject, str):
            _check_method_call(subject, name, tuple(rest), kwargs)
        elif name == "indent" and isinstance(subject, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            per_line = len(width) if isinstance(width, str) else width if _is_int(width) else 0
            _require_size(len(subject) + subject.count("\n") * per_line, "indent")
        elif name == "join" and rest and isinstance(rest[0], str) and hasattr(subject, "__len__"):
            _require_size(len(rest[0]) * len(subject), "join")
        return _checked(f(*args, **kwargs))

    return bounded


def _bounded_join(join):
    def bounded(seq):
        items = list(seq)
        _require_size(sum(_written_size(item, {}) for item in items), "a ~ concatenation")
        return join(items)

    return bounded


def _checked(value: Any) -> Any:
    """`value`, after checking its own length (or an integer's size)."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)):
        _require_size(len(value), "a value")
    elif _is_int(value):
        _require_bits(value.bit_length(), "an integer")
    return value


def _written(value: Any) -> Any:
    """`value`, after checking how long it is written out (str(), tojson), nested containers included."""
    _require_size(_written_size(_checked(value), {}), "a value written out")
    return value


def _written_size(value: Any, seen: dict[int, int]) -> int:
    """About how many characters `value` takes written out; shared sub-containers are counted each time they
    appear (as str() writes them) but measured once, so this is fast even where the written size is huge."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if _is_int(value):
        return value.bit_length() // 3 + 1
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")  # the one attribute Jinja lets through
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 8
    key = id(value)
    if key not in seen:
        seen[key] = 0  # a container inside itself: counted once
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        seen[key] = 2 + sum(_written_size(item, seen) + 2 for item in items)
    return seen[key]


def _require_size(n: int, what: str) -> None:
    if n > MAX_TEMPLATE_CHARS:
        raise TemplateFailure(f"{what} of {n} items or characters, more than the {MAX_TEMPLATE_CHARS} allowed")


def _require_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateFailure(f"{what} of about {bits} bits, more than the {MAX_INT_BITS} allowed")


def _require_widths(fmt: str, args: Any) -> None:
    """Field widths written in a format string (`%09999999d`, `{:>9999999}`) or passed as ints (`%*d`)."""
    for match in _FORMAT_SPECS.finditer(fmt):
        for width in re.findall(r"\d+", match.group(0)):
            if len(width) > 9 or int(width) > MAX_TEMPLATE_CHARS:
                raise TemplateFailure(f"a format string with a field width over {MAX_TEMPLATE_CHARS}")
    for value in args if isinstance(args, (tuple, list)) else [args]:
        if _is_int(value) and abs(value) > MAX_TEMPLATE_CHARS:
            raise TemplateFailure(f"a format argument of {value}, larger than {MAX_TEMPLATE_CHARS}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Keep key order and leave <, >, & as they are: the model saw tool schemas written exactly like this.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _describe(e: BaseException) -> str:
    detail = _first_line(str(e))
    return f"{type(e).__name__}: {detail[:200]}" if detail else type(e).__name__


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
