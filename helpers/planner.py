"""Predict serving latency, throughput and memory from first principles — three limits.

    from helpers import planner
    p = planner.predict(model="llama-2-7b", gpu="a100-80gb-sxm", dtype="fp16", tp=2, batch=4,
                        prompt_tokens=128, new_tokens=20)
    p.ttft_s, p.tpot_s, p.latency_s, p.tokens_per_s, p.memory_per_gpu_bytes, p.fits, p.bound

One forward pass (a decode step, or the prefill) costs

    weight matmuls: max(weight bytes ÷ bandwidth, matmul FLOPs ÷ FLOP/s)     ← bandwidth, compute
  + attention:      max(KV bytes ÷ bandwidth, attention FLOPs ÷ FLOP/s)
  + overhead:       step cost + layers × per-layer cost                    ← the third limit
  + communication:  2 all-reduces per layer under TP, each α(tp) + bus bytes ÷ link bandwidth

Bandwidth and FLOP/s come from datasheets (`data/published_hardware.csv`) or from this machine's
measured ceilings; the overhead, α and the efficiency of the kernels are properties of the
*engine* that runs the model, so a GPU is always modelled together with one (`Engine`):
`eager` (PyTorch/transformers launching every kernel from Python), `compiled` (a CUDA graph or
`torch.compile` replaying the step: gpt-fast, torchao, vLLM/SGLang) and `production`
(TensorRT-LLM / FasterTransformer-class fused kernels). Each constant is derived in
`derive_engines()` from cited published measurements (`data/published_results.csv`, rows whose
`role` is `calibration`); the other rows check the result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from helpers import DATA_DIR, checks
from helpers.shapes import (
    VALUE_BYTES,
    WEIGHT_BYTES,
    Shape,
    allreduce_bus_bytes,
    check_tp_degree,
    kv_cache_bytes,
    serving_memory,
)

# Memory a runtime keeps for itself on each GPU (CUDA context, workspaces).
RUNTIME_RESERVE_BYTES = 1.5e9
# Fraction of dense peak FLOP/s a large matmul reaches where no measurement is published:
# the published achievable figures give 795/989 = 0.80 (H100) and 271/312 = 0.87 (A100).
COMPUTE_EFFICIENCY = 0.8
# gpt-fast's README: an A100-80GB (power-limited to 330 W) reaches "about 1700 GB/s" of its
# 2039 GB/s datasheet bandwidth in practice. The same fraction is used for every GPU.
MEMORY_EFFICIENCY = 1700 / 2039
# NVLink datasheet figures (600 GB/s A100, 900 GB/s H100/H200) add both directions; an
# all-reduce's bus traffic runs in one direction per link, so it sees half.
NVLINK_DIRECTIONS = 2

ENGINE_NAMES = ("eager", "compiled", "production")
DEFAULT_ENGINE = "compiled"


@dataclass(frozen=True)
class Engine:
    """What the software adds to every forward pass, beyond moving bytes and doing FLOPs."""

    name: str
    step_s: float = 0.0  # fixed per pass: sampling, scheduling, Python around the model
    layer_s: float = 0.0  # per layer: launching (or dispatching) that layer's kernels
    allreduce_s: float = 0.0  # α of one all-reduce between 2 GPUs
    allreduce_per_rank_s: float = 0.0  # α grows by this for each further rank
    memory_efficiency: float = 1.0  # fraction of the spec's bandwidth its kernels reach
    dequant_flops: dict = field(default_factory=dict)  # extra work per weight (int8/int4)
    source: str = ""

    def overhead_s(self, layers: int) -> float:
        return self.step_s + layers * self.layer_s

    def alpha_s(self, tp: int) -> float:
        return self.allreduce_s + self.allreduce_per_rank_s * (tp - 2)


@dataclass(frozen=True)
class GPUSpec:
    name: str
    flops: float  # dense FLOP/s in the compute dtype (achievable)
    bandwidth: float  # bytes/s (datasheet, or measured)
    memory: float  # bytes
    link_bandwidth: float | None = None  # bytes/s, one direction, to each peer; None: no link
    fp32_flops: float | None = None  # None: fp32 runs at a quarter of the 16-bit peak (no TF32)
    engine: Engine = Engine("ideal")  # zero overhead: the first-principles floor
    link: str = "nvlink"  # "nvlink" or "pcie": how GPUs without NVLink talk
    linear_flops: dict = field(default_factory=dict)  # tokens per pass → measured FLOP/s
    bf16: bool = True  # runs bf16 natively (a T4, Turing, does not: it serves in fp16)


# --- Published data ------------------------------------------------------------------------


@functools.cache
def published_results() -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / "published_results.csv")


def _published_ms(source: str, model: str, dtype: str, tp: int) -> float:
    """ms per token of one published row (converted from tokens/s where needed)."""
    t = published_results()
    r = t[(t.source == source) & (t.model == model) & (t.dtype == dtype) & (t.tp == tp)
          & t.metric.isin(["tokens_per_s", "ms_per_token"])].iloc[0]  # fmt: skip
    return r.value if r.metric == "ms_per_token" else 1e3 / r.value


def _floor_ms(model: str, gpu: str, dtype: str, tp: int, context: int = 0) -> float:
    """Weight (+ KV) bytes ÷ achievable bandwidth, ms: the part of a step no engine avoids."""
    shape, hw = Shape.of(model), _hardware()[gpu]
    bytes_ = _streamed_weight_bytes(shape, dtype) + kv_cache_bytes(shape, 1, context, 2)
    return bytes_ / tp / (hw["bandwidth"] * MEMORY_EFFICIENCY) * 1e3


def derive_engines() -> pd.DataFrame:
    """Every engine constant and the published rows it comes from, step by step."""
    rows = []

    def note(engine, constant, value, unit, how):
        rows.append({"engine": engine, "constant": constant, "value": value, "unit": unit,
                     "derivation": how})  # fmt: skip

    # compiled: gpt-fast, Llama-2-7B bf16 on A100-80GB, batch 1, TP 1/2/4/8 (CUDA graphs).
    layers = Shape.of("llama-2-7b").layers
    t1 = _published_ms("gpt-fast", "llama-2-7b", "bf16", 1)
    layer_s = (t1 - _floor_ms("llama-2-7b", "a100-80gb-sxm", "bf16", 1)) / layers / 1e3
    note("compiled", "layer_s", layer_s, "s",
         f"gpt-fast TP1 {t1:.2f} ms − weight floor, ÷ {layers} layers")  # fmt: skip
    tps = [2, 4, 8]
    alphas = [
        (_published_ms("gpt-fast", "llama-2-7b", "bf16", t)
         - _floor_ms("llama-2-7b", "a100-80gb-sxm", "bf16", t) - layers * layer_s * 1e3)
        / (2 * layers) / 1e3
        for t in tps
    ]  # fmt: skip
    per_rank, alpha2 = np.polyfit(np.array(tps) - 2, alphas, 1)
    note(
        "compiled",
        "allreduce_s",
        alpha2,
        "s",
        "gpt-fast TP2/4/8 residual ÷ (2 · layers) all-reduces, fitted α(2) + slope · (tp−2)",
    )
    note("compiled", "allreduce_per_rank_s", max(per_rank, 0.0), "s", "slope of that fit")
    for dt in ("int8", "int4"):
        extra = _published_ms("gpt-fast", "llama-2-7b", dt, 1) - layers * layer_s * 1e3
        extra -= _floor_ms("llama-2-7b", "a100-80gb-sxm", dt, 1)
        weights = Shape.of("llama-2-7b").linear_params
        flops = extra / 1e3 * _hardware()["a100-80gb-sxm"]["flops"] / weights
        note(
            "compiled",
            f"dequant_flops[{dt}]",
            flops,
            "FLOP per weight",
            f"gpt-fast {dt} time − its weight floor − layer overhead, × A100 FLOP/s ÷ weights",
        )

    # production: FasterTransformer, 13B Llama shape, fp16, A100-40GB, batch 1, 512 context.
    layers13 = Shape.of("llama-2-13b").layers
    ft1 = _published_ms("llm-analysis", "llama-2-13b", "fp16", 1)
    ft_layer = (ft1 - _floor_ms("llama-2-13b", "a100-40gb", "fp16", 1, 512)) / layers13 / 1e3
    note(
        "production",
        "layer_s",
        ft_layer,
        "s",
        f"FasterTransformer TP1 {ft1:.1f} ms − weight and KV floor, ÷ {layers13} layers",
    )
    ft2 = _published_ms("llm-analysis", "llama-2-13b", "fp16", 2)
    ft_alpha = (ft2 - _floor_ms("llama-2-13b", "a100-40gb", "fp16", 2, 512)
                - layers13 * ft_layer * 1e3) / (2 * layers13) / 1e3  # fmt: skip
    note(
        "production",
        "allreduce_s",
        ft_alpha,
        "s",
        f"FasterTransformer TP2 {ft2:.1f} ms − floor − layer overhead, ÷ (2 · layers)",
    )

    # eager: every kernel launched from Python, so the cost is the host CPU's and varies by
    # machine: the course's own loop on the H200's host (data/measured) is shown for comparison.
    eager = _published_ms("gpt-fast-blog", "llama-2-7b", "bf16", 1)
    eager_layer = (eager - _floor_ms("llama-2-7b", "a100-80gb-sxm", "bf16", 1)) / layers / 1e3
    note(
        "eager",
        "layer_s",
        eager_layer,
        "s",
        f"gpt-fast blog eager {eager:.1f} ms − weight floor, ÷ {layers} layers",
    )
    measured = pd.read_csv(DATA_DIR / "measured" / "h200_decode.csv")
    loop = measured[(measured.method == "static-cache loop") & (measured.batch == 1)]
    for r in loop.itertuples():  # its floor already uses the bandwidth measured there
        note(
            "eager (H200 host, for comparison)",
            f"layer_s[{r.model}]",
            (r.tpot_s - r.floor_s) / Shape.of(r.model).layers,
            "s",
            f"course loop on the lent H200 {r.tpot_s * 1e3:.1f} ms − floor, ÷ layers",
        )
    note("eager", "allreduce_s", ft_alpha, "s", "as production (both use NCCL)")
    return pd.DataFrame(rows)


@functools.cache
def engines() -> dict[str, Engine]:
    """The three engine presets, with the constants `derive_engines()` shows."""
    d = derive_engines().set_index(["engine", "constant"]).value
    dequant = {dt: d["compiled", f"dequant_flops[{dt}]"] for dt in ("int8", "int4")}
    source = "derived in helpers.planner.derive_engines() from data/published_results.csv"
    common = dict(memory_efficiency=MEMORY_EFFICIENCY, dequant_flops=dequant, source=source,
                  allreduce_per_rank_s=d["compiled", "allreduce_per_rank_s"])  # fmt: skip
    return {
        "eager": Engine("eager", layer_s=d["eager", "layer_s"],
                        allreduce_s=d["eager", "allreduce_s"], **common),
        "compiled": Engine("compiled", layer_s=d["compiled", "layer_s"],
                           allreduce_s=d["compiled", "allreduce_s"], **common),
        "production": Engine("production", layer_s=d["production", "layer_s"],
                             allreduce_s=d["production", "allreduce_s"], **common),
    }  # fmt: skip


@functools.cache
def _hardware() -> dict[str, dict]:
    out = {}
    for r in pd.read_csv(DATA_DIR / "published_hardware.csv").itertuples():
        if pd.notna(r.achievable_bf16_tflops):  # a published achievable figure: use it as is
            flops = r.achievable_bf16_tflops * 1e12
        else:
            peak = r.dense_bf16_tflops if pd.notna(r.dense_bf16_tflops) else r.dense_fp16_tflops
            flops = peak * 1e12 * COMPUTE_EFFICIENCY
        if pd.notna(r.interconnect_gbs):
            link, kind = r.interconnect_gbs * 1e9 / NVLINK_DIRECTIONS, "nvlink"
        else:
            link, kind = r.pcie_gbs * 1e9, "pcie"
        out[r.gpu] = dict(flops=flops, bandwidth=r.memory_bandwidth_gbs * 1e9,
                          memory=r.memory_gb * 1e9, link_bandwidth=link, link=kind,
                          bf16=bool(pd.notna(r.dense_bf16_tflops)))  # fmt: skip
    return out


def gpu(name: str, engine: str | Engine = DEFAULT_ENGINE) -> GPUSpec:
    """A datasheet GPU (`data/published_hardware.csv`) run by an engine preset (or your own)."""
    name = checks.choice("GPU", name, _hardware())
    if not isinstance(engine, Engine):
        engine = engines()[checks.choice("engine", engine, ENGINE_NAMES)]
    hw = _hardware()[name]
    return GPUSpec(name, engine=engine, **hw)


def published_gpus(engine: str | Engine = DEFAULT_ENGINE) -> dict[str, GPUSpec]:
    """Every datasheet GPU, run by `engine`."""
    return {name: gpu(name, engine) for name in _hardware()}


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
    engine = Engine(
        "eager, measured here",
        step_s=getattr(ceilings, "step_overhead_s", None) or 0.0,
        layer_s=getattr(ceilings, "layer_overhead_s", None) or 0.0,
        source="notebook 00's overhead measurement",
    )
    return GPUSpec(
        name, max(ceilings.matmul_flops.values()), ceilings.read_bandwidth, memory_bytes,
        fp32_flops=ceilings.matmul_flops.get("fp32"), engine=engine,
        linear_flops=dict(getattr(ceilings, "linear_flops", None) or {}),
    )  # fmt: skip


# --- The model ------------------------------------------------------------------------------


def _streamed_weight_bytes(shape: Shape, dtype: str) -> float:
    """Bytes of weights one forward pass reads (the embedding table stays 16-bit when quantized,
    and only its used rows are read unless it doubles as the output layer)."""
    return shape.linear_params * WEIGHT_BYTES[dtype]


def _square_flops(spec: GPUSpec, dtype: str) -> float:
    """FLOP/s of a large square matmul in `dtype` (fp32 at a quarter of 16-bit without TF32)."""
    return (spec.fp32_flops or spec.flops / 4) if dtype == "fp32" else spec.flops


def _matmul_rate(spec: GPUSpec, dtype: str, tokens: int) -> float:
    """FLOP/s of the weight matmuls when `tokens` rows go through at once: measured where this
    machine measured decode-shaped products (interpolated), else the square-matmul figure."""
    return skinny_rate(spec.linear_flops, tokens, _square_flops(spec, dtype))


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


def _allreduce_s(nbytes: float, tp: int, spec: GPUSpec) -> float:
    if tp == 1:
        return 0.0
    return spec.engine.alpha_s(tp) + allreduce_bus_bytes(nbytes, tp) / spec.link_bandwidth


def step_time(shape, spec, dtype, tp, batch, tokens, context) -> dict[str, float]:
    """Seconds of one forward pass over `tokens` new tokens per sequence, by part."""
    engine = spec.engine
    bandwidth = spec.bandwidth * engine.memory_efficiency
    act = VALUE_BYTES[dtype]
    weights = _streamed_weight_bytes(shape, dtype) / tp
    kv_read = kv_cache_bytes(shape, batch, context, act) / tp
    matmul_flops = 2 * shape.linear_params * batch * tokens / tp
    attention_flops = 4 * shape.layers * batch * tokens * context * shape.heads * shape.head_dim
    square = _square_flops(spec, dtype)
    dequant = engine.dequant_flops.get(dtype, 0.0) * shape.linear_params / tp / spec.flops
    message = batch * tokens * shape.hidden * act
    matmul_rate = _matmul_rate(spec, dtype, batch * tokens)
    measured = bool(spec.linear_flops)
    return {
        "memory": weights / bandwidth + kv_read / bandwidth,
        "compute": matmul_flops / matmul_rate + attention_flops / tp / square,
        "matmuls": _combine(weights / bandwidth, matmul_flops / matmul_rate, measured),
        "attention": _combine(kv_read / bandwidth, attention_flops / tp / square, measured),
        "dequantize": dequant,
        "overhead": engine.overhead_s(shape.layers),
        "communication": 2 * shape.layers * _allreduce_s(message, tp, spec),
    }


def _combine(memory_s: float, compute_s: float, measured: bool) -> float:
    """Time of kernels that both stream bytes and compute. With rates measured on decode-shaped
    products (this machine) the measured rate already includes the streaming: take the larger.
    With datasheet figures, assume no overlap (the sum): a kernel near the ridge point reaches
    neither roof, and published prefill times (`role` check rows) sit at the sum, not the max."""
    return max(memory_s, compute_s) if measured else memory_s + compute_s


def _total(parts: dict) -> float:
    return (parts["matmuls"] + parts["attention"] + parts["dequantize"] + parts["overhead"]
            + parts["communication"])  # fmt: skip


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
    decode_parts_s: dict | None = None


def _resolve(model, gpu_) -> tuple[Shape, GPUSpec]:
    if isinstance(model, str):
        model = model.strip().lower()  # names are labels: "Llama-2-7B" is "llama-2-7b"
    try:
        shape = Shape.of(model)  # a name, a transformers config or a dict; errors name the choices
    except ValueError as err:
        raise ValueError(f"model {model!r}: {err}") from None
    if isinstance(gpu_, GPUSpec):
        for part in ("flops", "bandwidth"):
            checks.positive(f"gpu.{part}", getattr(gpu_, part))
        checks.positive("gpu.memory", gpu_.memory, allow_zero=True)
        return shape, gpu_
    return shape, gpu(gpu_)


def _checked(model, gpu_, dtype, tp) -> tuple[Shape, GPUSpec, str, int]:
    """The checks every public prediction applies: model, GPU, a dtype it runs, a TP degree that
    splits the model and that the GPU can talk at."""
    dtype = checks.choice("dtype", dtype, WEIGHT_BYTES)
    tp = checks.whole("tp", tp)
    shape, spec = _resolve(model, gpu_)
    check_tp_degree(tp, heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate)
    if dtype == "bf16" and not spec.bf16:
        raise ValueError(
            f"gpu {spec.name!r} has no native bf16 (a Turing GPU): use dtype='fp16', which it "
            "runs at the same bytes per weight"
        )
    if tp > 1 and not spec.link_bandwidth:
        raise ValueError(
            f"tp={tp} needs a link between devices, and gpu {spec.name!r} has none (a machine "
            "measured here is one device): use tp=1, or give it one with "
            "dataclasses.replace(spec, link_bandwidth=bytes_per_s)"
        )
    return shape, spec, dtype, tp


def predict(
    *, model="llama-2-7b", gpu="a100-80gb-sxm", dtype="fp16", tp=1, batch=1,
    prompt_tokens=128, new_tokens=128,
) -> Prediction:  # fmt: skip
    """Latency, throughput and memory of serving `batch` requests; see the module docstring.

    `gpu`: a name from `data/published_hardware.csv` (run by the `compiled` engine), or a
    `GPUSpec` (`planner.gpu(name, engine)`, `spec_from_ceilings(...)`, `calibrate(...)`)."""
    shape, spec, dtype, tp = _checked(model, gpu, dtype, tp)
    batch = checks.whole("batch", batch)
    prompt_tokens = checks.whole("prompt_tokens", prompt_tokens)
    new_tokens = checks.whole("new_tokens", new_tokens)

    prefill = step_time(shape, spec, dtype, tp, batch, prompt_tokens, prompt_tokens)
    decode = step_time(shape, spec, dtype, tp, batch, 1, prompt_tokens + new_tokens // 2)
    ttft, tpot = _total(prefill), _total(decode)
    latency = ttft + (new_tokens - 1) * tpot
    context = prompt_tokens + new_tokens
    act = VALUE_BYTES[dtype]
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
              "overhead": decode["overhead"], "communication": decode["communication"]}  # fmt: skip
    return Prediction(
        ttft_s=ttft, tpot_s=tpot, latency_s=latency, tokens_per_s=batch * new_tokens / latency,
        memory_per_gpu_bytes=memory, fits=fits, bound=max(limits, key=limits.get),
        reason=reason, decode_parts_s=decode,
    )  # fmt: skip


def step_seconds(*, model, gpu, dtype: str, tp: int = 1, batch: int, tokens: int,
                 context: int) -> float:  # fmt: skip
    """Predicted seconds of one forward pass: `batch` sequences, `tokens` new tokens each,
    attending to `context` positions (a serving engine's step-time model)."""
    shape, spec, dtype, tp = _checked(model, gpu, dtype, tp)
    batch = checks.whole("batch", batch)
    tokens = checks.whole("tokens", tokens)
    context = checks.whole("context", context, minimum=0)
    return _total(step_time(shape, spec, dtype, tp, batch, tokens, context))


def step_seconds_function(*, model, gpu, dtype: str, tp: int = 1):
    """`step_seconds` with model, GPU, dtype and TP checked once: a function
    (batch, tokens, context) -> seconds for a loop that calls it at every step."""
    shape, spec, dtype, tp = _checked(model, gpu, dtype, tp)

    def seconds(batch: int, tokens: int, context: int) -> float:
        return _total(step_time(shape, spec, dtype, tp, batch, tokens, context))

    return seconds


def calibrate(measured, *, model, gpu, dtype: str) -> GPUSpec:
    """`gpu` refitted to a measured sweep: TPOT ≈ overhead + slope × (first-principles time).

    `measured`: rows with `batch`, `prompt`, `new_tokens` and the measured `tpot_s`. The
    intercept becomes the engine's per-step overhead and the slope divides its efficiency."""
    shape, spec, dtype, _ = _checked(model, gpu, dtype, 1)
    rows = _measured_rows(measured)
    ideal = dataclasses.replace(spec, engine=dataclasses.replace(
        spec.engine, step_s=0.0, layer_s=0.0))  # fmt: skip
    x = [
        _total(step_time(shape, ideal, dtype, 1, int(r.batch), 1,
                         int(r.prompt) + int(r.new_tokens) // 2))
        for r in rows.itertuples()
    ]  # fmt: skip
    if len(set(x)) < 2:
        raise ValueError(
            f"the {len(rows)} measured rows all predict the same work (batch, prompt and "
            "new_tokens alike): measure at least two batch sizes"
        )
    slope, intercept = np.polyfit(x, rows.tpot_s.to_numpy(), 1)
    if slope <= 0:
        raise ValueError("the measured times do not grow with the predicted work: measure a "
                         "wider range of batches")  # fmt: skip
    engine = dataclasses.replace(
        spec.engine, name=f"{spec.engine.name}, calibrated", step_s=max(intercept, 0.0),
        layer_s=0.0, memory_efficiency=spec.engine.memory_efficiency / slope,
    )  # fmt: skip
    rates = {m: r / slope for m, r in spec.linear_flops.items()}
    return dataclasses.replace(spec, engine=engine, linear_flops=rates,
                               fp32_flops=_square_flops(spec, "fp32") / slope,
                               flops=spec.flops / slope)  # fmt: skip


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
        raise ValueError(f"measured lacks the column(s) {missing}: each row needs "
                         f"{list(_MEASURED_COLUMNS)}")  # fmt: skip
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


def candidates(
    model, gpu, gpus: int, prompt_tokens: int = 512, new_tokens: int = 128,
    dtypes=("fp16", "int8", "int4"), batches=tuple(2**k for k in range(11)),
) -> pd.DataFrame:  # fmt: skip
    """Every (precision, TP, batch) on `gpus` GPUs, as predicted; replicas = gpus // tp."""
    gpus = checks.whole("gpus", gpus)
    dtypes = checks.names("dtypes", dtypes, WEIGHT_BYTES)
    prompt_tokens = checks.whole("prompt_tokens", prompt_tokens)
    new_tokens = checks.whole("new_tokens", new_tokens)
    if isinstance(batches, str) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be a list of batch sizes, e.g. (1, 8, 64), got {batches!r}")
    batches = [checks.whole("batches", b) for b in batches]
    if not batches:
        raise ValueError("batches is empty: give at least one batch size, e.g. (1, 8, 64)")
    shape, spec = _resolve(model, gpu)
    rows = []
    for dtype in dtypes:
        degrees = (1, 2, 4, 8) if spec.link_bandwidth else (1,)  # no link: one device each
        for tp in (t for t in degrees if t <= gpus and shape.kv_heads % t == 0):
            for batch in batches:
                p = predict(
                    model=model,
                    gpu=spec,
                    dtype=dtype,
                    tp=tp,
                    batch=batch,
                    prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens,
                )
                rows.append({
                    "dtype": dtype, "tp": tp, "batch": batch, "replicas": gpus // tp,
                    "tpot_ms": p.tpot_s * 1e3, "latency_s": p.latency_s, "fits": p.fits,
                    "tokens_per_s": p.tokens_per_s * (gpus // tp), "bound": p.bound,
                })  # fmt: skip
    return pd.DataFrame(rows)


def best_config(model, gpu, gpus: int, tpot_budget_ms: float, **kwargs) -> pd.Series | None:
    """The configuration with the most tokens/s across `gpus` GPUs whose time per output token
    stays within the budget (None if nothing fits the budget)."""
    checks.positive("tpot_budget_ms", tpot_budget_ms)
    table = candidates(model, gpu, gpus, **kwargs)
    ok = table[table.fits & (table.tpot_ms <= tpot_budget_ms)]
    return None if ok.empty else ok.loc[ok.tokens_per_s.idxmax()]


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
    row's engine on its GPU at its TP, batch and prompt, in the row's unit, with the error."""
    roles = checks.names("roles", roles, ("check", "calibration"))
    rows = []
    table = published_results()
    for r in table[table.role.isin(roles)].itertuples():
        p = predict(model=r.model, gpu=gpu(r.gpu, r.engine), dtype=r.dtype, tp=int(r.tp),
                    batch=int(r.batch), prompt_tokens=int(r.prompt_tokens),
                    new_tokens=128 if r.metric == "tokens_per_s_total" else 200)  # fmt: skip
        unit, predicted, published = _PUBLISHED_UNITS[r.metric]
        rows.append({"source": r.source, "role": r.role, "model": r.model, "gpu": r.gpu,
                     "engine": r.engine, "dtype": r.dtype, "tp": int(r.tp), "batch": int(r.batch),
                     "metric": unit, "published": published(r.value),
                     "predicted": predicted(p)})  # fmt: skip
    out = pd.DataFrame(rows)
    return out.assign(error=out.predicted / out.published - 1)
