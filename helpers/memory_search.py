"""What fits: an out-of-memory-safe search. A trial says "does not fit" by raising (a GPU's
`torch.OutOfMemoryError`, `MemoryError`, or `BudgetExceeded`, the CPU's stand-in for one);
`largest_fitting` finds the largest size that fits, and `search_frontier` the largest batch at
each context, beside what the formula predicts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from helpers import checks
from helpers.device import as_device
from helpers.memory_readings import peak_added_bytes, release_freed_memory
from helpers.shapes import format_bytes

OVERSHOOT = 1.5  # a trial the formula puts above 1.5 × the budget is not run at all


class BudgetExceeded(MemoryError):
    """A trial used more memory than the budget the caller set (the CPU's stand-in for OOM)."""


def fits(trial: Callable[[int], object], n: int) -> bool:
    """Run `trial(n)`; False if it ran out of memory (GPU OOM, MemoryError, BudgetExceeded).

    A trial says "does not fit" by raising, never by its return value (what it returns when it
    fits is ignored): one that returns False is refused, since the search would read it as a fit."""
    try:
        result = trial(n)
        if isinstance(result, bool | np.bool_) and not result:
            raise TypeError(
                f"trial({n}) returned {result!r}: a trial signals 'does not fit' by raising "
                "(MemoryError, memory.BudgetExceeded or torch.OutOfMemoryError) and returns "
                "nothing when it fits"
            )
        return True
    except (torch.OutOfMemoryError, MemoryError):
        return False  # the exception (and the frames holding its tensors) is dropped here
    finally:
        release_freed_memory()


@dataclass
class SearchResult:
    largest: int  # 0 when even the smallest size does not fit
    tried: list[tuple[int, bool]]  # every size tried, in order, and whether it fit


def largest_fitting(
    trial: Callable[[int], object], start: int = 1, limit: int = 2**16, guess: int | None = None
):
    """The largest n in [start, limit] for which `trial(n)` fits, assuming bigger never fits
    better: doubling from `start` until the first failure, then bisection between the last fit
    and it. With a `guess` (e.g. a formula's prediction) the search starts there and steps away
    from it by 1, 2, 4 … until it brackets the answer, then bisects: a right guess costs two
    trials (the guess fits, one more does not), a wrong one a few more."""
    if not callable(trial):
        raise TypeError(f"trial must be a function of the size n, got {trial!r}")
    start = checks.whole("start", start)
    limit = checks.whole("limit", limit)
    if limit < start:
        raise ValueError(f"limit ({limit}) is below start ({start}): pass limit ≥ start")
    tried: list[tuple[int, bool]] = []

    def attempt(n: int) -> bool:
        ok = fits(trial, n)
        tried.append((n, ok))
        return ok

    n = start if guess is None else min(max(guess, start), limit)
    good, bad = (n, None) if attempt(n) else (None, n)
    distance = 1
    while good is None and guess is not None and bad > start:  # the guess failed: step down
        n = max(bad - distance, start)
        good, bad = (n, bad) if attempt(n) else (None, n)
        distance *= 2
    if good is None:
        return SearchResult(0, tried)
    distance = 1
    while bad is None and good < limit:  # step up (doubling without a guess) until one fails
        n = min(good * 2 if guess is None else good + distance, limit)
        good, bad = (n, None) if attempt(n) else (good, n)
        distance *= 2
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if attempt(mid) else (good, mid)
    return SearchResult(good, tried)


# --- What fits, predicted and searched ------------------------------------------------------


def search_frontier(
    request: Callable[[int, int], object],
    need: Callable[[int, int], float],
    contexts: list[int],
    budget: int,
    device: torch.device | str = "cpu",
    limit: int = 4096,
) -> pd.DataFrame:
    """For each context: the largest batch the formula `need(batch, context)` (bytes beyond the
    loaded model) fits in `budget`, and the largest `request(batch, context)` really runs in it.

    A GPU trial runs with this process capped at what it holds + `budget`, so it meets a real
    `torch.OutOfMemoryError`; a CPU trial fails when its measured peak exceeds the budget
    (`BudgetExceeded`). A trial predicted to need over 1.5 × the budget is not run at all. The
    search starts at the formula's batch (`largest_fitting(guess=...)`): two real trials when
    the formula is right, more where it is not; what it finds does not depend on the guess.
    Columns: context, predicted and found batch, tries, and for the found batch the predicted
    and measured bytes; `attrs["limit"]` says how the budget was enforced."""
    device = as_device(device)
    budget = checks.whole("budget", budget)
    measured: dict[tuple[int, int], int] = {}
    trial = budget_trial(request, need, budget, device, measured)
    with capped_to_budget(device, budget):
        rows = []
        for context in contexts:
            predicted = formula_batch(need, context, budget, limit)
            found = largest_fitting(
                lambda b, c=context: trial(b, c), limit=limit, guess=predicted or 1
            )
            rows.append(frontier_row(context, predicted, found, need, measured))
    frame = pd.DataFrame(rows)
    frame.attrs["limit"] = how_the_budget_is_enforced(device)
    return frame


def formula_batch(need: Callable[[int, int], float], context: int, budget: int, limit: int) -> int:
    """The largest batch up to `limit` whose formula need fits in `budget` (0 when none does)."""
    return max((b for b in range(1, limit + 1) if need(b, context) <= budget), default=0)


def budget_trial(request, need, budget: int, device: torch.device, measured: dict):
    """`trial(batch, context)` for `largest_fitting`: runs the request, records its measured peak
    in `measured`, and raises where it does not fit (on a GPU the cap raises by itself)."""

    def trial(batch: int, context: int) -> None:
        if need(batch, context) > OVERSHOOT * budget:
            raise BudgetExceeded("predicted to overshoot by far: not run")
        used = peak_added_bytes(lambda: request(batch, context), device)
        measured[batch, context] = used
        if device.type != "cuda" and used > budget:
            raise BudgetExceeded(f"{format_bytes(used)} > budget")

    return trial


@contextlib.contextmanager
def capped_to_budget(device: torch.device, budget: int):
    """Inside, on a GPU, this process may hold only what it holds now + `budget`, so a trial meets
    a real out-of-memory error; the cap is lifted afterwards. Elsewhere nothing changes."""
    if device.type != "cuda":
        yield
        return
    release_freed_memory()
    total = torch.cuda.get_device_properties(device).total_memory
    held = torch.cuda.memory_reserved(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + budget) / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def frontier_row(context: int, predicted: int, found: SearchResult, need, measured: dict) -> dict:
    """One context's row: the formula's batch, the batch found, and the found batch's bytes."""
    best = (found.largest, context)
    return {
        "context": context,
        "predicted": predicted,
        "found": found.largest,
        "tries": len(found.tried),
        "need_predicted": need(*best) if found.largest else float("nan"),
        "need_measured": measured.get(best, float("nan")),
    }


def how_the_budget_is_enforced(device: torch.device) -> str:
    if device.type == "cuda":
        return "a hard cap on this process (real out-of-memory errors)"
    return (
        "a budget: this process's resident memory is not capped, so a trial fails when its "
        "measured peak exceeds the budget"
    )
