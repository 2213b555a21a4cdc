"""Claim → evidence → rule → verdict tables, with the verdict computed from this run's numbers.

Each rule function takes numbers and returns a `Decision`: the verdict and the rule that decided
it, threshold included, so no verdict is a fixed string. `table(rows)` shows every row in full
(wrapped, never truncated) in the notebook and in nbconvert's HTML. A notebook's last cell:

    rows = [
        verdicts.row("Batch-1 decode is memory-bound", f"intensity {i:.2f} vs ridge {r:.0f} FLOP/B",
                     verdicts.at_most("intensity", i, r, "FLOP/B")),
        verdicts.row("TP 2 lowers latency", f"{tp2:.1f} vs {tp1:.1f} ms",
                     verdicts.compare("TP 2", tp2, (q1_2, q3_2), "TP 1", tp1, (q1_1, q3_1))),
    ]
    verdicts.table(rows)
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pandas as pd

HOLDS = "holds"
FAILS = "does not hold"
NOISE = "within noise"
NOT_MEASURED = "not measured here"
COLUMNS = ["claim", "evidence (this run)", "rule", "verdict"]
# the rows travel in the output's metadata too, so a script can collect an executed notebook's
# verdicts (tools/gpu_notebooks.py) without parsing HTML
METADATA_KEY = "llm_serving_course/verdicts"
# Inline, so neither JupyterLab's nor nbconvert's stylesheet can clip, right-align or truncate.
_CELL_STYLE = "white-space:normal;text-align:left;vertical-align:top;padding:4px 8px"
_COLOURS = {HOLDS: "#d8f0d8", FAILS: "#f6d5d5", NOISE: "#ececec", NOT_MEASURED: "#ececec"}


class Decision(NamedTuple):
    verdict: str
    rule: str


def _g(x: float) -> str:
    """Three significant figures, without scientific notation for the numbers tables show."""
    if x is None:
        return "(not measured)"
    if x != x or abs(x) >= 1e7 or (x != 0 and abs(x) < 1e-4):
        return f"{x:.3g}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _missing(*values: float | None) -> bool:
    """None or NaN (of any float type: NaN is the one value unequal to itself)."""
    return any(v is None or v != v for v in values)


def _number(name: str, value) -> float | None:
    """`value` as a float, None for a missing one (None or NaN); a string, a bool, a list or
    inf is refused: a verdict is never made of something that is not a measurement."""
    if value is None:
        return None
    if isinstance(value, str | bytes | bool) or not hasattr(type(value), "__float__"):
        raise TypeError(f"{name} must be a number (or None when not measured), got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):  # e.g. an array of several values
        raise TypeError(f"{name} must be one number, got {value!r}: pass a single value") from None
    if math.isinf(value):
        raise ValueError(
            f"{name} is {value}: a measurement is finite (a division by zero upstream?)"
        )
    return None if value != value else value


def _spread(name: str, spread) -> tuple[float, float] | None:
    """A (low, high) pair of numbers, None if absent; NaN inside it counts as not measured."""
    if spread is None:
        return None
    if isinstance(spread, str | bytes | Mapping) or not hasattr(spread, "__len__"):
        raise TypeError(f"{name} must be a (low, high) pair such as (q1, q3), got {spread!r}")
    if len(spread) != 2:
        raise ValueError(f"{name} must be a (low, high) pair such as (q1, q3), got {spread!r}")
    lo, hi = (_number(name, v) for v in spread)
    if lo is None or hi is None:
        return (math.nan, math.nan)
    if lo > hi:
        raise ValueError(
            f"{name} is ({_g(lo)}, {_g(hi)}), high before low: pass (low, high), e.g. (q1, q3)"
        )
    return lo, hi


def _tolerance(rel_tol) -> float:
    value = _number("rel_tol", rel_tol)
    if value is None or value < 0:
        raise ValueError(f"rel_tol must be a fraction ≥ 0 such as 0.05, got {rel_tol!r}")
    return value


def compare(
    name_a: str,
    a: float,
    spread_a: tuple[float, float] | None,
    name_b: str,
    b: float,
    spread_b: tuple[float, float] | None,
    claim: str = "lower",
    rel_tol: float = 0.05,
) -> Decision:
    """Is `a` lower (claim='lower') or higher (claim='higher') than `b`?

    With a spread (e.g. the quartiles (q1, q3)) for either side, a difference whose ranges
    overlap is "within noise" (a side without a spread counts as a point). With no spread at all,
    a difference below `rel_tol` of the larger magnitude is "within noise".
    """
    if claim not in ("lower", "higher"):
        raise ValueError(f"claim must be 'lower' or 'higher', got {claim!r}")
    a, b = _number("a", a), _number("b", b)
    spread_a, spread_b = _spread("spread_a", spread_a), _spread("spread_b", spread_b)
    rel_tol = _tolerance(rel_tol)
    sign = "<" if claim == "lower" else ">"
    if _missing(a, b, *(spread_a or ()), *(spread_b or ())):
        return Decision(
            NOT_MEASURED, f"{name_a} {sign} {name_b} (a number or its spread is missing)"
        )
    if spread_a is None and spread_b is None:
        rule = (
            f"{name_a} {sign} {name_b} by more than {rel_tol:.0%} "
            f"(one number each, no spread: a smaller gap is within noise)"
        )
        noisy = abs(a - b) <= rel_tol * max(abs(a), abs(b))
    else:
        lo_a, hi_a = spread_a or (a, a)
        lo_b, hi_b = spread_b or (b, b)
        rule = (
            f"{name_a} {sign} {name_b}, their spreads [{_g(lo_a)}, {_g(hi_a)}] and "
            f"[{_g(lo_b)}, {_g(hi_b)}] apart (if they overlap: within noise)"
        )
        noisy = lo_a <= hi_b and lo_b <= hi_a
    if noisy:
        return Decision(NOISE, rule)
    return Decision(HOLDS if (a < b) == (claim == "lower") else FAILS, rule)


def at_most(name: str, value: float, limit: float, unit: str = "") -> Decision:
    """Does `value` stay at or below `limit`?"""
    value, limit = _number("value", value), _number("limit", limit)
    rule = f"{name} ≤ {_g(limit)}{' ' + unit if unit else ''}"
    if _missing(value, limit):
        return Decision(NOT_MEASURED, rule)
    return Decision(HOLDS if value <= limit else FAILS, rule)


def at_least(name: str, value: float, limit: float, unit: str = "") -> Decision:
    """Does `value` reach at least `limit`?"""
    value, limit = _number("value", value), _number("limit", limit)
    rule = f"{name} ≥ {_g(limit)}{' ' + unit if unit else ''}"
    if _missing(value, limit):
        return Decision(NOT_MEASURED, rule)
    return Decision(HOLDS if value >= limit else FAILS, rule)


def close_to(name: str, value: float, target: float, rel_tol: float) -> Decision:
    """Is `value` within `rel_tol` of `target` (a prediction checked against a measurement)?

    A target of 0 has no ratio: only 0 itself is within a relative tolerance of it."""
    value, target, rel_tol = _number("value", value), _number("target", target), _tolerance(rel_tol)
    if target is None:
        return Decision(NOT_MEASURED, f"{name} within {rel_tol:.0%} of a target not measured")
    if target == 0:
        rule = f"{name} within {rel_tol:.0%} of 0 (a target of 0 has no ratio: only 0 is within it)"
        return Decision(NOT_MEASURED if value is None else HOLDS if value == 0 else FAILS, rule)
    band = f"[{1 - rel_tol:.2f}, {1 + rel_tol:.2f}]"
    rule = f"{name} within {rel_tol:.0%} of {_g(target)} (its ratio to it in {band})"
    if value is None:
        return Decision(NOT_MEASURED, rule)
    return Decision(HOLDS if abs(value / target - 1) <= rel_tol else FAILS, rule)


def monotonic(
    name: str, values: Sequence[float], decreasing: bool = True, rel_tol: float = 0.05
) -> Decision:
    """Does `values` fall (or rise) at every step? A step the other way smaller than `rel_tol`
    of the previous value is tolerated; a total change below `rel_tol` is "within noise"."""
    if isinstance(values, Mapping):
        raise TypeError(
            f"values is a {type(values).__name__} (monotonic would judge its keys): pass the "
            "values in order, e.g. [d[k] for k in sorted(d)]"
        )
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise TypeError(f"values must be a sequence of numbers, got {values!r}")
    rel_tol = _tolerance(rel_tol)
    way = "falls" if decreasing else "rises"
    rule = (
        f"{name} {way} at every step (a step back under {rel_tol:.0%} tolerated; "
        f"a total change under {rel_tol:.0%} is within noise)"
    )
    values = [_number(f"values[{i}]", v) for i, v in enumerate(values)]
    if len(values) < 2 or _missing(*values):
        return Decision(NOT_MEASURED, rule)
    sign = -1 if decreasing else 1
    first, last = values[0], values[-1]
    if abs(last - first) <= rel_tol * abs(first):
        return Decision(NOISE, rule)
    backwards = any(
        sign * (nxt - prev) < -rel_tol * abs(prev)
        for prev, nxt in zip(values, values[1:], strict=False)
    )
    return Decision(FAILS if backwards or sign * (last - first) < 0 else HOLDS, rule)


def _decision(decision) -> tuple[str, str]:
    """(verdict, rule) of a `Decision` or a 2-tuple of strings; anything else is named."""
    if (
        isinstance(decision, tuple)
        and len(decision) == 2
        and all(isinstance(x, str) for x in decision)
    ):
        return decision[0], decision[1]
    raise TypeError(
        f"decision must be a verdicts.Decision (from compare, at_most, …), got {decision!r}"
    )


def say(decision: Decision | tuple[str, str], **texts: str) -> str:
    """The sentence that follows `decision`'s verdict: prose never contradicts its own run.

    Give one text per verdict the decision can reach, as keywords `holds=`, `fails=`, `noise=`
    and `not_measured=` (missing ones fall back to `fails`, then to a sentence naming the
    verdict). The chosen text is formatted by the caller from this run's numbers:

        verdicts.say(decision, holds=f"{ratio:.2f}× the floor: bandwidth sets the step.",
                     fails=f"{ratio:.2f}× the floor: something else costs more (below).")
    """
    verdict, rule = _decision(decision)
    keys = {HOLDS: "holds", FAILS: "fails", NOISE: "noise", NOT_MEASURED: "not_measured"}
    unknown = set(texts) - set(keys.values())
    if unknown:
        raise TypeError(f"say() takes texts for {sorted(keys.values())}, not {sorted(unknown)}")
    text = texts.get(keys.get(verdict, ""))
    if text is None and verdict in (NOISE, NOT_MEASURED):
        return f"Verdict: {verdict} ({rule})."
    return text if text is not None else texts.get("fails", f"Verdict: {verdict} ({rule}).")


def ms(median_s: float, q1_s: float | None = None, q3_s: float | None = None) -> str:
    """Evidence text of a timing given in seconds: '12.3 ms (IQR 11.9–12.8)'."""
    median_s, q1_s, q3_s = (
        _number(n, v) for n, v in (("median_s", median_s), ("q1_s", q1_s), ("q3_s", q3_s))
    )
    if median_s is None:
        return "not measured"
    text = f"{_g(median_s * 1e3)} ms"
    if q1_s is not None and q3_s is not None:
        text += f" (IQR {_g(q1_s * 1e3)}–{_g(q3_s * 1e3)})"
    return text


def row(claim: str, evidence: str, decision: Decision | tuple[str, str]) -> dict[str, str]:
    """One table row: the claim, this run's numbers (formatted by the caller), rule and verdict."""
    for name, text in (("claim", claim), ("evidence", evidence)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be text (a str), got {text!r}: format the numbers first")
    verdict, rule = _decision(decision)
    return dict(zip(COLUMNS, (claim, evidence, rule, verdict), strict=True))


class VerdictTable:
    """A verdict table that shows every character: wrapped HTML in notebooks and nbconvert,
    wrapped plain text elsewhere. `frame` holds the rows as a DataFrame (for checks and CSV)."""

    def __init__(self, rows: Sequence[dict[str, str] | Sequence[str]]):
        if isinstance(rows, str | dict) or not hasattr(rows, "__iter__"):
            raise TypeError(f"rows must be a list of verdicts.row(...) rows, got {rows!r}")
        records = []
        for i, r in enumerate(rows):
            if isinstance(r, dict) and set(COLUMNS) <= set(r):
                records.append([r[c] for c in COLUMNS])
            elif isinstance(r, list | tuple) and len(r) == len(COLUMNS):
                records.append(list(r))
            else:
                raise ValueError(
                    f"rows[{i}] is {r!r}: each row needs {len(COLUMNS)} fields, "
                    f"{', '.join(COLUMNS)} (make it with verdicts.row)"
                )
        self.frame = pd.DataFrame(records, columns=COLUMNS)

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = {"text/html": self._repr_html_(), "text/plain": repr(self)}
        records = [{k: str(v) for k, v in r.items()} for r in self.frame.to_dict("records")]
        return data, {"text/html": {METADATA_KEY: records}}

    def _repr_html_(self) -> str:
        cell = _CELL_STYLE
        head = "".join(f'<th style="{cell}">{html.escape(c)}</th>' for c in COLUMNS)
        body = []
        for values in self.frame.itertuples(index=False):
            tds = []
            for column, value in zip(COLUMNS, values, strict=True):
                style = cell
                if column == "verdict":
                    style += f";background:{_COLOURS.get(value, '#ffffff')};font-weight:bold"
                tds.append(f'<td style="{style}">{html.escape(str(value))}</td>')
            body.append(f"<tr>{''.join(tds)}</tr>")
        return (
            '<table class="verdicts" style="table-layout:auto;width:100%;max-width:none">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )

    def __repr__(self) -> str:
        lines = []
        for values in self.frame.itertuples(index=False):
            for column, value in zip(COLUMNS, values, strict=True):
                lines += textwrap.wrap(f"{column}: {value}", width=100, subsequent_indent="    ")
            lines.append("")
        return "\n".join(lines).rstrip()


def table(rows: Sequence[dict[str, str] | Sequence[str]]) -> VerdictTable:
    """Display `rows` (from `row`, or 4-tuples claim, evidence, rule, verdict) in full."""
    return VerdictTable(rows)
