"""What one forward pass costs on a device run by an engine: the device (`GPUSpec`, from a
datasheet or from this machine's measured ceilings), the precisions it serves (`FORMATS`), and
the step's limits, parts and bound (`step_time`). The planner builds its predictions on these.

A kernel that streams bytes and computes is bound by the larger of its two roofline floors
(bytes ÷ bandwidth, FLOPs ÷ peak); its whole time — a measured rate's shortfall included — counts
toward that bound, and a step is labelled by the limit with the most time (`kernel`, `bound_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from helpers import checks
from helpers.engines import DEFAULT_ENGINE, ENGINE_NAMES, OverheadPreset, engines, hardware
from helpers.shapes import (
    VALUE_BYTES,
    WEIGHT_BYTES,
    allreduce_bus_bytes,
    kv_cache_bytes,
    kv_value_bytes,
)

# Each precision the planner serves: the format of its stored weights (a key of
# shapes.WEIGHT_BYTES) and the format its matmuls multiply in.
FORMATS = {
    "fp32": ("fp32", "fp32"),
    "fp16": ("fp16", "16-bit"),
    "bf16": ("bf16", "16-bit"),
    "int8": ("int8", "16-bit"),  # weight-only: widened to 16 bits in the kernel
    "int4": ("int4", "16-bit"),
    "fp8": ("fp8", "16-bit"),  # W8A16: e4m3 weights widened to 16 bits
    "fp8-w8a8": ("fp8", "fp8"),  # W8A8: weights and each matmul's input in fp8
}
DTYPES = tuple(FORMATS)


@dataclass(frozen=True)
class GPUSpec:
    name: str
    flops: float  # dense FLOP/s in the 16-bit compute dtype (achievable)
    bandwidth: float  # bytes/s (datasheet, or measured)
    memory: float  # bytes
    link_bandwidth: float | None = None  # bytes/s, one direction, to each peer; None: no link
    fp32_flops: float | None = None  # None: fp32 runs at a quarter of the 16-bit peak (no TF32)
    engine: OverheadPreset = OverheadPreset("ideal")  # zero overhead: the first-principles floor
    link: str = "nvlink"  # "nvlink" or "pcie": how GPUs without NVLink talk
    linear_flops: dict = field(default_factory=dict)  # tokens per pass → measured FLOP/s
    bf16: bool = True  # runs bf16 natively (a T4, Turing, does not: it serves in fp16)
    fp8_flops: float | None = None  # dense fp8 tensor-core FLOP/s (achievable); None: none


def gpu_spec(name: str, engine: str | OverheadPreset = DEFAULT_ENGINE) -> GPUSpec:
    """A datasheet GPU (`data/published_hardware.csv`) run by an engine preset (or your own)."""
    name = checks.choice("GPU", name, hardware())
    if not isinstance(engine, OverheadPreset):
        engine = engines()[checks.choice("engine", engine, ENGINE_NAMES)]
    return GPUSpec(name, engine=engine, **hardware()[name])


def published_gpus(engine: str | OverheadPreset = DEFAULT_ENGINE) -> dict[str, GPUSpec]:
    """Every datasheet GPU, run by `engine`."""
    return {name: gpu_spec(name, engine) for name in hardware()}


def spec_from_ceilings(ceilings, name: str = "this machine", memory_bytes: float = 0.0) -> GPUSpec:
    """This machine as measured (notebook 00): bandwidth, FLOP/s of square and decode-shaped
    matmuls, and the overhead of an eager decode step. Already achievable: no efficiency.
    It has no link to another device (`link_bandwidth=None`): it predicts tp=1 only."""
    flops = getattr(ceilings, "matmul_flops", None)
    if not isinstance(flops, dict) or not flops or not hasattr(ceilings, "read_bandwidth"):
        raise TypeError(
            f"ceilings must be roofline.Ceilings (measured in notebook 00), got {ceilings!r}: "
            "pass roofline.load_or_measure(device, preset)"
        )
    for dt, value in flops.items():
        checks.positive(f"ceilings.matmul_flops[{dt!r}]", value)
    checks.positive("ceilings.read_bandwidth", ceilings.read_bandwidth)
    checks.positive("memory_bytes", memory_bytes, allow_zero=True)
    engine = OverheadPreset(
        "eager, measured here",
        step_s=getattr(ceilings, "step_overhead_s", None) or 0.0,
        layer_s=getattr(ceilings, "layer_overhead_s", None) or 0.0,
        source="notebook 00's overhead measurement",
    )
    return GPUSpec(
        name,
        max(ceilings.matmul_flops.values()),
        ceilings.read_bandwidth,
        memory_bytes,
        fp32_flops=ceilings.matmul_flops.get("fp32"),
        engine=engine,
        linear_flops=dict(getattr(ceilings, "linear_flops", None) or {}),
    )


# --- One forward pass ---------------------------------------------------------------------


def square_flops(spec: GPUSpec, dtype: str) -> float:
    """FLOP/s of a large square matmul in `dtype`'s matmul format (fp32 at a quarter of 16-bit
    without TF32; fp8 on its tensor cores)."""
    compute = FORMATS[dtype][1]
    if compute == "fp32":
        return spec.fp32_flops or spec.flops / 4
    return spec.fp8_flops if compute == "fp8" else spec.flops


def skinny_rate(measured: dict[int, float], rows: int, square_flops: float) -> float:
    """FLOP/s of a product with `rows` rows, from the rates `measured` at some row counts
    (notebook 00's decode-shaped products), interpolated in log–log; beyond the last measured
    row count it approaches `square_flops`, and with nothing measured it is `square_flops`."""
    if not measured:
        return square_flops
    ms = sorted(int(m) for m in measured)
    rates = [measured[m] for m in ms]
    if rows > ms[-1]:  # beyond the measured rows: approach the square peak
        ms, rates = ms + [max(2048, 2 * ms[-1])], rates + [max(square_flops, rates[-1])]
    return float(np.exp(np.interp(np.log(rows), np.log(ms), np.log(rates))))


def kernel(bytes_s: float, peak_s: float, measured_s: float | None = None) -> tuple[float, str]:
    """A kernel that streams bytes and computes: its time and the limit that binds it.

    `bytes_s` = bytes ÷ bandwidth, `peak_s` = FLOPs ÷ peak FLOP/s, `measured_s` = FLOPs ÷ the
    rate measured for this shape (notebook 00's skinny products), which already includes the
    streaming: the time is the larger of bytes_s and measured_s. Without a measured rate
    (datasheet figures) no overlap is assumed: the sum (a kernel near the ridge reaches neither
    roof; published prefill times, `role` check rows, sit at the sum). The bound is the larger
    roofline floor — the measured rate's own bound: a skinny product measured at batch 1 is
    slow because it streams its weights, so its whole time counts as bandwidth."""
    time = bytes_s + peak_s if measured_s is None else max(bytes_s, measured_s)
    return time, ("memory" if bytes_s >= peak_s else "compute")


def bound_of(parts: dict[str, tuple[float, str]]) -> str:
    """The limit with the most time once each part is booked to the limit that binds it."""
    booked = {"memory": 0.0, "compute": 0.0, "overhead": 0.0, "communication": 0.0}
    for seconds, limit in parts.values():
        booked[limit] += seconds
    return max(booked, key=booked.get)


@dataclass(frozen=True)
class StepTime:
    """One forward pass: each limit's time alone, and the parts its time is made of."""

    limits: dict  # memory: bytes ÷ bandwidth; compute: FLOPs ÷ peak; overhead; communication
    parts: dict  # matmuls, attention, dequantize, overhead, communication: they add up
    bound: str  # the limit that binds the step (see `kernel` and `bound_of`)

    @property
    def total_s(self) -> float:
        return sum(self.parts.values())


def _allreduce_s(nbytes: float, tp: int, spec: GPUSpec) -> float:
    if tp == 1:
        return 0.0
    return spec.engine.alpha_s(tp) + allreduce_bus_bytes(nbytes, tp) / spec.link_bandwidth


def step_time(shape, spec, dtype, tp, batch, tokens, context, kv_dtype=None) -> StepTime:
    """One forward pass over `tokens` new tokens for each of `batch` sequences attending to
    `context` positions, its KV cache in `kv_dtype` (default: the activations' format)."""
    engine, weights_format = spec.engine, FORMATS[dtype][0]
    bandwidth = spec.bandwidth * engine.memory_efficiency
    act = VALUE_BYTES[weights_format]
    kv_bytes = act if kv_dtype is None else kv_value_bytes(kv_dtype, shape.head_dim)
    weights_s = shape.linear_params * WEIGHT_BYTES[weights_format] / tp / bandwidth
    kv_s = kv_cache_bytes(shape, batch, context, kv_bytes) / tp / bandwidth
    matmul_flops = 2 * shape.linear_params * batch * tokens / tp
    attention_flops = 4 * shape.layers * batch * tokens * context * shape.heads * shape.head_dim
    square, measured = square_flops(spec, dtype), bool(spec.linear_flops)
    rate = skinny_rate(spec.linear_flops, batch * tokens, square)
    kernels = {
        "matmuls": kernel(
            weights_s, matmul_flops / square, matmul_flops / rate if measured else None
        ),
        "attention": kernel(
            kv_s,
            attention_flops / tp / spec.flops,
            attention_flops / tp / spec.flops if measured else None,
        ),
        "dequantize": (
            engine.dequant_flops.get(dtype, 0.0) * shape.linear_params / tp / spec.flops,
            "compute",
        ),
        "overhead": (engine.overhead_s(shape.layers), "overhead"),
        "communication": (
            2 * shape.layers * _allreduce_s(batch * tokens * shape.hidden * act, tp, spec),
            "communication",
        ),
    }
    limits = {
        "memory": weights_s + kv_s,
        "compute": matmul_flops / square + attention_flops / tp / spec.flops,
        "overhead": kernels["overhead"][0],
        "communication": kernels["communication"][0],
    }
    parts = {name: seconds for name, (seconds, _) in kernels.items()}
    return StepTime(limits, parts, bound_of(kernels))


def check_runs(spec: GPUSpec, dtype: str) -> None:
    """Refuse a precision the GPU cannot run natively, in one line naming the fix."""
    if dtype == "bf16" and not spec.bf16:
        raise ValueError(
            f"gpu {spec.name!r} has no native bf16 (a Turing GPU): use dtype='fp16', which it "
            "runs at the same bytes per weight"
        )
    if dtype == "fp8-w8a8" and not spec.fp8_flops:
        raise ValueError(
            f"gpu {spec.name!r} has no fp8 tensor cores (fp8 W8A8 needs Ada or Hopper: L4, L40S, "
            "RTX 4090, H100, H200): use dtype='fp8' (fp8 weights widened to 16 bits, W8A16) "
            "or 'int8', the same bytes per weight"
        )
