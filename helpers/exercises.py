"""Code-checked exercise answers."""

from __future__ import annotations

import math
import numbers

# Bytes in one of each unit a learner may state: SI (powers of 10) and binary (powers of 2).
BYTE_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}  # fmt: skip


def _expected_in(expected, unit: str | None, expected_unit: str | None) -> float:
    """The expected value for an answer given in `unit`: the entry of a {unit: value} dict, or
    `expected` (in `expected_unit`) converted to `unit`; unchanged when no unit is stated."""
    if isinstance(expected, dict):
        if unit not in expected:
            raise ValueError(f"state the unit of your answer: unit= one of {sorted(expected)}")
        return expected[unit]
    if unit is None or expected_unit is None or unit == expected_unit:
        return expected
    for u in (unit, expected_unit):
        if u not in BYTE_UNITS:
            raise ValueError(f"unknown unit {u!r}: use one of {', '.join(BYTE_UNITS)}")
    return expected * BYTE_UNITS[expected_unit] / BYTE_UNITS[unit]


def check(
    question: str,
    answer: float | None,
    expected: float | dict[str, float],
    rtol: float = 0.05,
    unit: str | None = None,
    expected_unit: str | None = None,
    unit_of: str = "the question's figure",
) -> bool:
    """Compare a learner's numeric answer with the expected value, within a relative tolerance.

    A learner may state the unit of `answer` (`unit="GB"` or `"GiB"`, any of `BYTE_UNITS`):
    `expected`, given in `expected_unit`, is then converted to it, so a right answer in either
    unit counts. Where the unit changes the answer itself (a budget of "80 GB" read as GiB fits
    a different batch), give `expected` as {unit: value}, one per reading, and name what the
    unit belongs to in `unit_of` (e.g. "the budget"): the answer itself is then unitless."""
    if answer is None:
        print(f"⏳ {question}: not answered yet (replace None with your answer)")
        return False
    answer = _number(question, answer, unit)
    target = _expected_in(expected, unit, expected_unit)
    if isinstance(expected, dict):  # the unit is how the question was read, not the answer's
        stated = f" (with {unit_of} read as {unit})"
    else:
        stated = f" {unit}" if unit else ""
    ok = math.isclose(answer, target, rel_tol=rtol)
    mark = "✅ correct" if ok else f"❌ not yet: expected about {target:.4g}{stated}"
    print(f"{mark} — {question}: you gave {answer:.4g}{stated}")
    return ok


def _number(question: str, answer, unit: str | None) -> float:
    """The answer as a float: a plain number, or a one-element array or tensor (`.item()`)."""
    size = answer.numel() if hasattr(answer, "numel") else getattr(answer, "size", None)
    if size == 1 and hasattr(answer, "item"):  # a NumPy or torch scalar in an array
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        how = f"in {unit}" if unit else "with its unit given as unit=..., e.g. unit='GB'"
        raise TypeError(
            f"{question}: the answer must be one number ({how}), got {type(answer).__name__} "
            f"{answer!r:.60}"
        )
    return float(answer)
