"""EventBridge event patterns: validation as PutRule does it, and matching as the bus does.

Supported: exact values in lists (strings, numbers, booleans, null), nested objects,
``prefix``, ``suffix``, ``equals-ignore-case``, ``wildcard``, ``anything-but`` (a value,
a list, or a prefix/suffix/equals-ignore-case), ``exists``, ``numeric`` and ``$or``.
An event field that is an array matches when any of its elements matches.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    "=": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
}
_OPERATORS = {
    "prefix",
    "suffix",
    "equals-ignore-case",
    "wildcard",
    "anything-but",
    "exists",
    "numeric",
}


class InvalidEventPattern(ValueError):
    """The pattern would be rejected by EventBridge's PutRule."""


def validate_pattern(pattern: Any) -> None:
    """Raise ``InvalidEventPattern`` for what PutRule would refuse."""
    if not isinstance(pattern, Mapping) or not pattern:
        raise InvalidEventPattern("an event pattern is a non-empty JSON object")
    _validate_object(pattern, "$")


def _validate_object(pattern: Mapping[str, Any], where: str) -> None:
    for key, rule in pattern.items():
        path = f"{where}.{key}"
        if key == "$or":
            if not isinstance(rule, list) or len(rule) < 2:
                raise InvalidEventPattern(f"{path}: $or takes a list of at least two patterns")
            for option in rule:
                if not isinstance(option, Mapping) or not option:
                    raise InvalidEventPattern(f"{path}: each $or option is an object")
                _validate_object(option, path)
        elif isinstance(rule, Mapping):
            if not rule:
                raise InvalidEventPattern(f"{path}: empty object")
            _validate_object(rule, path)
        elif isinstance(rule, list):
            if not rule:
                raise InvalidEventPattern(f"{path}: empty list of values")
            for matcher in rule:
                _validate_matcher(matcher, path)
        else:
            raise InvalidEventPattern(f"{path}: match values must be in a list, got {rule!r}")


def _validate_matcher(matcher: Any, path: str) -> None:
    if matcher is None or isinstance(matcher, str | int | float | bool):
        return
    if not isinstance(matcher, Mapping) or len(matcher) != 1:
        raise InvalidEventPattern(f"{path}: a matcher is a value or a one-key object")
    (name, arg), *_ = matcher.items()
    if name not in _OPERATORS:
        raise InvalidEventPattern(f"{path}: unknown operator {name!r}")
    if name == "exists" and not isinstance(arg, bool):
        raise InvalidEventPattern(f"{path}: exists takes true or false")
    if name in {"prefix", "suffix", "equals-ignore-case", "wildcard"} and not isinstance(arg, str):
        raise InvalidEventPattern(f"{path}: {name} takes a string")
    if name == "numeric":
        if not isinstance(arg, list) or not arg or len(arg) % 2:
            raise InvalidEventPattern(f"{path}: numeric takes [op, number, ...]")
        for op, bound in zip(arg[::2], arg[1::2], strict=True):
            if op not in _COMPARATORS or not _is_number(bound):
                raise InvalidEventPattern(f"{path}: bad numeric comparison {op!r} {bound!r}")
    if (
        name == "anything-but"
        and isinstance(arg, Mapping)
        and (len(arg) != 1 or next(iter(arg)) not in {"prefix", "suffix", "equals-ignore-case"})
    ):
        raise InvalidEventPattern(f"{path}: anything-but takes a value, list or prefix")


def matches(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """Whether ``event`` matches the (valid) ``pattern``."""
    return _match_object(pattern, event)


def _match_object(pattern: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    for key, rule in pattern.items():
        if key == "$or":
            if not any(_match_object(option, obj) for option in rule):
                return False
            continue
        present = key in obj
        value = obj.get(key)
        if isinstance(rule, Mapping):
            if not isinstance(value, Mapping) or not _match_object(rule, value):
                return False
        elif not _match_field(rule, present, value):
            return False
    return True


def _match_field(matchers: list[Any], present: bool, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    for matcher in matchers:
        if isinstance(matcher, Mapping) and "exists" in matcher:
            is_leaf = present and not isinstance(value, Mapping)
            if matcher["exists"] == is_leaf:
                return True
            continue
        if present and any(_match_value(matcher, v) for v in values):
            return True
    return False


def _match_value(matcher: Any, value: Any) -> bool:
    if not isinstance(matcher, Mapping):
        return _equal(matcher, value)
    (name, arg), *_ = matcher.items()
    if name == "numeric":
        return _is_number(value) and all(
            _COMPARATORS[op](float(value), float(bound))
            for op, bound in zip(arg[::2], arg[1::2], strict=True)
        )
    if name == "anything-but":
        if isinstance(arg, Mapping):
            return not _match_value(arg, value)
        excluded = arg if isinstance(arg, list) else [arg]
        return not any(_equal(e, value) for e in excluded)
    if not isinstance(value, str):
        return False
    if name == "prefix":
        return value.startswith(arg)
    if name == "suffix":
        return value.endswith(arg)
    if name == "equals-ignore-case":
        return bool(value.casefold() == arg.casefold())
    if name == "wildcard":
        regex = ".*".join(re.escape(part) for part in arg.split("*"))
        return re.fullmatch(regex, value, flags=re.DOTALL) is not None
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(expected: Any, value: Any) -> bool:
    if _is_number(expected) and _is_number(value):
        return float(expected) == float(value)
    return type(expected) is type(value) and bool(expected == value)
