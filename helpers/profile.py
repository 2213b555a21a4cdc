"""Where the time of one step goes: a profile grouped into categories, each with a prediction.

Horace He's method ("Making Deep Learning Go Brrrr From First Principles"): count the
operations, multiply by what each costs, compare with the profile. `op_table` runs a function
under `torch.profiler` and returns one row per ATen operation (calls, self time, bytes it
allocated) per call of the function; `breakdown` sums them into `CATEGORIES`, plus the time
between operations (Python, module calls), which the profiler sees as the step's wall time minus
every operation's own time. So the categories add up to the profiled step exactly.

`predict_decode_step` gives the same categories from first principles for a decode step:
weight bytes ÷ bandwidth (or FLOPs ÷ the measured rate of decode-shaped products, whichever is
slower), KV-cache bytes ÷ bandwidth for attention, and for every operation the per-op cost
`per_op_costs` measures on a loop of tiny operations (its ATen part, and the Python part
between operations).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from helpers.bench import synchronize
from helpers.decode import KVCache, decode_one_token
from helpers.memory import weight_bytes
from helpers.noise import quiet_native_stderr
from helpers.planner import skinny_rate
from helpers.shapes import Shape

CPU = ProfilerActivity.CPU
MATMULS = "weight matmuls"
ATTENTION = "attention"
ELEMENTWISE = "norms, rotary, elementwise"
MOVEMENT = "data movement"
FRAMEWORK = "framework ops (views, wrappers)"
PYTHON = "Python between ops"
CATEGORIES = (MATMULS, ATTENTION, ELEMENTWISE, MOVEMENT, FRAMEWORK, PYTHON)

_PATTERNS = [  # first match wins; names are ATen's (aten::mm) or a library's (quantized::…)
    (
        MATMULS,
        r"::(mm|addmm|bmm|_int_mm|_weight_int\w*pack\w*mm\w*|linear_dynamic\w*|"
        r"_linear_pointwise|_mkl_linear|mkldnn_linear)$|quantized::linear",
    ),
    (ATTENTION, r"scaled_dot_product|flash_attention|efficient_attention|_softmax|softmax"),
    (
        MOVEMENT,
        r"::(copy_|index_copy_?|cat|index|index_select|embedding|_to_copy|clone|"
        r"contiguous|fill_|zero_|zeros|ones|empty\w*|stack|gather|scatter\w*|"
        r"narrow_copy|masked_fill_?|arange|resize_)$",
    ),
    (
        FRAMEWORK,
        r"::(view|reshape|_reshape_alias|transpose|t|as_strided|slice|select|unsqueeze|"
        r"squeeze|expand|_unsafe_view|narrow|linear|matmul|to|detach|alias|lift_fresh|"
        r"permute|split|chunk|unbind|numpy_T|_has_compatible_shallow_copy_type|item|"
        r"_local_scalar_dense|result_type|scaled_dot_product_attention)$",
    ),
]


def category(op: str) -> str:
    """The category of one profiled operation name; arithmetic by default."""
    if op == "aten::scaled_dot_product_attention":
        return FRAMEWORK  # the dispatcher's wrapper; its kernel is a child op of its own
    for name, pattern in _PATTERNS:
        if re.search(pattern, op):
            return name
    return ELEMENTWISE


def op_table(
    fn: Callable[[], object], repeats: int = 3, warmup: int = 1, memory: bool = False, device=None
) -> pd.DataFrame:
    """`fn()` profiled `repeats` times: one row per operation name, per call of `fn`.

    Columns: op, category, calls, top_calls (called from Python, not from another op), self_s
    (host time inside the op, its children excluded), device_s (on a CUDA device: the GPU time
    of its kernels; 0 elsewhere), self_bytes (bytes it allocated, if `memory`).
    attrs: profiled_s (wall time of one call under the profiler), wall_s (median wall time of
    one call without it: the profiler's own cost is their difference)."""
    if not callable(fn):
        raise TypeError(f"op_table needs a function to call, got {type(fn).__name__}")
    for _ in range(warmup):
        fn()
    plain = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        plain.append(time.perf_counter() - start)
    on_gpu = torch.device(device or "cpu").type == "cuda"
    activities = [CPU, ProfilerActivity.CUDA] if on_gpu else [CPU]
    with quiet_native_stderr(), profile(activities=activities, profile_memory=memory) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        profiled_s = (time.perf_counter() - start) / repeats
    rows: dict[str, dict] = {}
    for event in prof.events():
        empty = {
            "op": event.name,
            "calls": 0,
            "top_calls": 0,
            "self_s": 0.0,
            "device_s": 0.0,
            "self_bytes": 0,
        }
        row = rows.setdefault(event.name, empty)
        row["calls"] += 1
        row["device_s"] += getattr(event, "self_device_time_total", 0) * 1e-6
        row["top_calls"] += event.cpu_parent is None
        row["self_s"] += event.self_cpu_time_total * 1e-6
        row["self_bytes"] += max(event.self_cpu_memory_usage, 0)
    numbers = ["calls", "top_calls", "self_s", "device_s", "self_bytes"]
    table = pd.DataFrame(list(rows.values()), columns=["op", *numbers])
    table[numbers] /= repeats
    table.insert(1, "category", table.op.map(category))
    table = table.sort_values("self_s", ascending=False, ignore_index=True)
    table.attrs.update(profiled_s=profiled_s, wall_s=float(np.median(plain)))
    return table


def breakdown(ops: pd.DataFrame) -> pd.DataFrame:
    """Seconds per category for one call (`op_table`'s rows); `PYTHON` is the profiled wall time
    minus every operation's own time. The rows add up to `ops.attrs['profiled_s']`. On a GPU
    `device_s` is each category's kernel time (it overlaps the host time, it does not add to it)."""
    if "profiled_s" not in ops.attrs:
        raise ValueError(
            "breakdown needs the table op_table returns (its attrs hold the wall time)"
        )
    columns = ["self_s", "calls", "device_s"] if "device_s" in ops else ["self_s", "calls"]
    grouped = ops.groupby("category")[columns].sum()
    grouped = grouped.reindex(CATEGORIES, fill_value=0.0)
    between = ops.attrs["profiled_s"] - ops.self_s.sum()
    grouped.loc[PYTHON] = [between, ops.top_calls.sum(), 0.0][: len(columns)]
    out = grouped.rename(columns={"self_s": "measured_s"}).rename_axis("category").reset_index()
    out["share"] = out.measured_s / ops.attrs["profiled_s"]
    return out


def per_op_costs(device=None, ops: int = 300, repeats: int = 3) -> dict[str, float]:
    """What one tiny operation costs here, split as the profile splits a step: `aten_s`, the
    time the profiler books inside the op (dispatch and a trivial kernel), and `python_s`, the
    time between ops (the Python that calls it)."""
    x = torch.zeros(1, device=device)

    def many():
        for _ in range(ops):
            x.add_(1.0)

    table = op_table(many, repeats=repeats, device=device)
    inside = table.self_s.sum() / ops
    return {"aten_s": inside, "python_s": table.attrs["profiled_s"] / ops - inside}


def decode_read_bytes(model) -> int:
    """Bytes one decode step reads for its weights: every parameter and buffer once (the course's
    int8/int4 linears keep their weights in buffers), except that an embedding table not shared
    with the output layer is read one row per token (a gather)."""
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and getattr(out, "weight", None) is embed
    table = 0 if tied else embed.numel() * embed.element_size()
    return weight_bytes(model, include_buffers=True) - table  # quantized weights can be buffers


def decode_step_ops(model, batch: int = 1, context: int = 64, repeats: int = 4) -> pd.DataFrame:
    """`op_table` of one decode step (`decode.decode_one_token`) of `model` at `batch` sequences
    with `context` positions in the cache."""
    param = next(model.parameters())
    cache = KVCache(model.config, batch, context, param.dtype, param.device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=param.device)
    pos = torch.tensor([context - 1], device=param.device)

    @torch.inference_mode()
    def step():
        return decode_one_token(model, token, cache, pos)

    return op_table(step, repeats=repeats, device=param.device)


def predict_decode_step(
    model,
    ops: pd.DataFrame,
    ceilings,
    costs: dict[str, float],
    batch: int = 1,
    context: int = 64,
    bandwidth: float | None = None,
) -> dict[str, float]:
    """First-principles seconds per category for the decode step profiled in `ops`.

    Kernels: weight matmuls max(bytes ÷ read bandwidth, FLOPs ÷ the measured rate of
    decode-shaped products at this batch); attention the KV cache's bytes ÷ bandwidth; the
    other kernels move a few activation vectors (≈ 0). Every op adds `costs['aten_s']`, and each
    op called from Python adds `costs['python_s']` (Horace He's count × cost). `bandwidth`:
    the read rate to use (default: the ceilings' rate beyond the cache; notebook 00 passes the
    rate measured over as many bytes as the step reads)."""
    shape = Shape.of(model.config)
    param = next(model.parameters())
    bw = bandwidth or ceilings.read_bandwidth
    matmul_bytes = decode_read_bytes(model)
    flops = 2 * batch * shape.linear_params
    rate = skinny_rate(ceilings.linear_flops, batch, ceilings.peak("fp32"))
    kv = 2 * shape.layers * batch * context * shape.kv_heads * shape.head_dim
    kernels = {
        MATMULS: max(matmul_bytes / bw, flops / rate),
        ATTENTION: kv * param.element_size() / bw,
    }
    calls = ops.groupby("category").calls.sum()
    predicted = {
        c: kernels.get(c, 0.0) + calls.get(c, 0.0) * costs["aten_s"] for c in CATEGORIES[:-1]
    }
    predicted[PYTHON] = ops.top_calls.sum() * costs["python_s"]
    return predicted


def compare(measured: pd.DataFrame, predicted: dict[str, float]) -> pd.DataFrame:
    """`breakdown`'s rows with the prediction beside each, in milliseconds, and their ratio."""
    out = measured.assign(predicted_s=measured.category.map(predicted))
    out["measured_ms"] = out.measured_s * 1e3
    out["predicted_ms"] = out.predicted_s * 1e3
    out["measured ÷ predicted"] = out.measured_s / out.predicted_s
    return out[
        ["category", "calls", "predicted_ms", "measured_ms", "measured ÷ predicted", "share"]
    ]
