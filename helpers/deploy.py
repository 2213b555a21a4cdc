"""From the planner to a deployment: a serving run predicted on a GPU, and the `vllm serve`
command that realises a configuration.

    from helpers import deploy
    deploy.serve(model="llama-3-8b", gpu="h100-sxm", dtype="bf16", tp=1,
                 input_tokens=512, output_tokens=128, concurrency=16, engine="vllm")
    # TTFT / ITL / TPOT / latency p50 and p99, output tokens/s and requests/s

`serve` runs the course's scheduler (`helpers.serving`, vLLM v1's step: running requests first,
chunked prefill within `max_num_batched_tokens`, a paged KV cache sized from the GPU's memory)
on a virtual clock: each step priced by the planner (`stepmodel.planner_step_time`) on the GPU run
by an engine preset (`planner.engines()`: `vllm` carries a per-step host cost derived from a
published vLLM benchmark, `vllm-0.5` the one vLLM's own profile of v0.5.3 implies). A closed loop
(`concurrency`) keeps that many requests in flight, each sent when one finishes (as `vllm bench
serve --max-concurrency`, AIPerf and GuideLLM do), so its TTFT counts from the send; `rate` sends
Poisson arrivals instead, whose TTFT includes the queue.

`versus_published()` predicts every published serving row (`data/published_serving_runs.csv`,
`role=check`: not used to derive any constant) beside its value. `vllm_serve_command` writes a
planner configuration as vLLM's flags (vLLM ≥ 0.10 names), with what changes past one node.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import torch

from helpers import checks, planner, serving
from helpers.engines import published_serving_runs
from helpers.shapes import Shape, kv_cache_bytes, kv_value_bytes
from helpers.stepcost import FORMATS
from helpers.stepmodel import planner_step_time

# vLLM's batch defaults for its OpenAI server (vllm/engine/arg_utils.py, get_batch_defaults,
# vLLM 0.32): (--max-num-seqs, --max-num-batched-tokens) by the GPU's memory; chunked prefill is
# always on in V1. A100s keep the smaller pair (a larger token budget cut their throughput).
VLLM_BATCH_DEFAULTS = {
    "160 GB and more": (1024, 16384),
    "70 GB and more": (1024, 8192),
    "other": (256, 2048),
    "cpu": (128, 2048),
}
BLOCK_SIZE = 16
GPU_MEMORY_UTILIZATION = 0.9
CLOSED_LOOP_ROUNDS = 4  # requests per seat a closed loop sends (the first round ramps up)


def vllm_batch_defaults(spec) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) vLLM's server picks on this GPU."""
    if spec.memory >= 160 * 2**30:
        return VLLM_BATCH_DEFAULTS["160 GB and more"]
    if spec.memory >= 70 * 2**30 and "a100" not in spec.name:
        return VLLM_BATCH_DEFAULTS["70 GB and more"]
    return VLLM_BATCH_DEFAULTS["other"]


def kv_blocks(model, gpu, dtype: str, tp: int, kv_dtype=None, utilization=GPU_MEMORY_UTILIZATION):
    """KV-cache blocks one GPU holds: utilization × memory − its share of the weights − the
    runtime's reserve, ÷ the bytes of a block (its share of the heads: the cache splits by TP)."""
    shape, spec = Shape.of(model), planner.gpu_spec(gpu) if isinstance(gpu, str) else gpu
    weights = shape.params * planner.WEIGHT_BYTES[FORMATS[dtype][0]] / tp
    value = planner.VALUE_BYTES[FORMATS[dtype][0]]
    per_value = value if kv_dtype is None else kv_value_bytes(kv_dtype, shape.head_dim)
    block = kv_cache_bytes(shape, 1, BLOCK_SIZE, per_value) / tp
    free = spec.memory * utilization - weights - planner.RUNTIME_RESERVE_BYTES
    if free < block:
        raise ValueError(
            f"{shape.params / 1e9:.1f}B parameters in {dtype} at tp={tp} leave no room for a KV "
            f"cache on {spec.name} ({spec.memory / 1e9:.0f} GB): raise tp or quantize the weights"
        )
    return int(free // block)


def _requests(input_tokens, output_tokens, n, rate, seed) -> list[serving.Request]:
    arrivals = (
        np.zeros(n)
        if rate is None
        else np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
    )
    prompt = torch.zeros(input_tokens, dtype=torch.long)  # no model: only the length counts
    return [serving.Request(prompt, output_tokens, float(a), output_tokens) for a in arrivals]


def _from_send(df: pd.DataFrame) -> pd.DataFrame:
    """A closed loop sends a request when a seat frees: time it from its admission."""
    df = df.copy()
    df["arrival_s"] = df.admitted_s
    metrics = [serving.request_metrics(t, a) for t, a in zip(df.token_s, df.arrival_s, strict=True)]
    for column in ("ttft_s", "tpot_s", "max_itl_s", "latency_s"):
        df[column] = [m[column] for m in metrics]
    return df


def simulate(
    requests,
    clock,
    kv_blocks: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    concurrency: int | None = None,
    block_size: int = BLOCK_SIZE,
) -> pd.Series:
    """The course's scheduler serving `requests` as vLLM's does (running requests first,
    chunked prefill within `max_num_batched_tokens`, at most `max_num_seqs` at once) on the
    virtual `clock(step) -> seconds`. `concurrency`: a client's closed loop of that many in
    flight (every request ready at once; each timed from when it is sent, i.e. admitted);
    None: the requests' own arrival times, queueing included. p50 / p99 and means."""
    if concurrency is not None and concurrency > max_num_seqs:
        raise ValueError(
            f"a closed loop of {concurrency} beyond max_num_seqs={max_num_seqs} waits in the "
            "server's queue: give the requests arrival times instead (concurrency=None)"
        )
    seats = max_num_seqs if concurrency is None else concurrency
    df = serving.run(
        None,
        requests,
        max_batch=seats,
        block_size=block_size,
        kv_blocks=kv_blocks,
        prefill_chunk=max_num_batched_tokens,
        clock=clock,
    )
    if concurrency is not None:
        df = _from_send(df)
    s = serving.summary(df, percentiles=(50, 99))
    ok = df[df.error == ""]
    means = {f"{m}_mean_s": float(ok[f"{m}_s"].mean()) for m in ("ttft", "tpot", "latency")}
    return pd.Series({**s, **means, "max_num_seqs": seats, "kv_blocks": kv_blocks})


def serve(
    *,
    model,
    gpu,
    dtype: str,
    tp: int = 1,
    input_tokens: int,
    output_tokens: int,
    concurrency: int | None = None,
    rate: float | None = None,
    engine: str = "vllm",
    kv_dtype=None,
    requests: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    seed: int = 0,
) -> pd.Series:
    """A serving run predicted: `concurrency` requests kept in flight, or Poisson arrivals at
    `rate` per second (one of them), each `input_tokens` in and `output_tokens` out, on `tp`
    GPUs run by `engine`. Returns TTFT / ITL / TPOT / latency p50 and p99 and mean (s), output
    tokens/s and requests/s, and the batch cap and cache it ran with (see the module docstring).
    `max_num_seqs` / `max_num_batched_tokens` None: vLLM's defaults on that GPU."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give one of concurrency= (a closed loop) or rate= (Poisson arrivals)")
    input_tokens = checks.whole("input_tokens", input_tokens)
    output_tokens = checks.whole("output_tokens", output_tokens)
    spec = planner.gpu_spec(gpu, engine) if isinstance(gpu, str) else gpu
    seqs_default, chunk_default = vllm_batch_defaults(spec)
    max_num_seqs = checks.whole("max_num_seqs", max_num_seqs or seqs_default)
    chunk = checks.whole("max_num_batched_tokens", max_num_batched_tokens or chunk_default)
    clock = planner_step_time(model, spec, dtype, tp)  # checks model, dtype and tp
    seats = max_num_seqs
    if concurrency is not None:
        seats = checks.whole("concurrency", concurrency)
    else:
        rate = checks.positive("rate", rate)
    n = checks.whole("requests", requests) if requests else CLOSED_LOOP_ROUNDS * seats + 4
    blocks = kv_blocks(model, spec, dtype, tp, kv_dtype)
    trace = _requests(input_tokens, output_tokens, n, rate, seed)
    s = simulate(trace, clock, blocks, max_num_seqs, chunk, concurrency=concurrency)
    return pd.concat([s, pd.Series({"engine": engine})])


# Published metrics and the prediction in the same unit (genai-perf / AIPerf's "ITL" is the mean
# gap after the first token: TPOT; throughput counts output tokens).
_UNITS = {
    "ttft_ms": lambda s: s.ttft_mean_s * 1e3,
    "itl_ms": lambda s: s.tpot_mean_s * 1e3,
    "tokens_per_s": lambda s: s.tokens_per_s,
    "latency_ms": lambda s: s.latency_mean_s * 1e3,
}


@functools.cache
def _predicted(model, gpu, dtype, tp, kv, inp, out, conc, engine) -> pd.Series:
    return serve(
        model=model,
        gpu=gpu,
        dtype=dtype,
        tp=tp,
        input_tokens=inp,
        output_tokens=out,
        concurrency=conc,
        engine=engine,
        kv_dtype=kv,
    )


def versus_published(roles=("check",)) -> pd.DataFrame:
    """Every published serving row of `roles` beside `serve`'s prediction, with the error."""
    roles = checks.names("roles", roles, ("check", "calibration"))
    t = published_serving_runs()
    rows = []
    for r in t[t.role.isin(roles) & t.metric.isin(list(_UNITS))].itertuples():
        kv = r.kv_dtype if isinstance(r.kv_dtype, str) else None
        args = (r.model, r.gpu, r.dtype, int(r.tp), kv, int(r.input_tokens))
        s = _predicted(*args, int(r.output_tokens), int(r.concurrency), r.engine)
        rows.append(
            {
                "source": r.source,
                "model": r.model,
                "gpu": r.gpu,
                "tp": int(r.tp),
                "dtype": r.dtype,
                "input": int(r.input_tokens),
                "output": int(r.output_tokens),
                "concurrency": int(r.concurrency),
                "metric": r.metric,
                "engine": r.engine,
                "published": r.value,
                "predicted": _UNITS[r.metric](s),
            }
        )
    out = pd.DataFrame(rows)
    return out.assign(error=out.predicted / out.published - 1)
