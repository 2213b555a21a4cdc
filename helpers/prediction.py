"""One configuration predicted: TTFT, TPOT, throughput and memory of a model on a GPU at a TP
degree, batch and precision (`predict`), the largest batch that fits a memory or latency limit,
a serving engine's step time, and a GPU refitted to a measured sweep (`calibrate`).
`helpers.planner` gathers these with the search over configurations and the published checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from helpers import checks
from helpers.shapes import (
    KV_DTYPES,
    VALUE_BYTES,
    WEIGHT_BYTES,
    Shape,
    check_tp_degree,
    kv_value_bytes,
    serving_memory,
)
from helpers.stepcost import (
    DTYPES,
    FORMATS,
    GPUSpec,
    StepTime,
    check_runs,
    gpu_spec,
    square_flops,
    step_time,
)

# Memory a runtime keeps for itself on each GPU (CUDA context, workspaces).
RUNTIME_RESERVE_BYTES = 1.5e9
# The largest batch `largest_batch` tries: past it a model is not memory- or latency-limited.
MAX_BATCH = 2**20

# --- Public predictions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    latency_s: float
    tokens_per_s: float
    memory_per_gpu_bytes: float
    fits: bool
    bound: str  # what limits a decode step: "memory", "compute", "overhead" or "communication"
    reason: str = ""
    decode: StepTime | None = None  # the decode step's limits and parts


def resolve(model, gpu) -> tuple[Shape, GPUSpec]:
    if isinstance(model, str):
        model = model.strip().lower()  # names are labels: "Llama-2-7B" is "llama-2-7b"
    try:
        shape = Shape.of(model)  # a name, a transformers config or a dict; errors name the choices
    except ValueError as err:
        raise ValueError(f"model {model!r}: {err}") from None
    if isinstance(gpu, GPUSpec):
        for part in ("flops", "bandwidth"):
            checks.positive(f"gpu.{part}", getattr(gpu, part))
        checks.positive("gpu.memory", gpu.memory, allow_zero=True)
        return shape, gpu
    return shape, gpu_spec(gpu)


def checked(model, gpu, dtype, tp, kv_dtype=None) -> tuple[Shape, GPUSpec, str, int, str | None]:
    """The checks every public prediction applies: model, GPU, a dtype it runs, a KV format, a
    TP degree that splits the model and that the GPU can talk at."""
    dtype = checks.choice("dtype", dtype, DTYPES)
    if kv_dtype is not None:
        kv_dtype = checks.choice("kv_dtype", kv_dtype, KV_DTYPES)
    tp = checks.whole("tp", tp)
    shape, spec = resolve(model, gpu)
    check_tp_degree(tp, heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate)
    check_runs(spec, dtype)
    if tp > 1 and not spec.link_bandwidth:
        raise ValueError(
            f"tp={tp} needs a link between devices, and gpu {spec.name!r} has none (a machine "
            "measured here is one device): use tp=1, or give it one with "
            "dataclasses.replace(spec, link_bandwidth=bytes_per_s)"
        )
    return shape, spec, dtype, tp, kv_dtype


def _memory(shape, spec, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype) -> float:
    """Bytes per GPU: weights, KV cache, activations and the runtime's reserve."""
    weights_format = FORMATS[dtype][0]
    act = VALUE_BYTES[weights_format]
    kv = None if kv_dtype is None else kv_value_bytes(kv_dtype, shape.head_dim)
    parts = serving_memory(
        shape,
        batch,
        prompt_tokens + new_tokens,
        WEIGHT_BYTES[weights_format],
        act,
        tp,
        prompt_tokens,
        kv_bytes=kv,
    )
    reserve = RUNTIME_RESERVE_BYTES * (spec.memory > 0)
    return parts["weights"] + parts["kv_cache"] + parts["activations"] + reserve


def _predict(shape, spec, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype) -> Prediction:
    """`predict` on checked arguments."""
    prefill = step_time(shape, spec, dtype, tp, batch, prompt_tokens, prompt_tokens, kv_dtype)
    decode = step_time(shape, spec, dtype, tp, batch, 1, prompt_tokens + new_tokens // 2, kv_dtype)
    ttft, tpot = prefill.total_s, decode.total_s
    latency = ttft + (new_tokens - 1) * tpot
    memory = _memory(shape, spec, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype)
    fits = spec.memory == 0 or memory <= spec.memory
    reason = (
        ""
        if fits
        else (
            f"needs {memory / 1e9:.1f} GB per GPU, {spec.name} has {spec.memory / 1e9:.0f} GB: "
            "raise tp, lower batch or context, quantize the weights or the KV cache (kv_dtype)"
        )
    )
    return Prediction(
        ttft_s=ttft,
        tpot_s=tpot,
        latency_s=latency,
        tokens_per_s=batch * new_tokens / latency,
        memory_per_gpu_bytes=memory,
        fits=fits,
        bound=decode.bound,
        reason=reason,
        decode=decode,
    )


def predict(
    *,
    model="llama-2-7b",
    gpu="a100-80gb-sxm",
    dtype="fp16",
    tp=1,
    batch=1,
    prompt_tokens=128,
    new_tokens=128,
    kv_dtype=None,
) -> Prediction:
    """Latency, throughput and memory of serving `batch` requests; see the module docstring.

    `gpu`: a name from `data/published_hardware.csv` (run by the `compiled` engine), or a
    `GPUSpec` (`planner.gpu_spec(name, engine)`, `spec_from_ceilings(...)`, `calibrate(...)`).
    `kv_dtype`: the KV cache's format (None: the activations' 16 or 32 bits)."""
    shape, spec, dtype, tp, kv_dtype = checked(model, gpu, dtype, tp, kv_dtype)
    batch = checks.whole("batch", batch)
    prompt_tokens = checks.whole("prompt_tokens", prompt_tokens)
    new_tokens = checks.whole("new_tokens", new_tokens)
    return _predict(shape, spec, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype)


def largest_batch(
    *,
    model,
    gpu,
    dtype="fp16",
    tp=1,
    prompt_tokens=128,
    new_tokens=128,
    kv_dtype=None,
    tpot_budget_ms=None,
) -> tuple[int, str]:
    """The largest batch that fits the GPU's memory and keeps TPOT within `tpot_budget_ms`
    (None: no budget), and what stops it there: "memory" or "latency target" (0 when not even
    batch 1 does). Both grow with the batch, so a doubling then a bisection finds it."""
    shape, spec, dtype, tp, kv_dtype = checked(model, gpu, dtype, tp, kv_dtype)
    prompt_tokens = checks.whole("prompt_tokens", prompt_tokens)
    new_tokens = checks.whole("new_tokens", new_tokens)
    if tpot_budget_ms is not None:
        checks.positive("tpot_budget_ms", tpot_budget_ms)
    if spec.memory == 0 and tpot_budget_ms is None:
        raise ValueError(
            f"gpu {spec.name!r} has no memory size (memory=0), so only a latency target can stop "
            "the batch: give tpot_budget_ms, or spec_from_ceilings(..., memory_bytes=...)"
        )

    def stopped(batch: int) -> str:
        p = _predict(shape, spec, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype)
        if not p.fits:
            return "memory"
        over = tpot_budget_ms is not None and p.tpot_s * 1e3 > tpot_budget_ms
        return "latency target" if over else ""

    if stopped(1):
        return 0, stopped(1)
    low, high = 1, 2
    while high <= MAX_BATCH and not stopped(high):
        low, high = high, 2 * high
    if high > MAX_BATCH:
        return low, "the planner's largest batch"
    while high - low > 1:  # stopped(low) is "", stopped(high) is not
        mid = (low + high) // 2
        low, high = (mid, high) if not stopped(mid) else (low, mid)
    return low, stopped(high)


def step_seconds(
    *, model, gpu, dtype: str, tp: int = 1, batch: int, tokens: int, context: int, kv_dtype=None
) -> float:
    """Predicted seconds of one forward pass: `batch` sequences, `tokens` new tokens each,
    attending to `context` positions (a serving engine's step-time model)."""
    shape, spec, dtype, tp, kv_dtype = checked(model, gpu, dtype, tp, kv_dtype)
    batch = checks.whole("batch", batch)
    tokens = checks.whole("tokens", tokens)
    context = checks.whole("context", context, minimum=0)
    return step_time(shape, spec, dtype, tp, batch, tokens, context, kv_dtype).total_s


def step_seconds_function(*, model, gpu, dtype: str, tp: int = 1, kv_dtype=None):
    """`step_seconds` with model, GPU, dtype and TP checked once: a function
    (batch, tokens, context) -> seconds for a loop that calls it at every step."""
    shape, spec, dtype, tp, kv_dtype = checked(model, gpu, dtype, tp, kv_dtype)

    def seconds(batch: int, tokens: int, context: int) -> float:
        return step_time(shape, spec, dtype, tp, batch, tokens, context, kv_dtype).total_s

    return seconds


def calibrate(measured, *, model, gpu, dtype: str) -> GPUSpec:
    """`gpu` refitted to a measured sweep: TPOT ≈ overhead + slope × (first-principles time).

    `measured`: rows with `batch`, `prompt`, `new_tokens` and the measured `tpot_s`. The
    intercept becomes the engine's per-step overhead and the slope divides its efficiency."""
    shape, spec, dtype, _, _ = checked(model, gpu, dtype, 1)
    rows = _measured_rows(measured)
    ideal = dataclasses.replace(
        spec, engine=dataclasses.replace(spec.engine, step_s=0.0, layer_s=0.0)
    )
    x = [
        step_time(
            shape, ideal, dtype, 1, int(r.batch), 1, int(r.prompt) + int(r.new_tokens) // 2
        ).total_s
        for r in rows.itertuples()
    ]
    if len(set(x)) < 2:
        raise ValueError(
            f"the {len(rows)} measured rows all predict the same work (batch, prompt and "
            "new_tokens alike): measure at least two batch sizes"
        )
    slope, intercept = np.polyfit(x, rows.tpot_s.to_numpy(), 1)
    if slope <= 0:
        raise ValueError(
            "the measured times do not grow with the predicted work: measure a wider range of "
            "batches"
        )
    engine = dataclasses.replace(
        spec.engine,
        name=f"{spec.engine.name}, calibrated",
        step_s=max(intercept, 0.0),
        layer_s=0.0,
        memory_efficiency=spec.engine.memory_efficiency / slope,
    )
    rates = {m: r / slope for m, r in spec.linear_flops.items()}
    return dataclasses.replace(
        spec,
        engine=engine,
        linear_flops=rates,
        flops=spec.flops / slope,
        fp32_flops=square_flops(spec, "fp32") / slope,
        fp8_flops=spec.fp8_flops / slope if spec.fp8_flops else None,
    )


_MEASURED_COLUMNS = ("batch", "prompt", "new_tokens", "tpot_s")


def _measured_rows(measured) -> pd.DataFrame:
    """calibrate's rows, each checked: whole counts and a finite, positive time (row named)."""
    if isinstance(measured, str) or not hasattr(measured, "__iter__"):
        raise TypeError(
            f"measured must be rows (a DataFrame or a list of dicts) with {list(_MEASURED_COLUMNS)}"
            f", got {measured!r}"
        )
    rows = pd.DataFrame(measured)
    missing = [c for c in _MEASURED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(
            f"measured lacks the column(s) {missing}: each row needs {list(_MEASURED_COLUMNS)}"
        )
    if len(rows) < 2:
        raise ValueError("calibrate needs at least two measured rows (e.g. two batch sizes)")
    for i, r in enumerate(rows.itertuples()):
        at = f"measured row {i} (batch {r.batch})"
        for column in ("batch", "prompt", "new_tokens"):
            checks.whole(f"{at} {column}", getattr(r, column))
        t = r.tpot_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"{at} has tpot_s={t!r}: a time must be finite and > 0 (a batch that ran out of "
                "memory?): drop that row, e.g. measured[measured.tpot_s.notna()]"
            )
    return rows
