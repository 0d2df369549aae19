"""JSON <-> typed dataclasses, checked field by field: the one parser behind the artifact spec.

    spec = parse(Manifest, json.loads(text))      # FieldError("graphs.medusa.paths", "must be an integer, not str")
    data = to_json(spec)                          # plain dicts, lists and scalars again
    value = read_json(path)                       # an artifact's JSON file, or ArtifactError naming it

Driven by the dataclasses' type hints: nested dataclasses, ``int``, ``float``, ``str``, ``bool``, ``Literal``,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and ``Any`` (kept as it is). A field without
a default must be present, a key that is no field is refused, and a dataclass's ``__post_init__`` may raise
``ValueError`` for a constraint across fields; each failure names the field by its dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .bounded_read import read_bounded
from .errors import ArtifactError

REBUILD = "rebuild the artifact with `medusa-export build`"
MAX_JSON_BYTES = 16 << 20  # an artifact's JSON files (the default model's manifest: 0.3 MB with its validation record)


_MAX_FLOAT_INT = 10**300  # integers given for a float field: float() overflows past about 1.8e308


class FieldError(ValueError):
    """A value that does not fit its field; ``path`` is the field's dotted path ("" for the whole document)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path or 'the document'} {problem}")
        self.path, self.problem = path, problem


def _check_finite(value: Any, path: str) -> None:
    """FieldError for a NaN or infinite float anywhere in ``value`` (walked without recursion: any depth)."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise FieldError(where, f"must be a finite number, not {item}")
        if isinstance(item, dict):
            stack += [(v, _join(where, str(k))) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(item)]


def parse(tp: Any, value: Any, path: str = "") -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:  # a free-form report: any JSON, but no NaN or Infinity either (the document's promise)
        _check_finite(value, path)
        return value
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return parse(option, value, path)
            except FieldError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise FieldError(path, f"must be {' or '.join(_describe(o) for o in options)}, not {_kind(value)}")
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise FieldError(path, f"must be one of {', '.join(map(repr, args))}, not {value!r:.40}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise FieldError(path, f"must be a list, not {_kind(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise FieldError(path, f"must have {len(args)} items, not {len(value)}")
            return tuple(parse(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        items = [parse(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(path, f"must be an object, not {_kind(value)}")
        return {k: parse(args[1], v, _join(path, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(path, f"must be a number, not {_kind(value)}")
        if isinstance(value, int):
            if abs(value) > _MAX_FLOAT_INT:  # float() of a longer integer overflows
                raise FieldError(path, f"must be a finite number, not an integer of {len(str(abs(value)))} digits")
        elif not math.isfinite(value):  # json.loads reads NaN and Infinity, which no record of ours holds
            raise FieldError(path, f"must be a finite number, not {value}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise FieldError(path, f"must be {_describe(tp)}, not {_kind(value)}")
        return value
    raise TypeError(f"typed_json cannot parse {tp!r} ({path})")  # a programming error, not bad input


def _parse_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise FieldError(path, f"must be an object, not {_kind(value)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    extra = sorted(set(value) - set(fields), key=str)
    if extra:
        raise FieldError(_join(path, str(extra[0])), "is not a field of this format")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = parse(hints[name], value[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FieldError(_join(path, name), "is missing")
    try:
        return cls(**kwargs)
    except FieldError as e:  # a __post_init__ naming a field inside this object
        raise FieldError(_join(path, e.path), e.problem) from None
    except ValueError as e:
        raise FieldError(path, str(e)) from None


def read_json(path: Path, fix: str = REBUILD, unique_keys: bool = False) -> Any:
    """The JSON value in ``path``. Every way an artifact's file can fail to be JSON (unreadable, not a regular
    file, over MAX_JSON_BYTES, not UTF-8, a syntax error, an integer past int()'s 4,300 digits, nesting deeper than
    the recursion limit) is an ArtifactError naming the file and ``fix``: json.loads alone raises ValueError or
    RecursionError for some. ``unique_keys``: a key repeated within one object is refused too (json.loads keeps
    the last; transformers' files are read as it reads them, our own manifest strictly)."""
    try:
        text = read_bounded(path, MAX_JSON_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path} is not UTF-8 text (byte {e.start}): {fix}") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({e.strerror or type(e).__name__}): {fix}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): {fix}") from None
    except RecursionError:
        raise ArtifactError(f"{path} is not usable JSON (nested too deeply): {fix}") from None
    except ValueError as e:  # e.g. an integer with more digits than int() converts
        raise ArtifactError(f"{path} is not usable JSON ({str(e).split(';')[0][:100]}): {fix}") from None


def json_object_or_none(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is none to read: absent, not a regular file, over
    MAX_JSON_BYTES, not JSON, not an object (whether a directory holds a file of ours, not a reason to refuse it)."""
    try:
        data = json.loads(read_bounded(path, MAX_JSON_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # a FIFO or /dev/zero there is no file of ours either
        return None
    return data if isinstance(data, dict) else None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object whose keys are all different: json.loads keeps the last of a repeated key silently, so a reader
    of the file (a person, another tool) could see another value than the loader uses."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r:.60} appears twice in one object")
    return data


def to_json(obj: Any) -> Any:
    """Plain JSON values: dataclasses become objects (every field), tuples lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _describe(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or get_origin(tp) is dict:
        return "an object"
    if get_origin(tp) in (list, tuple):
        return "a list"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(tp, str(tp))


__all__ = ["FieldError", "parse", "read_json", "to_json"]
