"""The steps of `memory_search.search_frontier`, each on its own (CPU), and the gathering module."""

import math

import pytest
import torch

from helpers import memory, memory_readings, memory_search, memory_timing


def test_memory_gathers_the_same_objects_its_modules_define():
    for module in (memory_readings, memory_search, memory_timing):
        for name in [n for n in memory.__all__ if hasattr(module, n)]:
            assert getattr(memory, name) is getattr(module, name), name
    assert set(memory.__all__) == {n for n in dir(memory) if not n.startswith("_")} - {
        "annotations"
    }


def test_formula_batch_is_the_largest_batch_the_formula_fits():
    def need(batch, context):
        return batch * context

    assert memory_search.formula_batch(need, 10, budget=95, limit=100) == 9
    assert memory_search.formula_batch(need, 10, budget=5, limit=100) == 0  # not even one
    assert memory_search.formula_batch(need, 1, budget=10**6, limit=64) == 64  # the limit


def test_a_trial_far_over_the_budget_is_not_run():
    ran = []
    trial = memory_search.budget_trial(
        lambda b, c: ran.append(b), lambda b, c: b * 100, 100, torch.device("cpu"), {}
    )
    with pytest.raises(memory.BudgetExceeded, match="not run"):
        trial(2, 1)  # the formula says 200 bytes: over 1.5 × the budget
    assert ran == []


def test_a_cpu_trial_over_its_budget_raises_and_records_its_peak():
    measured = {}
    trial = memory_search.budget_trial(
        lambda b, c: torch.ones(b * 2**20), lambda b, c: 0, 2**20, torch.device("cpu"), measured
    )
    with pytest.raises(memory.BudgetExceeded, match="> budget"):
        trial(8, 3)  # 32 MiB of ones against a 1 MiB budget
    assert measured[8, 3] > 2**20


def test_no_cap_on_a_cpu_and_a_row_without_a_fit_has_no_bytes():
    with memory_search.capped_to_budget(torch.device("cpu"), 1):
        pass  # nothing to set or lift
    nothing = memory.SearchResult(0, [(1, False)])
    row = memory_search.frontier_row(64, 0, nothing, lambda b, c: b * c, {})
    assert row["found"] == 0 and row["tries"] == 1
    assert math.isnan(row["need_predicted"]) and math.isnan(row["need_measured"])
    assert memory_search.how_the_budget_is_enforced(torch.device("cuda")).startswith("a hard cap")
