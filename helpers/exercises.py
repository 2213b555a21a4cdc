"""Code-checked exercise answers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

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
        how = f"in {unit}" if unit else "in the unit the question names"
        raise TypeError(
            f"{question}: the answer must be one number ({how}), got {type(answer).__name__} "
            f"{answer!r:.60}"
        )
    return float(answer)


# --- Exercises whose answers the notebook does not show (issue 19) --------------------------
# An exercise is registered here with the function that computes its expected value from the
# notebook's own numbers (passed as keywords), so an exercise cell names its inputs, never the
# formula or the value. A wrong answer gets a hint (which quantity, which unit, which direction),
# never the answer.


@dataclass(frozen=True)
class Exercise:
    """One exercise: `kind` is "compute" (a number from this run), "predict" (a prediction
    written before a cell measures it), "derive" (a function checked on cases the learner does
    not see) or "investigate" (a knob turned, checked by a property of the learner's result)."""

    key: str
    kind: str
    question: str
    rtol: float
    tolerance_why: str
    hint: str
    expected: Callable
    unit: str | None = None
    cases: tuple = field(default=())


BANK: dict[str, Exercise] = {}
KINDS = ("compute", "predict", "derive", "investigate")


def exercise(key, kind, question, rtol=0.05, tolerance_why="", hint="", unit=None, cases=()):
    """Register the decorated function as exercise `key`'s expected value (or, for "derive",
    its reference function; for "investigate", the property: it returns "" when the learner's
    result has it, else a hint)."""
    if kind not in KINDS:
        raise ValueError(f"exercise kind {kind!r}: use one of {KINDS}")

    def register(expected):
        BANK[key] = Exercise(key, kind, question, rtol, tolerance_why, hint, expected, unit, cases)
        return expected

    return register


def _lookup(key: str, kind: str) -> Exercise:
    if key not in BANK:
        raise KeyError(f"no exercise {key!r}: the course has {', '.join(sorted(BANK)) or 'none'}")
    ex = BANK[key]
    if ex.kind != kind:
        raise ValueError(f"exercise {key!r} is a {ex.kind!r} exercise: call exercises.{ex.kind}")
    return ex


def _direction(answer: float, target: float) -> str:
    """Which way an answer is off, and whether the factor looks like a unit or a factor of 2."""
    if target == 0 or answer == 0 or (answer < 0) != (target < 0):
        return "check the sign and the quantity"
    ratio = abs(answer / target)
    way = "too large" if ratio > 1 else "too small"
    r = max(ratio, 1 / ratio)
    for factor, why in (
        (1e3, "a unit prefix (k, M, G, m, µ)?"),
        (1e6, "a unit prefix?"),
        (1e9, "a unit prefix?"),
        (2**30 / 1e9, "GB against GiB?"),
        (8.0, "bits against bytes?"),
        (2.0, "a factor of 2: FLOPs per MAC, or bytes per value?"),
        (4.0, "bytes per value?"),
    ):
        if math.isclose(r, factor, rel_tol=0.03):
            return f"{way} by a round factor: {why}"
    return way


def _within(value: float, target: float, rtol: float) -> bool:
    """Within `rtol` of the target, relative to the target (not to the larger of the two)."""
    return abs(value - target) <= rtol * abs(target)


def _verdict(ex: Exercise, answer, target: float, unit: str | None, rtol: float) -> bool:
    """Print the outcome of a numeric exercise (never the target) and return whether it passed."""
    if answer is None:
        print(f"⏳ {ex.question}: not answered yet (replace None with your answer)")
        return False
    value = _number(ex.question, answer, unit)
    if unit is not None and ex.unit is not None and unit != ex.unit:
        target = _expected_in(target, unit, ex.unit)
    ok = bool(_within(value, target, rtol))  # a plain bool, not NumPy's, when a cell shows it
    if ok:
        print(f"✅ correct — {ex.question}: you gave {value:.4g} (within {rtol:.0%})")
    else:
        print(
            f"❌ not yet — {ex.question}: you gave {value:.4g}, {_direction(value, target)}. "
            f"Hint: {ex.hint}"
        )
    return ok


def answer(key: str, value, unit: str | None = None, **given) -> bool:
    """Check a "compute" exercise: `given` are the notebook's numbers the answer is made from."""
    ex = _lookup(key, "compute")
    return _verdict(ex, value, float(ex.expected(**given)), unit or ex.unit, ex.rtol)


def predict(key: str, prediction, measured: float, spread: float = 0.0, **given) -> bool:
    """Check a prediction written before the measurement: it passes when it is within the
    exercise's tolerance of this run's `measured` value, widened to the measurement's own
    relative spread (`spread`, e.g. IQR ÷ median) when that is larger. The measured value is
    shown after the check: it is the lesson, and the cell above printed it anyway."""
    ex = _lookup(key, "predict")
    if not math.isfinite(measured) or measured <= 0:
        raise ValueError(f"{ex.question}: the measurement is {measured}; rerun the cell above")
    target = float(ex.expected(measured=measured, **given))
    rtol = max(ex.rtol, spread)
    ok = _verdict(ex, prediction, target, ex.unit, rtol)
    if prediction is not None:
        print(
            f"   measured here: {target:.4g}{' ' + ex.unit if ex.unit else ''}; tolerance "
            f"{rtol:.0%} ({ex.tolerance_why})"
        )
    return ok


def derive(key: str, fn) -> bool:
    """Check a learner's function on the exercise's cases (inputs shown on a miss, not outputs)."""
    ex = _lookup(key, "derive")
    if fn is None:
        print(f"⏳ {ex.question}: not written yet (define the function and pass it)")
        return False
    if not callable(fn):
        raise TypeError(f"{ex.question}: pass the function itself (no parentheses), got {fn!r:.40}")
    for case in ex.cases:
        try:
            got = fn(**case)
            if got is None:
                print(f"⏳ {ex.question}: not written yet (your function returns None)")
                return False
            got = float(got)
        except Exception as err:  # the learner's code: report, do not crash the notebook
            print(f"❌ not yet — {ex.question}: your function raised {err!r:.80} on {case}")
            return False
        want = float(ex.expected(**case))
        if not _within(got, want, ex.rtol):
            print(
                f"❌ not yet — {ex.question}: on {case} it returned {got:.4g}, "
                f"{_direction(got, want)}. Hint: {ex.hint}"
            )
            return False
    print(f"✅ correct — {ex.question}: right on all {len(ex.cases)} hidden cases")
    return True


def investigate(key: str, result, **given) -> bool:
    """Check an investigation by a property of the learner's `result`."""
    ex = _lookup(key, "investigate")
    if result is None:
        print(f"⏳ {ex.question}: not done yet (replace None with your result)")
        return False
    problem = ex.expected(result, **given)
    if problem:
        print(f"❌ not yet — {ex.question}: {problem}")
        return False
    print(f"✅ correct — {ex.question}")
    return True
