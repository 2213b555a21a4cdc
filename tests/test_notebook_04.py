"""Notebook 04 writes the Pareto frontier itself; check it against the definition."""

import itertools

import pandas as pd

from tests.notebook_defs import definitions

nb = definitions("04_latency_vs_throughput")


def brute_force_front(points):
    """Rows that no other row beats: at most the latency and at least the throughput, one strictly
    (an exact duplicate of an earlier row counts as beaten)."""
    keep = []
    for i, a in points.iterrows():
        beaten = any(
            (b.latency_s <= a.latency_s and b.tokens_per_s >= a.tokens_per_s)
            and ((b.latency_s, b.tokens_per_s) != (a.latency_s, a.tokens_per_s) or j < i)
            for j, b in points.iterrows()
            if j != i
        )
        if not beaten:
            keep.append(i)
    return set(keep)


def test_pareto_known_answer():
    points = pd.DataFrame(
        {"latency_s": [1.0, 2.0, 3.0, 2.5, 1.5], "tokens_per_s": [10.0, 30.0, 50.0, 20.0, 10.0]}
    )
    # (2.5, 20) is beaten by (2, 30); (1.5, 10) by (1, 10)
    assert set(nb.pareto(points).index) == {0, 1, 2}


def test_pareto_matches_the_definition_on_every_small_grid():
    values = [1.0, 2.0, 3.0]
    for combo in itertools.product(itertools.product(values, values), repeat=3):
        points = pd.DataFrame(combo, columns=["latency_s", "tokens_per_s"])
        assert set(nb.pareto(points).index) == brute_force_front(points), combo
