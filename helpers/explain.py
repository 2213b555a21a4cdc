"""Prose written from a run's numbers: the sentences that state an outcome, chosen by it.

A notebook's markdown states no result; where a sentence compares or concludes, a function here
writes it from the numbers the run measured, worded by the same rule its verdict uses (stated in
the text). The tests run these functions on the stored measurements of several CPUs
(`data/measured/cpu_decode_gap.csv`), so the text is checked on machines the author never saw.
Notebook 06's sentences about a real server are in `helpers.explain_server`.
"""

from __future__ import annotations

from collections.abc import Mapping

from helpers import verdicts

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


# --- Notebook 04: batching, precision, the frontier and the planner -------------------------

KNEE = 1.5  # the knee: the first batch whose step passes 1.5× the smallest batch's
WITHIN = 0.25  # the planner's accuracy the course asks for: ±25 %


def batch_or_past(batch: int | None, last: int) -> str:
    """A batch a rule found, or '> last' when it found none up to the last batch tried."""
    return f"> {last}" if batch is None else f"{batch}"


def knee_in_sweep(knee: int | None, first_batch: int) -> str:
    """Where TPOT first passed `KNEE`× its value at the sweep's first batch, if it did."""
    if knee is None:
        return f"TPOT stayed within {KNEE}× of batch {first_batch} over the whole sweep"
    return f"TPOT first exceeds {KNEE}× its batch-{first_batch} value at batch **{knee}**"


def knee_predictor(miss: Mapping[str, float]) -> str:
    """Which knee prediction ("ridge point" or "skinny roof") the measured knee followed more
    closely, `miss` holding each one's |log2(predicted ÷ measured knee)|, and what that says."""
    closer = min(miss, key=miss.get)
    head = (
        f"This machine follows the **{closer}** prediction more closely (a factor "
        f"{2 ** miss[closer]:.1f} from the measured knee, against {2 ** max(miss.values()):.1f}): "
    )
    if closer == "skinny roof":
        return head + (
            "the products' measured rate, not the peak, decides where batching stops being "
            "free here."
        )
    return head + (
        "the products reach close to the peak rate soon enough that the ridge point decides here."
    )


def precision_outcome(
    other: str, base: str, note: str, step_ratio: float, peak_ratio: float, smaller: str
) -> str:
    """Why `other`'s steps took `step_ratio`× `base`'s: emulated (its `note` from notebook 00's
    ceilings says so), or computed natively, where the format with fewer bytes (`smaller`) paid
    off when its steps were the faster ones. `peak_ratio`: base's matmul peak ÷ other's."""
    if note.startswith("emulated"):
        return (
            f"{other} is emulated (converted and computed in a wider format) on this machine: "
            f"its steps cost up to {peak_ratio:.1f}× more compute, which the halved bytes cannot "
            "repay, and the rows are kept as a measurement of that emulation."
        )
    head = (
        f"both formats are computed natively here, and {other}'s steps took a median "
        f"{step_ratio:.2f}× {base}'s: "
    )
    if (step_ratio < 1) == (smaller == other):
        return head + f"{smaller}'s fewer bytes paid off."
    return head + (
        f"{smaller}'s fewer bytes did not pay off: a decode step's skinny products are set by how "
        "fast their kernels stream weights, which the square-matmul peak does not measure."
    )


def slower_of(base: str, other: str, step_ratio: float) -> str:
    """The precision whose steps took longer, `step_ratio` being other's step ÷ base's."""
    return base if step_ratio < 1 else other


def fp8_here(fp8_cores: bool) -> str:
    """Why this run's frontier has no fp8 point."""
    if fp8_cores:
        return (
            "this GPU has fp8 tensor cores, but the course has no fp8 linear layer to measure yet."  # noqa: E501
        )
    return (
        "not on this frontier: no fp8 matmul units on this device (fp8 tensor cores need a GPU "
        "of compute capability 8.9+)."
    )


def frontier_knobs(pairs: int) -> str:
    """What the number of precision × engine pairs on the frontier says about the knobs."""
    if pairs > 1:
        return f"{pairs} precision × engine pairs sit on this machine's frontier, so a knob other than batch moves it."  # noqa: E501
    return f"{pairs} precision × engine pair sits on this machine's frontier, so here batch alone picks the operating point."  # noqa: E501


def calibration_physical(efficiency: float, overhead_s: float, shortest_step_s: float) -> str:
    """Whether a calibrated engine is physical: an efficiency at most 1× the measured bandwidth
    and an overhead below the shortest measured step; else which of the two it broke."""
    broken = []
    if efficiency > 1:
        broken.append(f"an efficiency of {efficiency:.2f}× the measured bandwidth")
    if overhead_s >= shortest_step_s:
        broken.append(
            f"an overhead of {overhead_s * 1e3:.1f} ms, above the shortest measured step "
            f"({shortest_step_s * 1e3:.1f} ms)"
        )
    if not broken:
        return "The fit is physical."
    return f"**The fit is not physical** ({' and '.join(broken)}): the timings are too noisy to calibrate on."  # noqa: E501


def planner_direction(median_error: float) -> str:
    """A planner's median error (predicted ÷ measured − 1) in words."""
    return "too fast" if median_error < 0 else "too slow"


def published_misses(labels: list[str]) -> str:
    """The published rows predicted outside ±`WITHIN`, listed, or that there are none."""
    if not labels:
        return f"No row is missed by more than {WITHIN:.0%}."
    return "Misses: " + "; ".join(labels) + "."


def check_rows_missed(missed: list[str], lowest: str, share: float) -> str:
    """The check rows' misses and the format whose implied matmul rate is the lowest share of
    the rate the planner assumes (`lowest`, `share`), or that no check row missed."""
    if not missed:
        return f"No check row is missed by more than {WITHIN:.0%}."
    return (
        f"The misses are {', '.join(missed)}; the lowest share of the assumed matmul rate that "
        f"published first tokens imply is {lowest}'s {share:.0%}: the rate the planner assumes "
        "for that format is what it models poorly there."
    )


# --- Notebook 05: the course's serving engine under load --------------------------------------


def latency_knees(knees: Mapping[str, float | None], capacity: float, last_load: float) -> str:
    """Where each policy's median latency first passed 2× its light-load value: `knees` holds the
    offered rate (requests/s) where it did, or None where it did not up to `last_load` (a share
    of `capacity`); each is said as a share of capacity."""
    where = []
    for policy, rate in knees.items():
        if rate:
            where.append(f"{policy} at {rate / capacity:.0%} of capacity")
        else:
            where.append(f"{policy}: none up to {last_load:.0%}")
    return f"Knee (median latency > 2× its light-load value): {', '.join(where)}."


def int8_cache(
    decision,
    peak: Mapping[str | None, int],
    predicted: Mapping[str | None, int],
    token_agreement: float,
    same_answers: int,
    answers: int,
    dtype_name: str,
) -> str:
    """The sentence after the verdict 'an int8 paged cache runs ≥ 1.5× the requests at once':
    `peak` and `predicted` hold the peak running requests measured and predicted, keyed None
    (the model's dtype, `dtype_name`) and "int8"; then the answers' quality, `token_agreement`
    (a share of tokens) and `same_answers` identical of `answers`."""
    ratio = peak["int8"] / peak[None]
    counts = (
        f"{peak['int8']} against {peak[None]}; predicted {predicted['int8']} and {predicted[None]}"
    )
    ran = verdicts.say(
        decision,
        holds=f"With int8 keys and values **{ratio:.1f}×** as many requests ran at once in the "
        f"same memory ({counts}).",
        fails=f"int8 ran only {ratio:.1f}× as many at once ({counts}): section 11 diagnoses it.",
    )
    return ran + (
        f" **Quality:** {token_agreement:.1%} of the generated tokens equal the {dtype_name} "
        f"cache's, position by position, and {same_answers} of {answers} answers are identical "
        "(greedy decoding: after its first changed token an answer goes its own way). Notebook "
        "02 measured the int8 cache's perplexity over 1,024 tokens, and timed what this path "
        "pays: each step dequantizes the slots it reads, so the cache is smaller, the step no "
        "cheaper."
    )
