"""The course's exercises, each with its expected value computed from the notebook's numbers.

An exercise cell passes the numbers its answer is made from (`bandwidth=bw`), never the formula
or the value, so a learner who has not worked it out cannot read it off the cell. Keys are
"NN.name", NN the notebook. `helpers.exercises` holds the checking (hints, tolerances, units).
"""

from __future__ import annotations

from helpers import deploy
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


def _blocks_per_request(prompt_tokens, output_tokens, block):
    return -(-(prompt_tokens + output_tokens) // block)  # whole blocks, rounded up


@exercise(
    "06.max-concurrency",
    "derive",
    "max_concurrency(kv_tokens, prompt_tokens, output_tokens, block): requests a paged KV cache "
    "of kv_tokens holds at once, each at its full length",
    rtol=1e-9,
    tolerance_why="a count of whole requests: exact",
    hint="a request at full length holds whole blocks (round its tokens up to blocks); the cache "
    "holds whole blocks (round down); then how many whole requests fit",
    cases=(
        dict(kv_tokens=23_296, prompt_tokens=192, output_tokens=24, block=128),
        dict(kv_tokens=23_296, prompt_tokens=100, output_tokens=20, block=16),
        dict(kv_tokens=643_232, prompt_tokens=4000, output_tokens=1000, block=16),
        dict(kv_tokens=1_000, prompt_tokens=2_000, output_tokens=10, block=16),
    ),
)
def _max_concurrency(kv_tokens, prompt_tokens, output_tokens, block):
    return kv_tokens // block // _blocks_per_request(prompt_tokens, output_tokens, block)


@exercise(
    "06.client-path",
    "compute",
    "the path in front of the engine at concurrency 1: client TTFT − server TTFT (ms)",
    rtol=0.02,
    tolerance_why="arithmetic on the notebook's own table: only rounding differs",
    hint="both are means over the same window in section 3's table, in seconds there; the "
    "difference in milliseconds",
    unit="ms",
)
def _client_path_ms(client_ttft_s, server_ttft_s):
    return (client_ttft_s - server_ttft_s) * 1e3


@exercise(
    "06.closed-loop-rps",
    "compute",
    "requests per second a closed loop completes at the highest concurrency, from its "
    "concurrency and its mean latency (Little's law)",
    rtol=0.02,
    tolerance_why="arithmetic on the notebook's own numbers: only rounding differs",
    hint="in a closed loop the requests in flight equal the concurrency; Little's law relates "
    "them to the completion rate and the time each spends in the system",
)
def _closed_loop_rps(concurrency, latency_s):
    return concurrency / latency_s


@exercise(
    "06.capped-tpot",
    "predict",
    "TPOT p50 of the course's engine capped at 2 sequences, on section 7's trace (ms)",
    rtol=0.3,
    tolerance_why="±30 %: a live timing on a 2-core machine that other programs may share, "
    "predicted from another run's step log",
    hint="with at most 2 sequences a step decodes 1 or 2 of them: read what such steps cost in "
    "section 7's step log (ours_df.attrs['steps'], step_s by decode_seqs), in milliseconds",
    unit="ms",
)
def _capped_tpot_ms(measured):
    return measured


@exercise(
    "06.batch-cap",
    "investigate",
    "the smallest --max-num-seqs that keeps the simulated TTFT p99 at 2× load within 1.5× of "
    "the uncapped server's",
)
def _batch_cap(result, trace, clock, kv_blocks, budget, uncapped):
    """A result {"ttft_p99_s": {cap: seconds}, "smallest": cap}: the simulator's TTFT p99 on
    `trace` at each cap (at least three, one below 8), and the smallest cap within 1.5× of the
    `uncapped` run's."""
    if not isinstance(result, dict) or not {"ttft_p99_s", "smallest"} <= set(result):
        return 'give a dict {"ttft_p99_s": {cap: seconds}, "smallest": cap}'
    caps = sorted(result["ttft_p99_s"])
    if len(caps) < 3 or caps[0] >= 8:
        return "simulate at least three caps, one of them below 8"
    for cap in caps:
        s = deploy.simulate(
            trace, clock, kv_blocks, max_num_seqs=cap, max_num_batched_tokens=budget
        )
        if abs(result["ttft_p99_s"][cap] / s.ttft_p99_s - 1) > 1e-6:
            return f"your TTFT p99 at cap {cap} is not the simulator's: rerun it with that cap"
    within = [c for c in caps if result["ttft_p99_s"][c] <= 1.5 * uncapped]
    if not within:
        return "none of your caps is within 1.5× of the uncapped TTFT p99: try larger caps"
    if result["smallest"] != within[0]:
        return "smallest should be the smallest of your caps within 1.5× of the uncapped p99"
    if caps.index(within[0]) == 0:
        return "your smallest cap already passes: add a smaller cap to show where it stops"
    return ""
