"""The course's exercises, each with its expected value computed from the notebook's numbers.

An exercise cell passes the numbers its answer is made from (`bandwidth=bw`), never the formula
or the value, so a learner who has not worked it out cannot read it off the cell. Keys are
"NN.name", NN the notebook. `helpers.exercises` holds the checking (hints, tolerances, units).
"""

from __future__ import annotations

from helpers.exercises import answer, derive, exercise, investigate, predict

__all__ = ["answer", "derive", "investigate", "predict"]

# --- 00 · your machine ---------------------------------------------------------------------


@exercise(
    "00.bf16-floor",
    "compute",
    "SmolLM2-135M's decode floor in bf16 at batch 1 (ms per token)",
    rtol=0.05,
    tolerance_why="arithmetic on the notebook's own numbers: only rounding differs",
    hint="the bytes one step reads in bf16 (how many bytes per parameter?) ÷ the read "
    "bandwidth, in milliseconds",
)
def _bf16_floor_ms(params, bandwidth):
    return params * 2 / bandwidth * 1e3


@exercise(
    "00.critical-batch",
    "derive",
    "critical_batch(peak_flops, bandwidth, bytes_per_weight): the batch at which decode reaches "
    "the ridge point",
    rtol=1e-6,
    tolerance_why="a formula: exact",
    hint="one decode step does 2 FLOPs per weight per sequence and reads each weight once; "
    "set its FLOP per byte equal to peak ÷ bandwidth and solve for the batch",
    cases=(
        dict(peak_flops=989e12, bandwidth=3.35e12, bytes_per_weight=2),  # H100 SXM, bf16
        dict(peak_flops=65e12, bandwidth=300e9, bytes_per_weight=2),  # T4, fp16
        dict(peak_flops=312e12, bandwidth=2.0e12, bytes_per_weight=1),  # A100, int8 weights
        dict(peak_flops=250e9, bandwidth=20e9, bytes_per_weight=4),  # a 2-core CPU, fp32
    ),
)
def _critical_batch(peak_flops, bandwidth, bytes_per_weight):
    return peak_flops / bandwidth * bytes_per_weight / 2


@exercise(
    "00.matmuls-batch-4",
    "predict",
    "every weight product of one decode step at batch 4 (ms)",
    rtol=0.25,
    tolerance_why="±25 %, the accuracy the course asks of its planner, or the run's spread",
    hint="four rows share each read of the weights: bandwidth-bound, the time stays near batch "
    "1's; section 6's skinny-product rates say what four rows cost in arithmetic",
    unit="ms",
)
def _matmuls_batch_4_ms(measured):
    return measured


@exercise(
    "00.per-layer-cost",
    "investigate",
    "the cost one layer adds to an eager decode step, from tiny models you built",
    hint="",
)
def _per_layer_cost(result, notebook_slope_s):
    """A result {"layers": [...], "step_s": [...], "per_layer_s": x} measured by the learner."""
    layers, steps = list(result.get("layers", [])), list(result.get("step_s", []))
    if len(set(layers)) < 3 or max(layers) - min(layers) < 10:
        return "measure at least three layer counts spanning 10 layers or more"
    if len(layers) != len(steps):
        return "give one step time per layer count"
    n = len(layers)
    mean_l, mean_s = sum(layers) / n, sum(steps) / n
    slope = sum((x - mean_l) * (y - mean_s) for x, y in zip(layers, steps, strict=True)) / sum(
        (x - mean_l) ** 2 for x in layers
    )
    stated = result.get("per_layer_s")
    if stated is None or abs(stated - slope) > 0.1 * abs(slope):
        return "per_layer_s should be the slope of your step times against the layer count"
    if not 0.5 <= slope / notebook_slope_s <= 2:
        return (
            f"your slope is {slope / notebook_slope_s:.1f}× the notebook's own fit: were the "
            "cores busy, or did one measurement include a warm-up?"
        )
    return ""


# --- 01 · quantization ----------------------------------------------------------------


# --- 02 · memory and buffers ----------------------------------------------------------


# --- 03 · tensor parallelism ----------------------------------------------------------


# --- 04 · latency vs throughput -------------------------------------------------------


# --- 05 · serving under load ----------------------------------------------------------


# --- 06 · a real server ---------------------------------------------------------------
