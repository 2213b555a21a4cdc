"""Exercises of notebooks 03–06 (many devices and many requests: tensor parallelism, latency
against throughput, serving, a real server), each with its expected value computed from the
notebook's numbers; `helpers.workbook` gathers them."""

from __future__ import annotations

import dataclasses

from helpers import deploy, planner, serving, shapes
from helpers.exercises import exercise

# --- 03 · tensor parallelism ----------------------------------------------------------


@exercise(
    "03.bytes-per-token",
    "derive",
    "bytes_sent_per_token(model, tp, batch, bytes_per_value): the bytes each device sends in "
    "all-reduces per generated token (ring all-reduce)",
    rtol=1e-6,
    tolerance_why="a formula: exact",
    hint="two all-reduces per layer, each of batch × hidden × bytes per value; a ring all-reduce "
    "sends 2(p − 1)/p of its message per device; one device sends nothing",
    cases=(
        dict(model="llama-2-13b", tp=4, batch=1, bytes_per_value=2),
        dict(model="llama-3-70b", tp=8, batch=16, bytes_per_value=2),
        dict(model="llama-2-7b", tp=1, batch=8, bytes_per_value=2),
        dict(model="smollm2-135m", tp=3, batch=4, bytes_per_value=4),
    ),
)
def _bytes_sent_per_token(model, tp, batch, bytes_per_value):
    shape = shapes.Shape.of(model)
    message = batch * shape.hidden * bytes_per_value
    return 2 * shape.layers * shapes.allreduce_bus_bytes(message, tp)


@exercise(
    "03.comm-per-token",
    "compute",
    "the all-reduce time per generated token of Llama-2-13B at TP 2, fp16, batch 8, over this "
    "machine's link (ms)",
    rtol=0.02,
    tolerance_why="arithmetic on the notebook's own fit: only rounding differs",
    hint="two all-reduces per layer (Llama-2-13B: 40 layers, hidden 5120), each α + β·n with n "
    "the message in bytes (batch × hidden × 2), in milliseconds",
    unit="ms",
)
def _comm_per_token_ms(alpha, beta):
    message = 8 * 5120 * 2  # batch 8 × hidden × fp16
    return 2 * 40 * (alpha + beta * message) * 1e3


@exercise(
    "03.allreduce-new-size",
    "predict",
    "one all-reduce of Llama-2-13B's decode activations at batch 32 in fp32 between this "
    "machine's ranks (ms)",
    rtol=0.25,
    tolerance_why="±25 %, widened to this measurement's IQR or the fit's miss at section 3's "
    "sizes either side, whichever is larger",
    hint="the message is batch × hidden × 4 bytes; section 3's fit prices it as α + β·n",
    unit="ms",
)
def _allreduce_new_size_ms(measured):
    return measured


def _first_not_falling(degrees, times):
    for t, now, after in zip(degrees, times, times[1:], strict=False):
        if after >= now:
            return t
    return degrees[-1]


@exercise(
    "03.tpot-stops",
    "investigate",
    "where TPOT stops falling, for an all-reduce latency of your choice",
)
def _tpot_stops(result, gpu, workload, weight_bytes):
    """A result {"alpha_s", "per_rank_s", "tpot_ms": {degree: ms}, "stops_at", "t_star"}: the
    planner's batch-1 TPOT of `workload` on `gpu` with α(2) = alpha_s growing by per_rank_s a
    rank, the degree after which it no longer falls, and the formula's t*."""
    keys = {"alpha_s", "per_rank_s", "tpot_ms", "stops_at", "t_star"}
    if not isinstance(result, dict) or not keys <= set(result):
        return f"give a dict with {sorted(keys)}"
    degrees = sorted(result["tpot_ms"])
    if len(degrees) < 4 or degrees[0] != 1:
        return "measure at least four TP degrees, starting at 1"
    engine = dataclasses.replace(
        gpu.engine, allreduce_s=result["alpha_s"], allreduce_per_rank_s=result["per_rank_s"]
    )
    if (result["alpha_s"], result["per_rank_s"]) == (
        gpu.engine.allreduce_s,
        gpu.engine.allreduce_per_rank_s,
    ):
        return "that is the notebook's engine: change α or its growth per rank"
    spec = dataclasses.replace(gpu, engine=engine)
    for t in degrees:
        planned = planner.predict(**workload, gpu=spec, tp=t, batch=1).tpot_s * 1e3
        if abs(result["tpot_ms"][t] / planned - 1) > 0.02:
            return f"your TPOT at TP {t} is not the planner's for your α: rerun the table"
    times = [result["tpot_ms"][t] for t in degrees]
    if result["stops_at"] != _first_not_falling(degrees, times):
        return "stops_at should be the first degree of your table after which TPOT no longer falls"
    if not 1 < result["stops_at"] < degrees[-1]:
        return (
            "in your table TPOT does not stop falling past TP 1 and before your largest degree: "
            "choose a growth per rank that makes it stop inside your grid"
        )
    if not result["per_rank_s"] > 0:
        return "t* needs a growth per rank s > 0: with s = 0, α is paid once and TPOT falls on"
    bandwidth = gpu.bandwidth * gpu.engine.memory_efficiency
    layers = shapes.Shape.of(workload["model"]).layers
    star = (weight_bytes / (4 * layers * result["per_rank_s"] * bandwidth)) ** 0.5
    if abs(result["t_star"] / star - 1) > 0.05:
        return "t_star should be the formula's √(W ÷ (4·L·s·BW)) for your growth per rank s"
    return ""


# --- 04 · latency vs throughput -------------------------------------------------------


@exercise(
    "04.tpot-between",
    "predict",
    "TPOT at a batch the sweep skipped (ms per output token)",
    rtol=0.25,
    tolerance_why="±25 %, the accuracy the course asks of its planner, or the run's own spread "
    "when that is wider",
    hint="read the sweep's TPOT at the batches on either side and interpolate (on a log batch "
    "axis); past the knee the step grows with the rows, before it the weight reads set it",
    unit="ms",
)
def _tpot_between_ms(measured):
    return measured


_STEP_ARGS = ("params", "bytes_per_param", "batch", "bandwidth", "peak_flops", "overhead_s")


@exercise(
    "04.step-time",
    "derive",
    "decode_step_s(params, bytes_per_param, batch, bandwidth, peak_flops, overhead_s): one "
    "decode step on the roofline",
    rtol=1e-6,
    tolerance_why="a formula: exact",
    hint="a step reads every weight once (bytes ÷ bandwidth) and does 2 FLOPs per weight per "
    "sequence (FLOPs ÷ peak); on a roofline the two overlap, so the step takes the larger of "
    "them, plus the fixed overhead",
    cases=tuple(
        dict(zip(_STEP_ARGS, case, strict=True))
        for case in (
            (7e9, 2, 1, 3.35e12, 989e12, 2e-3),  # Llama-2-7B on an H100: bandwidth-bound
            (7e9, 2, 512, 3.35e12, 989e12, 2e-3),  # past the ridge: compute-bound
            (135e6, 4, 8, 20e9, 250e9, 5e-3),  # SmolLM2 on a 2-core CPU
            (8e9, 1, 64, 300e9, 65e12, 0.0),  # int8 weights on a T4
        )
    ),
)
def _decode_step_s(params, bytes_per_param, batch, bandwidth, peak_flops, overhead_s):
    return max(params * bytes_per_param / bandwidth, 2 * params * batch / peak_flops) + overhead_s


@exercise(
    "04.knee",
    "investigate",
    "the knee of a batch sweep you ran with another precision or another batch grid",
)
def _knee(result, notebook_dtype, notebook_batches, notebook_tpot_s):
    """result: {"dtype": name, "batches": [...], "tpot_s": [...], "knee": batch or None};
    `notebook_tpot_s`: the notebook's measured TPOT by batch ({batch: seconds})."""
    batches, tpots = list(result.get("batches", [])), list(result.get("tpot_s", []))
    if len(batches) != len(tpots) or len(batches) < 4:
        return "measure at least four batch sizes, one TPOT (seconds) per batch"
    if batches != sorted(set(batches)) or batches[-1] < 8 * batches[0]:
        return "give the batches in increasing order, spanning a factor of 8 or more"
    if result.get("dtype") == notebook_dtype and batches == list(notebook_batches):
        return "that is the notebook's own sweep: change the precision or the batch grid"
    knee = next((b for b, t in zip(batches, tpots, strict=True) if t > 1.5 * tpots[0]), None)
    if result.get("knee") != knee:
        return (
            "knee should be the first of your batches whose TPOT passes 1.5× your smallest "
            "batch's (None if none does), by the notebook's rule"
        )
    same = result.get("dtype") == notebook_dtype and batches[0] in notebook_tpot_s
    if same and not 1 / 3 <= tpots[0] / notebook_tpot_s[batches[0]] <= 3:
        return (
            "your smallest batch's TPOT is far from the notebook's at the same batch and "
            "precision: were the cores busy, or was the first step (warm-up) timed?"
        )
    return ""


@exercise(
    "04.h100-tpot",
    "compute",
    "Llama-3-8B fp16 on one H100 at batch 16, prompt 512, 128 new tokens (ms per output token)",
    rtol=0.02,
    tolerance_why="the planner's arithmetic written out: only rounding differs",
    hint="bytes: every weight but the input embedding (2 bytes each) plus the KV cache at the "
    "average context, ÷ the bandwidth × the engine's memory efficiency; FLOPs: 2 per weight "
    "per sequence plus attention, ÷ the peak; add them (the planner does not overlap them) and "
    "the engine's overhead for every layer, in ms",
    unit="ms",
)
def _h100_tpot_ms(model, gpu, dtype, batch, prompt_tokens, new_tokens):
    shape = dict(batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    return planner.predict(model=model, gpu=gpu, dtype=dtype, tp=1, **shape).tpot_s * 1e3


# --- 05 · serving under load ----------------------------------------------------------


@exercise(
    "05.blocks-held",
    "derive",
    "blocks_held(prompt, new_tokens, block_size): KV blocks a request holds when it finishes",
    rtol=1e-9,
    tolerance_why="a whole number: exact",
    hint="every token but the last generated one is fed back and needs a slot; round the slots "
    "up to whole blocks",
    cases=(
        dict(prompt=100, new_tokens=20, block_size=16),
        dict(prompt=16, new_tokens=1, block_size=16),
        dict(prompt=16, new_tokens=2, block_size=16),
        dict(prompt=1, new_tokens=1, block_size=1),
        dict(prompt=500, new_tokens=300, block_size=64),
    ),
)
def _blocks_held(prompt, new_tokens, block_size):
    return -(-(prompt + new_tokens - 1) // block_size)


@exercise(
    "05.throughput-below-capacity",
    "predict",
    "generated tokens/s of continuous batching at half its capacity (virtual clock)",
    rtol=0.1,
    tolerance_why="±10 %: a finite trace's mean answer differs from the sample's by a few %, and "
    "the run's last requests drain after the arrivals stop",
    hint="below capacity every request is served, so the engine's speed does not set the "
    "throughput: the arrivals do, times what each request generates on average (tokens/s)",
    unit="tokens/s",
)
def _throughput_below_capacity(measured):
    return measured


@exercise(
    "05.goodput",
    "derive",
    "goodput(ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, duration_s): vLLM bench's goodput",
    rtol=1e-9,
    tolerance_why="a count over a duration: exact",
    hint="count the requests that met both targets (≤ each), then divide by the run's duration "
    "in seconds: requests per second, not a share",
    cases=(
        dict(
            ttft_s=[0.1, 0.5, 2.0],
            tpot_s=[0.02, 0.02, 0.02],
            ttft_slo_s=1.0,
            tpot_slo_s=0.05,
            duration_s=4.0,
        ),
        dict(
            ttft_s=[0.1, 0.2, 0.3, 0.4],
            tpot_s=[0.01, 0.09, 0.01, 0.01],
            ttft_slo_s=0.35,
            tpot_slo_s=0.05,
            duration_s=2.0,
        ),
        dict(
            ttft_s=[1.0, 1.0], tpot_s=[0.05, 0.05], ttft_slo_s=1.0, tpot_slo_s=0.05, duration_s=10.0
        ),  # exactly at the targets: met
        dict(ttft_s=[3.0], tpot_s=[0.2], ttft_slo_s=1.0, tpot_slo_s=0.05, duration_s=1.0),
    ),
)
def _goodput(ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, duration_s):
    met = sum(a <= ttft_slo_s and b <= tpot_slo_s for a, b in zip(ttft_s, tpot_s, strict=True))
    return met / duration_s


def _trend(values) -> int:
    """+1 if the values only grow (ties allowed, some growth), −1 if they only fall, else 0."""
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    if all(s >= 0 for s in steps) and any(s > 0 for s in steps):
        return 1
    if all(s <= 0 for s in steps) and any(s < 0 for s in steps):
        return -1
    return 0


@exercise(
    "05.chunk-size",
    "investigate",
    "how the prefill chunk sets the worst gap a long prompt causes (virtual clock)",
)
def _chunk_size(result, requests, clock, max_batch):
    """result: {"chunks": [...], "worst_gap_s": [...], "long_ttft_s": [...],
    "gap_grows_with_chunk": bool, "ttft_falls_with_chunk": bool}: the notebook's `requests`
    (short ones, then the long prompt) served on the virtual `clock` with each chunk."""
    chunks = list(result.get("chunks", []))
    gaps, ttfts = list(result.get("worst_gap_s", [])), list(result.get("long_ttft_s", []))
    if len(set(chunks)) < 3 or not len(chunks) == len(gaps) == len(ttfts):
        return "try at least three chunk sizes, with one worst gap and one TTFT for each"
    if any(not isinstance(c, int) or c < 1 for c in chunks) or chunks != sorted(chunks):
        return "give whole chunk sizes in increasing order (leave out None: it is the prompt)"
    for chunk, gap, ttft in zip(chunks, gaps, ttfts, strict=True):
        df = serving.run(None, requests, max_batch=max_batch, prefill_chunk=chunk, clock=clock)
        want_gap, want_ttft = df.max_itl_s.iloc[:-1].max(), df.ttft_s.iloc[-1]
        if abs(gap - want_gap) > 0.02 * want_gap or abs(ttft - want_ttft) > 0.02 * want_ttft:
            return (
                f"your numbers for chunk {chunk} are not what the engine gives: the others' "
                "worst gap is the max of their max_itl_s, the TTFT the long request's ttft_s"
            )
    if result.get("gap_grows_with_chunk") != (_trend(gaps) > 0):
        return "look again at how the worst gap moves as the chunk grows, in your own numbers"
    if result.get("ttft_falls_with_chunk") != (_trend(ttfts) < 0):
        return "look again at how the long prompt's TTFT moves as the chunk grows"
    return ""


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
