"""The declared arguments of each control request, checked before the request runs.

An op's schema is its handler's signature (``Daemon.op_NAME``): the parameter
names, their annotations and which have defaults.  A request is checked whole
against it (unknown or missing arguments, a value of the wrong JSON type) and
refused as a "user" error naming the argument, so a handler only ever sees
values of the types it declares.  Annotations are limited to what JSON carries:
``str``, ``int`` (not a boolean), ``float`` (an int or a finite float), ``bool``,
``None``, ``list[T]``, ``dict[str, T]`` and unions of them.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dmrepl.daemon._proto import ControlError

_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               int: "an integer", float: "a number", type(None): "null"}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               type(None): "null"}


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp)
        return (isinstance(value, dict) and all(_matches(k, key) for k in value)
                and all(_matches(v, item) for v in value.values()))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if tp in (str, bool, type(None)):
        return isinstance(value, tp)
    raise TypeError(f"request schema: unsupported annotation {tp!r}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "an object"
    if tp is float:
        return "a finite number"
    return _TYPE_NAMES.get(tp, "any value")


def _json_type(value: Any, expected: Any = Any) -> str:
    """What ``value`` is, in the words of a refusal (for a list of the wrong
    items: the first wrong one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    if typing.get_origin(expected) is list and isinstance(value, list):
        (item,) = typing.get_args(expected)
        bad = next(v for v in value if not _matches(v, item))
        return f"a list holding {_json_type(bad)}"
    for kind, name in _JSON_NAMES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Param:
    type: Any
    required: bool


@dataclass(frozen=True, slots=True)
class OpSchema:
    op: str
    params: Mapping[str, Param]

    def check(self, args: Mapping[str, Any]) -> None:
        """Refuse (``ControlError("user")``) anything the handler did not declare."""
        unknown = sorted(set(args) - set(self.params))
        if unknown:
            shown = ", ".join(repr(k[:64]) for k in unknown[:5])
            raise ControlError("user", f"{self.op}: unknown argument {shown}")
        for name, param in self.params.items():
            if name not in args:
                if param.required:
                    raise ControlError("user", f"{self.op}: missing argument {name!r}")
                continue
            if not _matches(args[name], param.type):
                raise ControlError("user", f"{self.op}: argument {name!r} must be "
                                           f"{_describe(param.type)}, got "
                                           f"{_json_type(args[name], param.type)}")


@functools.cache
def schema_of(op: str, func: Callable[..., Any]) -> OpSchema:
    """The schema of ``func`` (an unbound ``op_`` handler) from its signature."""
    hints = typing.get_type_hints(func)
    params = {}
    for name, p in inspect.signature(func).parameters.items():
        if name == "self":
            continue
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"request schema: {func.__qualname__}: *{name} is not allowed")
        tp = hints.get(name, Any)
        _matches(None, tp)   # an unsupported annotation fails here, not at a request
        params[name] = Param(tp, p.default is inspect.Parameter.empty)
    return OpSchema(op, params)
