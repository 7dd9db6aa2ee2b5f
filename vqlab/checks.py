"""Argument checks with one error policy, used by every config, code and function that takes numbers.

    ValueError  a value of the right kind that is out of range, or a scalar of the wrong kind (k="16", k=True,
                k=2.5, step=nan): "<field> must be <what>, got <value>"
    TypeError   an object of the wrong class where an object is expected (a module that is not a layer, a
                codebook that is not a `vqlab.Codebook`): "<field> must be a <class>, got <class of value>"

`field` names the argument as the user wrote it, with its owner where that helps ("VQConfig.k", "layer 'fc1'"),
so every message names the field and the bad value.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_number", "check_bool", "check_choice", "check_instance", "check_fraction"]


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    lo = None if low is None else f"{'>' if low_open else '>='} {low}"
    hi = None if high is None else f"{'<' if high_open else '<='} {high}"
    if lo and hi:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return lo or hi or ""


def check_int(field: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int; ValueError unless it is an integer (not a bool) in [low, high]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        what = " ".join(filter(None, ["an integer", _range(low, high)]))
        raise ValueError(f"{field} must be {what}, got {value!r}")
    return int(value)


def check_number(field: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float; ValueError unless it is a finite real number (not a bool) in the given range
    (low_open / high_open exclude the ends)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = " ".join(filter(None, ["a finite number", _range(low, high, low_open, high_open)]))
        raise ValueError(f"{field} must be {what}, got {value!r}")
    return float(value)


def check_fraction(field: str, value) -> float:
    """A number in [0, 1)."""
    return check_number(field, value, 0.0, 1.0, high_open=True)


def check_bool(field: str, value) -> bool:
    """ValueError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be True or False, got {value!r}")
    return value


def check_choice(field: str, value, choices) -> object:
    """ValueError unless `value` is one of `choices` (compared with ==, strings quoted in the message)."""
    choices = list(choices)
    if not any(value == c and type(value) is type(c) for c in choices):
        names = [repr(c) for c in choices]
        listed = " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)
        raise ValueError(f"{field} must be {listed}, got {value!r}")
    return value


def check_instance(field: str, value, cls: type | tuple[type, ...], what: str | None = None) -> object:
    """TypeError unless `value` is an instance of `cls`; `what` describes the class for the message."""
    if not isinstance(value, cls):
        name = what or (cls.__name__ if isinstance(cls, type) else " or ".join(c.__name__ for c in cls))
        raise TypeError(f"{field} must be a {name}, got {type(value).__name__}")
    return value
