"""Input checks shared by every public entry point: one line per error, naming the fix.

Plain Python (no torch), so the torch-free layer (`shapes`, `planner`) can use them; the checks
of torch objects (a device, finite values) live in `helpers.device`.

Each check returns the cleaned value (an int, a float, a canonical name), so a caller
writes `batch = checks.whole("batch", batch)` and moves on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def whole(name: str, value, minimum: int = 1) -> int:
    """`value` as an int ≥ `minimum`; floats with a fraction, bools and strings are refused.

    NumPy integers (e.g. a value read from a DataFrame) count as whole numbers."""
    ok_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok_type:
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value, ok_type = int(value), True
    if not ok_type:
        raise TypeError(f"{name} must be a whole number, got {value!r}: pass e.g. {name}={minimum}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def positive(name: str, value, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (or ≥ 0 with `allow_zero`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'≥' if allow_zero else '>'} 0, got {value}")
    return float(value)


def choice(name: str, value, allowed: Iterable[str]) -> str:
    """The allowed label equal to `value` ignoring case and surrounding spaces ("A100" = "a100")."""
    allowed = list(allowed)
    if isinstance(value, str):
        by_key = {a.lower(): a for a in allowed}
        found = by_key.get(value.strip().lower())
        if found is not None:
            return found
    raise ValueError(f"Unknown {name} {value!r}; use one of {sorted(allowed)}")


def names(name: str, values, allowed: Iterable[str]) -> tuple[str, ...]:
    """A collection of labels; a lone string is refused (it would be iterated letter by letter)."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of names, e.g. {name}=({values!r},), not a string")
    if isinstance(values, dict) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of names, got {values!r}")
    out = tuple(choice(name, v, allowed) for v in values)
    if not out:
        raise ValueError(f"{name} is empty: give at least one of {sorted(allowed)}")
    return out
