"""The published tables the planner reads, and the engine presets derived from them.

A GPU is always modelled together with the software that runs it. What that software adds to
every forward pass — a fixed cost per layer, the fixed latency α of an all-reduce, the extra work
of widening quantized weights, a serving engine's host work per step (API server, scheduler,
detokenizer) — is an `OverheadPreset`. The presets (`eager`, `compiled`, `production`, and the
serving engines `vllm-0.5` and `vllm`, which add a per-step host cost to production's kernels) are
derived in the open from cited measurements (`data/published_results.csv` and
`data/published_serving_runs.csv`, rows whose `role` is `calibration`), one function per
derivation, each row worded the same way:

    the published time − what first principles already explain, ÷ how many times it is paid

`derive_engines()` shows every constant beside its derivation; `engines()` builds the presets
from that table. `hardware()` reads `data/published_hardware.csv` (datasheet figures).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from helpers import DATA_DIR
from helpers.shapes import WEIGHT_BYTES, Shape, kv_cache_bytes

# Fraction of dense peak FLOP/s a large matmul reaches where no measurement is published:
# the published achievable figures give 795/989 = 0.80 (H100) and 271/312 = 0.87 (A100).
COMPUTE_EFFICIENCY = 0.8
# gpt-fast's README: an A100-80GB (power-limited to 330 W) reaches "about 1700 GB/s" of its
# 2039 GB/s datasheet bandwidth in practice. The same fraction is used for every GPU.
MEMORY_EFFICIENCY = 1700 / 2039
# NVLink datasheet figures (600 GB/s A100, 900 GB/s H100/H200) add both directions; an
# all-reduce's bus traffic runs in one direction per link, so it sees half.
NVLINK_DIRECTIONS = 2

ENGINE_NAMES = ("eager", "compiled", "production", "vllm-0.5", "vllm")
DEFAULT_ENGINE = "compiled"


@dataclass(frozen=True)
class OverheadPreset:
    """What an engine's software adds to every forward pass, beyond moving bytes and FLOPs."""

    name: str
    step_s: float = 0.0  # fixed per pass: sampling, scheduling, Python around the model
    layer_s: float = 0.0  # per layer: launching (or dispatching) that layer's kernels
    allreduce_s: float = 0.0  # α of one all-reduce between 2 GPUs
    allreduce_per_rank_s: float = 0.0  # α grows by this for each further rank
    memory_efficiency: float = 1.0  # fraction of the spec's bandwidth its kernels reach
    dequant_flops: dict = field(default_factory=dict)  # extra work per weight (weight-only formats)
    source: str = ""

    def overhead_s(self, layers: int) -> float:
        return self.step_s + layers * self.layer_s

    def alpha_s(self, tp: int) -> float:
        return self.allreduce_s + self.allreduce_per_rank_s * (tp - 2)


# --- Published tables --------------------------------------------------------------------------


@functools.cache
def published_results() -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / "published_results.csv")


@functools.cache
def published_serving_runs() -> pd.DataFrame:
    """Published serving benchmarks (`data/published_serving_runs.csv`): fixed concurrency or
    batch, fixed lengths, client-side metrics; `role` calibration or check, as above."""
    return pd.read_csv(DATA_DIR / "published_serving_runs.csv")


def _tflops(row, column: str) -> float | None:
    value = getattr(row, column, float("nan"))
    return float(value) * 1e12 if pd.notna(value) else None


@functools.cache
def hardware() -> dict[str, dict]:
    """Each datasheet GPU's figures, as the planner's `GPUSpec` fields (achievable FLOP/s)."""
    out = {}
    for r in pd.read_csv(DATA_DIR / "published_hardware.csv").itertuples():
        peak = _tflops(r, "dense_bf16_tflops") or _tflops(r, "dense_fp16_tflops")
        achievable = _tflops(r, "achievable_bf16_tflops")  # a published figure: used as is
        fp8 = _tflops(r, "dense_fp8_tflops")  # None: no fp8 tensor cores
        if pd.notna(r.interconnect_gbs):
            link, kind = r.interconnect_gbs * 1e9 / NVLINK_DIRECTIONS, "nvlink"
        else:
            link, kind = r.pcie_gbs * 1e9, "pcie"
        out[r.gpu] = {
            "flops": achievable or peak * COMPUTE_EFFICIENCY,
            "bandwidth": r.memory_bandwidth_gbs * 1e9,
            "memory": r.memory_gb * 1e9,
            "link_bandwidth": link,
            "link": kind,
            "bf16": bool(pd.notna(r.dense_bf16_tflops)),
            "fp8_flops": fp8 * COMPUTE_EFFICIENCY if fp8 else None,
        }
    return out


# --- One function per derivation ---------------------------------------------------------------


def _published_ms(source: str, model: str, dtype: str, tp: int) -> float:
    """ms per token of one published row (converted from tokens/s where needed)."""
    t = published_results()
    speed = t.metric.isin(["tokens_per_s", "ms_per_token"])
    r = t[(t.source == source) & (t.model == model) & (t.dtype == dtype) & (t.tp == tp) & speed]
    r = r.iloc[0]
    return r.value if r.metric == "ms_per_token" else 1e3 / r.value


def _floor_ms(model: str, gpu: str, dtype: str, tp: int, context: int = 0) -> float:
    """Weight (+ KV) bytes ÷ achievable bandwidth, ms: the part of a step no engine avoids."""
    shape = Shape.of(model)
    bytes_ = shape.linear_params * WEIGHT_BYTES[dtype] + kv_cache_bytes(shape, 1, context, 2)
    return bytes_ / tp / (hardware()[gpu]["bandwidth"] * MEMORY_EFFICIENCY) * 1e3


def _row(engine, constant, value, unit, measured, minus, per) -> dict:
    """One derivation, worded one way: `measured` − each of `minus` (label, ms), ÷ `per`."""
    text = " − ".join([measured, *(f"{label} {ms:.2f} ms" for label, ms in minus)])
    return {
        "engine": engine,
        "constant": constant,
        "value": value,
        "unit": unit,
        "derivation": f"({text}) ÷ {per}",
    }


def _per_layer(engine, source, model, gpu, dtype, context=0) -> dict:
    """layer_s: a batch-1 TP 1 time beyond its byte floor, paid once per layer."""
    layers, ms = Shape.of(model).layers, _published_ms(source, model, dtype, 1)
    floor = _floor_ms(model, gpu, dtype, 1, context)
    value = (ms - floor) / layers / 1e3
    label = "weight and KV floor" if context else "weight floor"
    return _row(
        engine,
        "layer_s",
        value,
        "s",
        f"{source} TP1 {ms:.2f} ms",
        [(label, floor)],
        f"{layers} layers",
    )


def _alpha(engine, source, model, gpu, dtype, tp, layer_s, context=0) -> dict:
    """α at one TP degree: the time beyond the floor and the layers' overhead, per all-reduce."""
    layers, ms = Shape.of(model).layers, _published_ms(source, model, dtype, tp)
    floor, overhead = _floor_ms(model, gpu, dtype, tp, context), layers * layer_s * 1e3
    value = (ms - floor - overhead) / (2 * layers) / 1e3
    return _row(
        engine,
        f"alpha_s[tp={tp}]",
        value,
        "s",
        f"{source} TP{tp} {ms:.2f} ms",
        [("floor", floor), ("layer overhead", overhead)],
        f"(2 · {layers} all-reduces)",
    )


def _alpha_fit(engine, alphas: list[dict]) -> list[dict]:
    """α(tp) = α(2) + slope · (tp − 2), fitted through the α of several TP degrees."""
    tps = [int(a["constant"].split("=")[1].rstrip("]")) for a in alphas]
    slope, alpha2 = np.polyfit(np.array(tps) - 2, [a["value"] for a in alphas], 1)
    fit = f"a line through α at TP {', '.join(map(str, tps))}"
    return [
        {
            "engine": engine,
            "constant": "allreduce_s",
            "value": alpha2,
            "unit": "s",
            "derivation": f"{fit}: its value at TP 2",
        },
        {
            "engine": engine,
            "constant": "allreduce_per_rank_s",
            "value": max(slope, 0.0),
            "unit": "s",
            "derivation": f"{fit}: its slope per further rank (≥ 0)",
        },
    ]


def _dequant(engine, source, model, gpu, dtype, layer_s) -> dict:
    """Extra FLOPs per weight of a weight-only format: its time beyond floor and overhead."""
    shape, ms = Shape.of(model), _published_ms(source, model, dtype, 1)
    floor, overhead = _floor_ms(model, gpu, dtype, 1), shape.layers * layer_s * 1e3
    flops = hardware()[gpu]["flops"]
    value = (ms - floor - overhead) / 1e3 * flops / shape.linear_params
    return _row(
        engine,
        f"dequant_flops[{dtype}]",
        value,
        "FLOP per weight",
        f"{source} {dtype} {ms:.2f} ms",
        [("floor", floor), ("layer overhead", overhead)],
        f"({shape.linear_params:.3g} weights ÷ {gpu} {flops:.3g} FLOP/s)",
    )


def _compiled() -> list[dict]:
    """gpt-fast: Llama-2-7B bf16 on A100-80GB, batch 1, TP 1/2/4/8, int8 and int4 (CUDA graphs)."""
    args = ("gpt-fast", "llama-2-7b", "a100-80gb-sxm")
    layer = _per_layer("compiled", *args, "bf16")
    alphas = [_alpha("compiled", *args, "bf16", t, layer["value"]) for t in (2, 4, 8)]
    dequant = [_dequant("compiled", *args, dt, layer["value"]) for dt in ("int8", "int4")]
    fp8 = {
        **dequant[0],
        "constant": "dequant_flops[fp8]",
        "derivation": "taken as int8's: an 8-bit weight widened to 16 bits before the multiply "
        "(W8A16); no published batch-1 fp8 weight-only time on this engine to derive it",
    }
    return [layer, *alphas, *_alpha_fit("compiled", alphas), *dequant, fp8]


def _production() -> list[dict]:
    """FasterTransformer: a 13B Llama shape in fp16 on A100-40GB, batch 1, 512 context, TP 1/2."""
    args = ("llm-analysis", "llama-2-13b", "a100-40gb", "fp16")
    layer = _per_layer("production", *args, context=512)
    alpha = _alpha("production", *args, 2, layer["value"], context=512)
    return [layer, alpha, {**alpha, "constant": "allreduce_s", "derivation": "α at TP 2 (above)"}]


def _eager(production_alpha: float) -> list[dict]:
    """PyTorch eager (the gpt-fast blog's baseline); every kernel launched from Python, so the
    cost is the host CPU's: the course's own loop on the lent H200's host is shown beside it."""
    rows = [_per_layer("eager", "gpt-fast-blog", "llama-2-7b", "a100-80gb-sxm", "bf16")]
    rows.append(
        {
            "engine": "eager",
            "constant": "allreduce_s",
            "value": production_alpha,
            "unit": "s",
            "derivation": "as production's (both call NCCL)",
        }
    )
    measured = pd.read_csv(DATA_DIR / "measured" / "h200_decode.csv")
    loop = measured[(measured.method == "static-cache loop") & (measured.batch == 1)]
    for r in loop.itertuples():  # its floor already uses the bandwidth measured there
        layers = Shape.of(r.model).layers
        rows.append(
            _row(
                "eager (H200 host, for comparison)",
                f"layer_s[{r.model}]",
                (r.tpot_s - r.floor_s) / layers,
                "s",
                f"course loop on the lent H200 {r.tpot_s * 1e3:.2f} ms",
                [("its measured floor", r.floor_s * 1e3)],
                f"{layers} layers",
            )
        )
    return rows


def _serving_row(source: str, metric: str) -> float:
    t = published_serving_runs()
    return float(t[(t.source == source) & (t.metric == metric)].value.iloc[0])


def _like_production(engine: str, production: list[dict]) -> list[dict]:
    """A serving engine runs its model as a production engine does (CUDA graphs, NCCL): the
    per-layer cost and α are production's; only the per-step host cost is its own."""
    rows = [r for r in production if r["constant"] in ("layer_s", "allreduce_s")]
    return [{**r, "engine": engine, "derivation": "as production's"} for r in rows]


def _vllm_05(layer_s: float) -> dict:
    """vLLM 0.5.3's host cost per step, from its own profile (Llama-3-8B bf16, one H100): the GPU
    ran 38 % of the time, the API server 33 % and the scheduler 29 %, one after the other, so the
    host took (33 + 29) ÷ 38 = 1.63 GPU steps. The GPU step is the planner's memory-bound one
    (weight floor + layers × layer_s: a decode batch whose KV reads are small)."""
    src, model, gpu = "vllm-perf-blog-0.6", "llama-3-8b", "h100-sxm"
    host = _serving_row(src, "api_server_share") + _serving_row(src, "scheduling_share")
    gpu_share = _serving_row(src, "gpu_share")
    step_ms = _floor_ms(model, gpu, "bf16", 1) + Shape.of(model).layers * layer_s * 1e3
    return {
        "engine": "vllm-0.5",
        "constant": "step_s",
        "value": step_ms * host / gpu_share / 1e3,
        "unit": "s",
        "derivation": f"GPU step {step_ms:.2f} ms (weight floor + layer overhead) × (API server "
        f"{host - _serving_row(src, 'scheduling_share'):.0%} + scheduling "
        f"{_serving_row(src, 'scheduling_share'):.0%}) ÷ GPU {gpu_share:.0%} ({src})",
    }


def _vllm(layer_s: float) -> dict:
    """Current vLLM's host cost per step: its CI latency test (Llama-3.1-8B bf16 on one H200,
    batch 8, 32 tokens in, 128 out) ÷ 128 steps, minus the planner's step (weight and KV floor
    at the mean context, layers × layer_s); the prefill of 8 × 32 tokens is within rounding."""
    src, model, gpu = "vllm-ci-benchmark", "llama-3-8b", "h200"
    t = published_serving_runs()
    r = t[(t.source == src) & (t.model == model) & (t.role == "calibration")].iloc[0]
    steps, batch = int(r.output_tokens), int(r.concurrency)
    context = batch * (int(r.input_tokens) + steps // 2)
    floor = _floor_ms(model, gpu, "bf16", 1, context)
    overhead = Shape.of(model).layers * layer_s * 1e3
    return _row(
        "vllm",
        "step_s",
        (r.value / steps - floor - overhead) / 1e3,
        "s",
        f"{src} {r.value:.1f} ms ÷ {steps} steps",
        [("weight and KV floor", floor), ("layer overhead", overhead)],
        "1 step",
    )


def derive_engines() -> pd.DataFrame:
    """Every engine constant and the published rows it comes from, step by step."""
    production = _production()
    alpha = next(r["value"] for r in production if r["constant"] == "allreduce_s")
    layer_s = next(r["value"] for r in production if r["constant"] == "layer_s")
    serving = [
        *_like_production("vllm-0.5", production),
        _vllm_05(layer_s),
        *_like_production("vllm", production),
        _vllm(layer_s),
    ]
    return pd.DataFrame([*_compiled(), *production, *_eager(alpha), *serving])


@functools.cache
def engines() -> dict[str, OverheadPreset]:
    """The engine presets, with the constants `derive_engines()` shows."""
    d = derive_engines().set_index(["engine", "constant"]).value
    dequant = {dt: d["compiled", f"dequant_flops[{dt}]"] for dt in ("int8", "int4", "fp8")}
    source = "derived in helpers.engines.derive_engines() from data/published_results.csv"
    return {
        name: OverheadPreset(
            name,
            step_s=float(d.get((name, "step_s"), 0.0)),
            layer_s=d[name, "layer_s"],
            allreduce_s=d[name, "allreduce_s"],
            allreduce_per_rank_s=d["compiled", "allreduce_per_rank_s"],
            memory_efficiency=MEMORY_EFFICIENCY,
            dequant_flops=dequant,
            source=source,
        )
        for name in ENGINE_NAMES
    }
