"""Limits every JSON body obeys before any handler parses it: nesting depth, digits per integer, finite
numbers, no ``NaN`` / ``Infinity`` literals. Python's own parser would otherwise recurse until a
RecursionError, build 4,000-digit integers, or accept ``1e999`` as infinity."""

from __future__ import annotations

import json
import math

MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 40


class JSONLimitError(ValueError):
    """The body breaks a limit; the message names it."""


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise JSONLimitError(
            f"an integer of {len(text.lstrip('-'))} digits exceeds the limit of {MAX_INTEGER_DIGITS} digits"
        )
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else text[:24] + "…"
        raise JSONLimitError(f"the number {shown} is outside the float64 range")
    return value


def _constant(name: str) -> float:
    raise JSONLimitError(f"{name} is not a JSON number; send finite numbers only")


def check_json(body: bytes) -> None:
    """Raise :class:`JSONLimitError` naming the first limit ``body`` breaks (or why it is not JSON)."""
    try:
        data = json.loads(body, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise JSONLimitError(f"the JSON body is nested deeper than the limit of {MAX_DEPTH} levels") from None
    except JSONLimitError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise JSONLimitError(f"the request body is not valid JSON ({str(exc)[:120]})") from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise JSONLimitError(f"the JSON body is nested deeper than the limit of {MAX_DEPTH} levels")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
