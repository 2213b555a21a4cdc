"""Predict serving latency, throughput and memory from first principles.

    from helpers.planner import predict
    p = predict(model="llama-2-7b", gpu="a100-80gb-sxm", dtype="fp16", tp=2, batch=4,
                prompt_tokens=128, new_tokens=20)
    p.ttft_s, p.tpot_s, p.latency_s, p.tokens_per_s, p.memory_per_gpu_bytes, p.fits, p.bound

A decode step reads every weight shard and the KV cache once and does 2 FLOPs per parameter per
sequence; it takes the longer of (bytes ÷ bandwidth) and (FLOPs ÷ peak), plus its all-reduces
(two per layer under tensor parallelism, each α + bytes ÷ link bandwidth). Prefill is the same
with `prompt_tokens` tokens per sequence at once, plus attention's quadratic term.

The only constants not taken from a datasheet are the efficiencies below, each documented.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd

from helpers import DATA_DIR
from helpers.memory import Shape, kv_cache_bytes, serving_memory
from helpers.tp import allreduce_bus_bytes, check_tp_degree

# Fraction of datasheet memory bandwidth that decode's weight streaming reaches. A plain read on
# a lent H200 reached 4.27 of 4.8 TB/s (0.89, data/measured/h200_ceilings.csv); decode kernels
# also launch many small kernels, so we take 0.8.
MEMORY_EFFICIENCY = 0.8
# Fraction of dense peak FLOP/s a large matmul reaches where no measurement is published:
# the published achievable figures give 795/989 = 0.80 (H100) and 271/312 = 0.87 (A100).
COMPUTE_EFFICIENCY = 0.8
# Fixed latency of one all-reduce between GPUs in a node (NCCL over NVLink). Not measured here
# (we had one GPU); small-message all-reduce latencies of order 10–40 µs are typical, and this
# value is the one uncertain constant of the model: notebook 03 shows its effect.
ALLREDUCE_LATENCY_S = 20e-6
# Memory a runtime keeps for itself on each GPU (CUDA context, workspaces).
RUNTIME_RESERVE_BYTES = 1.5e9

# Bytes per weight for each serving precision; weight-only formats compute in 16 bit and keep
# one 16-bit scale per group of 64 (int4) or per output channel (int8, negligible).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 64}
COMPUTE_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 2, "int4": 2}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    flops: float  # dense FLOP/s in the compute dtype
    bandwidth: float  # bytes/s
    memory: float  # bytes
    link_bandwidth: float | None = None  # bytes/s per GPU to its peers (NVLink); None: no link
    fp32_flops: float | None = None  # None: fp32 runs at a quarter of the 16-bit peak (no TF32)


@functools.cache
def published_gpus() -> dict[str, GPUSpec]:
    """Datasheet GPUs (data/published_hardware.csv) with the efficiencies above applied."""
    out = {}
    for r in pd.read_csv(DATA_DIR / "published_hardware.csv").itertuples():
        if pd.notna(r.achievable_bf16_tflops):  # a published achievable figure: use it as is
            flops = r.achievable_bf16_tflops * 1e12
        else:
            peak = r.dense_bf16_tflops if pd.notna(r.dense_bf16_tflops) else r.dense_fp16_tflops
            flops = peak * 1e12 * COMPUTE_EFFICIENCY
        link = r.interconnect_gbs * 1e9 if pd.notna(r.interconnect_gbs) else None
        bandwidth = r.memory_bandwidth_gbs * 1e9 * MEMORY_EFFICIENCY
        out[r.gpu] = GPUSpec(r.gpu, flops, bandwidth, r.memory_gb * 1e9, link)
    return out


def spec_from_ceilings(ceilings, name: str = "this machine", memory_bytes: float = 0.0) -> GPUSpec:
    """A device spec from measured ceilings (notebook 00): already achievable, no efficiency."""
    flops = max(ceilings.matmul_flops.values())
    return GPUSpec(name, flops, ceilings.read_bandwidth, memory_bytes,
                   fp32_flops=ceilings.matmul_flops.get("fp32"))  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    latency_s: float
    tokens_per_s: float
    memory_per_gpu_bytes: float
    fits: bool
    bound: str  # what limits a decode step: "memory", "compute" or "communication"
    reason: str = ""
    decode_parts_s: dict | None = None


def _resolve(model, gpu) -> tuple[Shape, GPUSpec]:
    shape = Shape.of(model)  # a name, a transformers config or a dict; errors name the choices
    if isinstance(gpu, GPUSpec):
        return shape, gpu
    gpus = published_gpus()
    if gpu not in gpus:
        raise ValueError(f"Unknown GPU {gpu!r}; known: {sorted(gpus)}, or pass a GPUSpec.")
    return shape, gpus[gpu]


def _allreduce_s(nbytes: float, tp: int, spec: GPUSpec) -> float:
    if tp == 1:
        return 0.0
    if spec.link_bandwidth is None:
        raise ValueError(f"{spec.name} has no GPU-to-GPU link in the table: use tp=1.")
    return ALLREDUCE_LATENCY_S + allreduce_bus_bytes(nbytes, tp) / spec.link_bandwidth


def step_time(shape, spec, dtype, tp, batch, tokens, context) -> dict[str, float]:
    """Seconds of one forward pass over `tokens` new tokens per sequence, by limit."""
    flops_rate = (spec.fp32_flops or spec.flops / 4) if dtype == "fp32" else spec.flops
    weights = shape.params * WEIGHT_BYTES[dtype] / tp
    act = COMPUTE_DTYPE_BYTES[dtype]
    kv_read = kv_cache_bytes(shape, batch, context, act) / tp
    matmul_flops = 2 * shape.params * batch * tokens / tp
    attention_flops = (
        4 * shape.layers * batch * tokens * context * shape.heads * shape.head_dim / tp
    )
    message = batch * tokens * shape.hidden * act
    return {
        "memory": (weights + kv_read) / spec.bandwidth,
        "compute": (matmul_flops + attention_flops) / flops_rate,
        "communication": 2 * shape.layers * _allreduce_s(message, tp, spec),
    }


def predict(
    model="llama-2-7b", gpu="a100-80gb-sxm", dtype="fp16", tp=1, batch=1,
    prompt_tokens=128, new_tokens=128,
) -> Prediction:  # fmt: skip
    """Latency, throughput and memory of serving `batch` requests; see the module docstring."""
    if dtype not in WEIGHT_BYTES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(WEIGHT_BYTES)}.")
    shape, spec = _resolve(model, gpu)
    check_tp_degree(tp, heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate)
    if batch < 1 or new_tokens < 1 or prompt_tokens < 1:
        raise ValueError("batch, prompt_tokens and new_tokens must be at least 1")

    prefill = step_time(shape, spec, dtype, tp, batch, prompt_tokens, prompt_tokens)
    decode = step_time(shape, spec, dtype, tp, batch, 1, prompt_tokens + new_tokens // 2)
    ttft = max(prefill["memory"], prefill["compute"]) + prefill["communication"]
    tpot = max(decode["memory"], decode["compute"]) + decode["communication"]
    latency = ttft + (new_tokens - 1) * tpot
    context = prompt_tokens + new_tokens
    act = COMPUTE_DTYPE_BYTES[dtype]
    parts = serving_memory(shape, batch, context, WEIGHT_BYTES[dtype], act, tp, prompt_tokens)
    memory = (
        parts["weights"] + parts["kv_cache"] + parts["activations"]
        + RUNTIME_RESERVE_BYTES * (spec.memory > 0)
    )  # fmt: skip
    fits = spec.memory == 0 or memory <= spec.memory
    reason = "" if fits else (
        f"needs {memory / 1e9:.1f} GB per GPU, {spec.name} has {spec.memory / 1e9:.0f} GB: "
        "raise tp, lower batch or context, or quantize"
    )  # fmt: skip
    limits = {"memory": decode["memory"], "compute": decode["compute"],
              "communication": decode["communication"]}  # fmt: skip
    return Prediction(
        ttft_s=ttft, tpot_s=tpot, latency_s=latency, tokens_per_s=batch * new_tokens / latency,
        memory_per_gpu_bytes=memory, fits=fits, bound=max(limits, key=limits.get),
        reason=reason, decode_parts_s=decode,
    )  # fmt: skip


def candidates(
    model, gpu, gpus: int, prompt_tokens: int = 512, new_tokens: int = 128,
    dtypes=("fp16", "int8", "int4"), batches=tuple(2**k for k in range(11)),
) -> pd.DataFrame:  # fmt: skip
    """Every (precision, TP, batch) on `gpus` GPUs, as predicted; replicas = gpus // tp."""
    shape, _ = _resolve(model, gpu)
    rows = []
    for dtype in dtypes:
        for tp in (t for t in (1, 2, 4, 8) if t <= gpus and shape.kv_heads % t == 0):
            for batch in batches:
                p = predict(model, gpu, dtype, tp, batch, prompt_tokens, new_tokens)
                rows.append({
                    "dtype": dtype, "tp": tp, "batch": batch, "replicas": gpus // tp,
                    "tpot_ms": p.tpot_s * 1e3, "latency_s": p.latency_s, "fits": p.fits,
                    "tokens_per_s": p.tokens_per_s * (gpus // tp), "bound": p.bound,
                })  # fmt: skip
    return pd.DataFrame(rows)


def best_config(model, gpu, gpus: int, tpot_budget_ms: float, **kwargs) -> pd.Series | None:
    """The configuration with the most tokens/s across `gpus` GPUs whose time per output token
    stays within the budget (None if nothing fits the budget)."""
    table = candidates(model, gpu, gpus, **kwargs)
    ok = table[table.fits & (table.tpot_ms <= tpot_budget_ms)]
    return None if ok.empty else ok.loc[ok.tokens_per_s.idxmax()]
