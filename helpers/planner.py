"""Predict serving latency, throughput and memory from first principles — three limits.

    from helpers import planner
    p = planner.predict(model="llama-2-7b", gpu="a100-80gb-sxm", dtype="fp16", tp=2, batch=4,
                        prompt_tokens=128, new_tokens=20)
    p.ttft_s, p.tpot_s, p.latency_s, p.tokens_per_s, p.memory_per_gpu_bytes, p.fits, p.bound

One forward pass (a decode step, or the prefill) costs

    weight matmuls: weight bytes ÷ bandwidth, FLOPs ÷ FLOP/s                ← bandwidth, compute
  + attention:      KV bytes ÷ bandwidth, attention FLOPs ÷ FLOP/s
  + dequantize:     widening weight-only formats to 16 bits (per weight)
  + overhead:       step cost + layers × per-layer cost                    ← the third limit
  + communication:  2 all-reduces per layer under TP, each α(tp) + bus bytes ÷ link bandwidth

`step_time` returns the *limits* (what each roof alone would take) apart from the *parts* (what
the step is made of; they add up to it), and the limit that binds it (`StepTime.bound`).

Bandwidth and FLOP/s come from datasheets (`data/published_hardware.csv`) or from this machine's
measured ceilings; the overhead, α and the efficiency of the kernels are properties of the
*engine* that runs the model, so a GPU is always modelled together with an `OverheadPreset`
(`helpers.engines`: `eager`, `compiled`, `production`, and the serving engines `vllm-0.5`
and `vllm` with a per-step host cost, each derived from cited measurements); `deploy.serve`
runs the serving scheduler on these steps.

Precisions (`DTYPES`): fp32, fp16, bf16; the weight-only formats int8, int4 and fp8 (e4m3 weights
widened to 16 bits, W8A16: any GPU in the table, as vLLM's FP8 Marlin kernels run it); and
fp8-w8a8 (weights and matmul inputs in fp8: only GPUs with fp8 tensor cores). `kv_dtype` sets
the KV cache's format (fp16, bf16, fp32, fp8, int8) apart from the weights'.
"""

from __future__ import annotations

import pandas as pd

from helpers import checks
from helpers.engines import (
    DEFAULT_ENGINE,
    ENGINE_NAMES,
    MEMORY_EFFICIENCY,
    OverheadPreset,
    derive_engines,
    engines,
    published_results,
    published_serving_runs,
)
from helpers.prediction import (
    RUNTIME_RESERVE_BYTES,
    Prediction,
    calibrate,
    checked,
    largest_batch,
    predict,
    resolve,
    step_seconds,
    step_seconds_function,
)
from helpers.shapes import VALUE_BYTES, WEIGHT_BYTES
from helpers.stepcost import (
    DTYPES,
    FORMATS,
    GPUSpec,
    StepTime,
    bound_of,
    check_runs,
    gpu_spec,
    kernel,
    published_gpus,
    skinny_rate,
    spec_from_ceilings,
    square_flops,
    step_time,
)

# The planner's public names; one configuration's prediction comes from helpers.prediction,
# the device, its engine and the step's cost from helpers.stepcost and helpers.engines.
__all__ = [
    "DEFAULT_ENGINE",
    "DTYPES",
    "ENGINE_NAMES",
    "FORMATS",
    "MEMORY_EFFICIENCY",
    "RUNTIME_RESERVE_BYTES",
    "VALUE_BYTES",
    "WEIGHT_BYTES",
    "GPUSpec",
    "OverheadPreset",
    "Prediction",
    "StepTime",
    "best_config",
    "bound_of",
    "calibrate",
    "candidates",
    "derive_engines",
    "engines",
    "gpu",
    "gpu_spec",
    "implied_matmul_rate",
    "kernel",
    "largest_batch",
    "predict",
    "published_gpus",
    "published_results",
    "published_serving_runs",
    "skinny_rate",
    "spec_from_ceilings",
    "step_seconds",
    "step_seconds_function",
    "step_time",
    "versus_published",
]

gpu = gpu_spec  # the name notebooks 03–05 call

# --- Choosing a configuration ---------------------------------------------------------------


def _batch_grid(batches) -> list[int] | None:
    if batches is None:
        return None
    if isinstance(batches, str) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be a list of batch sizes, e.g. (1, 8, 64), got {batches!r}")
    batches = [checks.whole("batches", b) for b in batches]
    if not batches:
        raise ValueError("batches is empty: give at least one batch size, e.g. (1, 8, 64)")
    return batches


def _layouts(model, gpu, gpus, dtypes):
    """(dtype, tp) pairs the GPUs can run; a GPU without a link runs TP 1 only."""
    shape, spec = resolve(model, gpu)
    degrees = (1, 2, 4, 8) if spec.link_bandwidth else (1,)
    runnable = []
    for dtype in dtypes:
        try:
            check_runs(spec, dtype)
        except ValueError:
            continue  # e.g. fp8-w8a8 on an A100: not a candidate there
        runnable += [(dtype, t) for t in degrees if t <= gpus and shape.kv_heads % t == 0]
    return spec, runnable


def _candidate(model, spec, gpus, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype) -> dict:
    p = predict(
        model=model,
        gpu=spec,
        dtype=dtype,
        tp=tp,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        kv_dtype=kv_dtype,
    )
    return {
        "dtype": dtype,
        "tp": tp,
        "batch": batch,
        "replicas": gpus // tp,
        "tpot_ms": p.tpot_s * 1e3,
        "latency_s": p.latency_s,
        "fits": p.fits,
        "tokens_per_s": p.tokens_per_s * (gpus // tp),
        "bound": p.bound,
    }


def candidates(
    model,
    gpu,
    gpus: int,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    dtypes=("fp16", "int8", "int4"),
    batches=None,
    kv_dtype=None,
) -> pd.DataFrame:
    """Every (precision, TP, batch) on `gpus` GPUs, as predicted; replicas = gpus // tp.

    `batches` None: for each precision and TP, the powers of two up to the largest batch that
    fits and that batch itself (`largest_batch`), so the table ends where memory does, not at a
    grid's edge (a spec with no memory size, memory=0, gets batches 1–1024). A precision the
    GPU cannot run (fp8-w8a8 without fp8 tensor cores) is left out."""
    gpus = checks.whole("gpus", gpus)
    dtypes = checks.names("dtypes", dtypes, DTYPES)
    prompt_tokens = checks.whole("prompt_tokens", prompt_tokens)
    new_tokens = checks.whole("new_tokens", new_tokens)
    grid = _batch_grid(batches)
    spec, layouts = _layouts(model, gpu, gpus, dtypes)
    if grid is None and spec.memory == 0:  # a machine with no memory size: nothing ends the batch
        grid = [2**k for k in range(11)]
    rows = []
    for dtype, tp in layouts:
        sizes = grid
        if sizes is None:
            top, _ = largest_batch(
                model=model,
                gpu=spec,
                dtype=dtype,
                tp=tp,
                kv_dtype=kv_dtype,
                prompt_tokens=prompt_tokens,
                new_tokens=new_tokens,
            )
            sizes = sorted({*(2**k for k in range(top.bit_length())), max(top, 1)})
        rows += [
            _candidate(model, spec, gpus, dtype, tp, b, prompt_tokens, new_tokens, kv_dtype)
            for b in sizes
        ]
    return pd.DataFrame(rows)


def best_config(model, gpu, gpus: int, tpot_budget_ms: float, **kwargs) -> pd.Series | None:
    """The configuration with the most tokens/s across `gpus` GPUs whose time per output token
    stays within the budget (None if nothing does), with `stopped_by`: what ends its batch.

    Without `batches`, each precision × TP runs the largest batch that fits memory and the
    budget (`largest_batch`): throughput grows with the batch, so the best batch is where memory
    or the latency target stops it. With `batches`, only those are tried ("the grid")."""
    checks.positive("tpot_budget_ms", tpot_budget_ms)
    if kwargs.get("batches") is not None:
        table = candidates(model, gpu, gpus, **kwargs)
        ok = table[table.fits & (table.tpot_ms <= tpot_budget_ms)]
        if ok.empty:
            return None
        return pd.concat([ok.loc[ok.tokens_per_s.idxmax()], pd.Series({"stopped_by": "the grid"})])
    gpus = checks.whole("gpus", gpus)
    prompt_tokens = checks.whole("prompt_tokens", kwargs.get("prompt_tokens", 512))
    new_tokens = checks.whole("new_tokens", kwargs.get("new_tokens", 128))
    dtypes = checks.names("dtypes", kwargs.get("dtypes", ("fp16", "int8", "int4")), DTYPES)
    kv_dtype = kwargs.get("kv_dtype")
    spec, layouts = _layouts(model, gpu, gpus, dtypes)
    rows = []
    for dtype, tp in layouts:
        batch, stop = largest_batch(
            model=model,
            gpu=spec,
            dtype=dtype,
            tp=tp,
            kv_dtype=kv_dtype,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            tpot_budget_ms=tpot_budget_ms,
        )
        if batch:
            row = _candidate(
                model, spec, gpus, dtype, tp, batch, prompt_tokens, new_tokens, kv_dtype
            )
            rows.append({**row, "stopped_by": stop})
    if not rows:
        return None
    table = pd.DataFrame(rows)
    return table.loc[table.tokens_per_s.idxmax()]


# Published metrics, and how a prediction is put in the same unit: the metric names come from
# data/published_results.csv (gpt-fast reports a single stream's tokens/s: 1 ÷ TPOT).
_PUBLISHED_UNITS = {
    "tokens_per_s": ("ms/token", lambda p: p.tpot_s * 1e3, lambda v: 1e3 / v),
    "ms_per_token": ("ms/token", lambda p: p.tpot_s * 1e3, lambda v: v),
    "ttft_ms": ("TTFT ms", lambda p: p.ttft_s * 1e3, lambda v: v),
    "tokens_per_s_total": ("tokens/s", lambda p: p.tokens_per_s, lambda v: v),
}


def versus_published(roles=("check", "calibration")) -> pd.DataFrame:
    """Every published speed row (of `roles`) beside the planner's prediction for it, run by the
    row's engine on its GPU at its TP, batch, prompt and KV format, in the row's unit, with the
    error."""
    roles = checks.names("roles", roles, ("check", "calibration"))
    rows = []
    table = published_results()
    for r in table[table.role.isin(roles)].itertuples():
        kv_dtype = r.kv_dtype if isinstance(getattr(r, "kv_dtype", None), str) else None
        p = predict(
            model=r.model,
            gpu=gpu_spec(r.gpu, r.engine),
            dtype=r.dtype,
            tp=int(r.tp),
            batch=int(r.batch),
            prompt_tokens=int(r.prompt_tokens),
            kv_dtype=kv_dtype,
            new_tokens=128 if r.metric == "tokens_per_s_total" else 200,
        )
        unit, predicted, published = _PUBLISHED_UNITS[r.metric]
        rows.append(
            {
                "source": r.source,
                "role": r.role,
                "model": r.model,
                "gpu": r.gpu,
                "engine": r.engine,
                "dtype": r.dtype,
                "kv_dtype": kv_dtype or "",
                "tp": int(r.tp),
                "batch": int(r.batch),
                "metric": unit,
                "published": published(r.value),
                "predicted": predicted(p),
            }
        )
    out = pd.DataFrame(rows)
    return out.assign(error=out.predicted / out.published - 1)


def implied_matmul_rate(row) -> float:
    """The matmul FLOP/s a published first-token time implies, everything else as predicted:
    the prefill's matmul FLOPs ÷ (the published TTFT − the rest of the predicted step). A
    diagnosis of a miss (which rate the kernels really reached), never fed back into a preset.

    `row`: a row of `published_results()` (a Series or an itertuples row) with metric ttft_ms."""
    r = row.to_dict() if isinstance(row, pd.Series) else dict(row._asdict())
    if r.get("metric") != "ttft_ms":
        raise ValueError(f"row must be a published ttft_ms row, got metric {r.get('metric')!r}")
    kv_dtype = r["kv_dtype"] if isinstance(r.get("kv_dtype"), str) else None
    spec = gpu_spec(r["gpu"], r["engine"])
    shape, spec, dtype, tp, kv_dtype = checked(r["model"], spec, r["dtype"], int(r["tp"]), kv_dtype)
    batch, prompt = int(r["batch"]), int(r["prompt_tokens"])
    step = step_time(shape, spec, dtype, tp, batch, prompt, prompt, kv_dtype)
    matmul_flops = 2 * shape.linear_params * batch * prompt / tp
    rest_s = step.total_s - matmul_flops / square_flops(spec, dtype)
    left_s = r["value"] / 1e3 - rest_s
    if left_s <= 0:
        raise ValueError(
            f"the published {r['value']} ms is below the predicted rest of the step "
            f"({rest_s * 1e3:.2f} ms): no matmul rate explains it"
        )
    return matmul_flops / left_s
