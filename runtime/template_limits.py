"""Bounded rendering for chat templates, which are code an artifact carries: Jinja's sandbox stops a template from
reaching Python, but not from looping for hours or building a string of gigabytes. Here a render

- stops after ``MAX_RENDER_S`` seconds of template code (its lines are counted by a trace function on the
  template's own frames only, so the host's code runs untraced);
- refuses, before computing it, a value larger than ``MAX_VALUE`` items: ``*``, ``+``, ``**`` and ``%`` on strings,
  lists and numbers, any number above that passed to a call or filter (``center(10**9)``, ``batch(10**9)``), and
  format strings with such a width;
- stops once its output passes ``MAX_OUTPUT`` characters.

A template over a limit raises TemplateLimitError (its render then fails as any failing template does).

    env = bounded_environment()                  # the sandboxed environment chat templates compile in
    text = bounded_render(env.from_string(source), messages=[...])
"""

from __future__ import annotations

import functools
import re
import sys
import time

MAX_RENDER_S = 2.0  # a real chat template renders a conversation in milliseconds
MAX_VALUE = 1 << 24  # characters of a string, items of a list, a number passed to a call (16 M: far above any
MAX_OUTPUT = 1 << 24  # request body a server takes); characters of the rendered conversation
# Characters of a template's source: it goes to the worker with every render (a 15 MB one, mostly a comment, cost
# 0.6 s a chat request against 0.3 ms). Real chat templates, tool calling included, take a few KB.
MAX_SOURCE = 1 << 17
TEMPLATE_FILE = "<template>"  # the file name Jinja gives code compiled from a string
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


class TemplateLimitError(Exception):
    """A chat template went past one of this module's limits."""


def bounded_environment(filters: dict | None = None, **options):
    """Hugging Face's sandboxed environment (``ImmutableSandboxedEnvironment`` with ``options``), with every
    operator, call and filter that can build a large value checked first; ``filters`` add to (or replace) Jinja's
    own, checked the same way."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            _check_arguments(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):  # where the sandbox hands out a string's format / format_map
            if getattr(value, "__name__", None) in ("format", "format_map") and isinstance(
                    getattr(value, "__self__", None), str):
                _check_format(value.__self__)  # "{:>999999999}".format(x); any other method of a text is not checked
            return super().wrap_str_format(value)

    env = BoundedEnvironment(**options)
    env.filters = {name: _checked(name, f) for name, f in {**env.filters, **(filters or {})}.items()}
    return env


def bounded_render(template, trace: bool = True, **variables) -> str:
    """``template.render(**variables)`` within the output limit, and the time limit when ``trace`` (the template
    worker leaves time to the process that kills it)."""
    if not trace:
        return _joined(template.generate(**variables))
    deadline = time.monotonic() + MAX_RENDER_S

    def trace_lines(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the template ran for more than {MAX_RENDER_S:g} s")
        return trace_lines

    def trace_calls(frame, event, arg):  # only the template's own frames get the line tracer
        # Every call is timed too: a filter written in Python (wordwrap of a long text) ran for 16 s in the host's
        # code, untraced line by line, before the template's next line found the time up
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the template ran for more than {MAX_RENDER_S:g} s")
        return trace_lines if frame.f_code.co_filename == TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        return _joined(template.generate(**variables))
    finally:
        sys.settrace(previous)


def _joined(pieces) -> str:
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        if size > MAX_OUTPUT:
            raise TemplateLimitError(f"the template wrote more than {MAX_OUTPUT} characters")
        out.append(piece)
    return "".join(out)


def _size(value) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _check_binop(operator: str, left, right) -> None:
    if operator == "*":
        sizes = [(_size(a), b) for a, b in ((left, right), (right, left))]
        for size, times in sizes:
            if size is not None and isinstance(times, int) and size * max(times, 0) > MAX_VALUE:
                raise TemplateLimitError(f"the template repeats a value into more than {MAX_VALUE} items")
    elif operator == "+":
        if _size(left) is not None and _size(right) is not None and _size(left) + _size(right) > MAX_VALUE:
            raise TemplateLimitError(f"the template joins values into more than {MAX_VALUE} items")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 64:
            raise TemplateLimitError("the template raises an integer to a power above 64")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)
    _check_number(left)
    _check_number(right)


def _check_arguments(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        _check_number(value)


def _check_number(value) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_VALUE:
        raise TemplateLimitError(f"the template uses a number above {MAX_VALUE} ({type(value).__name__})")


def _check_format(text: str) -> None:
    if ("%" in text or "{" in text) and _WIDE_FORMAT.search(text):
        raise TemplateLimitError("the template formats with a width of a million or more")


def _checked(name: str, jinja_filter):
    """A filter whose arguments after the value are checked first (``center(10**9)`` would allocate them; the
    value itself is data, a message's text for one); the ``format`` filter's format string too."""
    skip = 2 if getattr(jinja_filter, "jinja_pass_arg", None) is not None else 1  # the context, then the value

    @functools.wraps(jinja_filter)  # keeps Jinja's pass_context / pass_environment markers
    def checked(*args, **kwargs):
        _check_arguments(args[skip:], kwargs)
        if name == "format" and len(args) >= skip and isinstance(args[skip - 1], str):
            _check_format(args[skip - 1])
        return jinja_filter(*args, **kwargs)

    return checked
