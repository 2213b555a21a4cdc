"""Prose written from a run's numbers: the sentences that state an outcome, chosen by it.

A notebook's markdown states no result; where a sentence compares or concludes, a function here
writes it from the numbers the run measured, worded by the same rule its verdict uses (stated in
the text). The tests run these functions on the stored measurements of several CPUs
(`data/measured/cpu_decode_gap.csv`), so the text is checked on machines the author never saw.
"""

from __future__ import annotations

from collections.abc import Mapping

BOUND_BY_BYTES = 1.5  # a step within 1.5× its bandwidth floor counts as set by its bytes
SAME = 0.05  # two single timings closer than 5 % are not told apart


def floor_bandwidth(
    read_bandwidth: float, working_set_bandwidth: float, working_set: int, cache: int
) -> str:
    """Which read rate bounds one decode step on this machine, and why."""
    ratio = working_set_bandwidth / read_bandwidth
    size = f"One decode step reads {working_set / 1e6:,.0f} MB"
    if cache == 0:
        return f"{size}; this system does not report its cache sizes, so the floor uses the rate measured over that many bytes ({working_set_bandwidth / 1e9:.1f} GB/s)."  # noqa: E501
    times = working_set / cache
    where = (
        f"{times:.1f}× the {cache / 2**20:,.0f} MiB last-level cache, so it streams from memory"
        if times >= 2
        else f"only {times:.1f}× the {cache / 2**20:,.0f} MiB last-level cache, so part of it "
        "can stay in cache between steps"
    )
    rates = (
        f"reading that many bytes runs at {working_set_bandwidth / 1e9:.1f} GB/s, "
        f"{ratio:.2f}× the {read_bandwidth / 1e9:.1f} GB/s measured beyond the cache"
    )
    return f"{size}, {where}: {rates}. The floor below uses the rate for the step's own bytes."


def decode_gap(m: Mapping[str, float]) -> str:
    """The explanation of a batch-1 decode step against its floor.

    `m` holds seconds per token: `floor_s` (bytes ÷ the working-set read rate), `matmul_s`
    (every weight product alone), `loop_s` (the course's loop), `overhead_s` (the overhead probe
    at this many layers), `generate_s` (transformers' generate); and `read_bandwidth`
    (bytes/s) and `weight_bytes`."""
    floor, matmul, loop = m["floor_s"], m["matmul_s"], m["loop_s"]
    ratio, ms = loop / floor, 1e3
    rule = f"(rule: within {BOUND_BY_BYTES}× the floor counts as set by the bytes)"
    if ratio <= BOUND_BY_BYTES:
        head = f"The step takes **{ratio:.2f}× the floor** {rule}: its bytes set its time."
    else:
        head = f"The step takes **{ratio:.2f}× the floor** {rule}: its bytes do **not** set its time here."  # noqa: E501
    kernel, around = matmul - floor, loop - matmul
    achieved = m["weight_bytes"] / matmul / 1e9
    parts = (
        f" Of the {(loop - floor) * ms:.1f} ms above the floor, {kernel * ms:.1f} ms is the weight "
        f"products themselves reading at {achieved:.1f} GB/s instead of "
        f"{m['weight_bytes'] / floor / 1e9:.1f}, and "
        + (
            f"{around * ms:.1f} ms is everything around them"
            if around > 0
            else "the loop took no longer than the products alone (timed apart, so noise decides)"
        )
        + f" (the overhead probe predicts {m['overhead_s'] * ms:.1f} ms for the work around them)."
    )
    bigger = "the matrix-vector kernel" if kernel > around else "the work around the products"
    parts += f" The larger share is **{bigger}**; the profile below splits it by operation."
    text = head + parts + " " + versus_generate(loop, m["generate_s"], m.get("generate_how", ""))
    growing = m.get("generate_growing_s")
    if growing is not None and growing == growing:
        text += " " + versus_generate(loop, growing, "growing cache")
    return text


def versus_generate(loop_s: float, generate_s: float, how: str = "") -> str:
    name = f"`generate`{f' ({how})' if how else ''}"
    if generate_s != generate_s:  # NaN: not measured on that run
        return f"{name} was not timed on this run."
    ratio = generate_s / loop_s
    if abs(ratio - 1) <= SAME:
        verdict = f"the same time within {SAME:.0%}"
    else:
        verdict = f"{ratio:.2f}× the loop's time: it is {'slower' if ratio > 1 else 'faster'}"
    return f"{name} takes {verdict} per token."


def biggest_miss(parts) -> str:
    """The category of a step whose measured time exceeds its prediction by the most
    (`helpers.profile.compare` rows), in words."""
    gap = parts.measured_ms - parts.predicted_ms
    worst = parts.loc[gap.idxmax()]
    total = parts.measured_ms.sum()
    return (
        f"The profiled step takes {total:.1f} ms against {parts.predicted_ms.sum():.1f} ms "
        f"predicted. The biggest miss is **{worst.category}**: {worst.measured_ms:.1f} ms "
        f"measured vs {worst.predicted_ms:.1f} ms predicted, {gap.max():.1f} ms of the step."
    )
