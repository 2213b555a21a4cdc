"""The third limit: fixed costs that do not shrink with the work (dispatch, launches, Python).

Bandwidth and arithmetic bound a step from below by its bytes and FLOPs. Overhead is what a step
costs even when it moves almost nothing: every operation is dispatched by Python and the framework
and (on a GPU) launched as a kernel. We measure it three ways:

* `op_overhead`: one tiny operation, many times (on CUDA: asynchronous launches, and a launch
  followed by a synchronise);
* `step_overhead`: one decode step of a Llama with the real number of layers but tiny widths, so
  bytes and FLOPs are ≈ 0 and what is left is the per-step and per-layer cost;
* `linear_rates`: the FLOP/s that decode-shaped (skinny) matrix products reach at each batch,
  which is far below a square matmul's peak at small batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from helpers.bench import measure, synchronize
from helpers.decode import greedy_decode
from helpers.device import as_device, last_level_cache, streamed_size
from helpers.models import llama_from_config


@dataclass(frozen=True)
class LineFit:
    """time ≈ intercept + slope · x, from least squares."""

    intercept: float
    slope: float

    def __call__(self, x):
        return self.intercept + self.slope * np.asarray(x, dtype=float)


def fit_line(x, y) -> LineFit:
    """Least-squares line through (x, y); needs two distinct x values."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(x.tolist())) < 2:
        raise ValueError("fit_line needs measurements at two or more different x values")
    slope, intercept = np.polyfit(x, y, 1)
    return LineFit(float(intercept), float(slope))


def op_overhead(device, repeats: int = 7, ops: int = 200) -> pd.DataFrame:
    """Seconds per tiny operation: back to back, and (on CUDA) each followed by a synchronise."""
    device = as_device(device)
    x = torch.zeros(1, device=device)

    def many():
        for _ in range(ops):
            x.add_(1.0)

    def one_and_sync():
        x.add_(1.0)
        synchronize(device)

    rows = [measure(many, name="tiny op, back to back", repeats=repeats, device=device)]
    if device.type == "cuda":
        rows.append(measure(one_and_sync, name="launch + synchronize", repeats=repeats * 10))
        scale = [ops, 1]
    else:
        scale = [ops]
    return pd.DataFrame(
        [
            t.row(seconds_per_op=t.median / n, q1_per_op=t.q1 / n, q3_per_op=t.q3 / n)
            for t, n in zip(rows, scale, strict=True)
        ]
    )


def tiny_llama(layers: int, device, dtype=torch.float32):
    """A random Llama with `layers` layers and tiny widths: its step is almost pure overhead."""
    return llama_from_config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        dtype=dtype,
        device=device,
    )


def step_times(model, batch: int = 1, steps: int = 24, compiled: bool = False) -> dict:
    """Median and quartiles of one decode step of `model`, and how long compiling took."""
    param = next(model.parameters())
    ids = torch.zeros(batch, 4, dtype=torch.long, device=param.device)
    warm = greedy_decode(model, ids, steps, compiled=compiled)  # warm-up (and compile, if asked)
    row = greedy_decode(model, ids, steps, compiled=compiled).row()
    return {
        "step_s": row["tpot_s"],
        "q1_s": row["tpot_q1_s"],
        "q3_s": row["tpot_q3_s"],
        "mode": row["mode"],
        "setup_s": warm.setup_s,
    }


def step_overhead(device, layer_counts=(1, 8, 16, 30), dtype=torch.float32) -> pd.DataFrame:
    """Eager decode-step time of tiny-width Llamas with each layer count (bytes, FLOPs ≈ 0)."""
    device = as_device(device)
    rows = []
    for layers in layer_counts:
        times = step_times(tiny_llama(layers, device, dtype))
        rows.append({"layers": layers, **times})
    return pd.DataFrame(rows)


def _distinct_weights(count: int, n: int, device, dtype) -> list[torch.Tensor]:
    """`count` distinct n × n weights, as views of one allocation: freed at once and given back
    to the operating system (hundreds of separate few-MiB tensors stay in the allocator's heap
    after they are freed, which held ~0.9 GiB after notebook 00's sweeps on a 480 MiB-L3 CPU)."""
    block = torch.randn(count, n, n, device=device, dtype=dtype)
    return list(block.unbind(0))


def linear_rates(
    device,
    dtype=torch.float32,
    batches=(1, 2, 4, 8, 16, 32, 64),
    width: int = 1024,
    total_bytes: float = 128e6,
    repeats: int = 5,
) -> pd.DataFrame:
    """FLOP/s of decode-shaped products: `batch` rows times square weights of `width`, over
    enough distinct weights (`total_bytes`, grown to twice the last-level cache) that they stream
    from memory as a model's do."""
    device = as_device(device)
    itemsize = torch.finfo(dtype).bits // 8
    total_bytes, _ = streamed_size(device, int(total_bytes))
    count = max(2, int(total_bytes // (width * width * itemsize)))
    weights = _distinct_weights(count, width, device, dtype)
    rows = []
    for batch in batches:
        x = torch.randn(batch, width, device=device, dtype=dtype)

        def run(x=x):
            for w in weights:
                F.linear(x, w)

        t = measure(run, repeats=repeats, device=device)
        flops = 2 * batch * width * width * count
        rows.append(
            t.row(
                batch=batch,
                flops=flops,
                weight_bytes=count * width * width * itemsize,
                flops_per_s=flops / t.median,
            )
        )
    return pd.DataFrame(rows)


def work_sweep(
    device,
    dtype=torch.float32,
    bandwidth: float = 1.0,
    peak_flops: float = 1.0,
    shapes=(
        (1, 16),
        (1, 64),
        (1, 256),
        (1, 1024),
        (1, 4096),
        (256, 1024),
        (1024, 1024),
        (2048, 2048),
    ),
    total_bytes: float = 128e6,
    repeats: int = 5,
) -> pd.DataFrame:
    """One product `x (rows × n) · Wᵀ (n × n)` per shape, from tiny to large, timed per product.

    Each row gives the product's bytes and FLOPs, its first-principles time
    max(bytes ÷ `bandwidth`, FLOPs ÷ `peak_flops`) and the measured time. Matrix-vector shapes
    cycle through distinct copies of the weight totalling `total_bytes` (at least twice the
    last-level cache), so they stream from memory, not from cache; `cached` says where the
    copies could not outgrow the cache (memory cap)."""
    device = as_device(device)
    itemsize = torch.finfo(dtype).bits // 8
    total_bytes, _ = streamed_size(device, int(total_bytes))
    need = 2 * last_level_cache(device)
    rows = []
    for m, n in shapes:
        streaming = m == 1  # only matrix-vector products need copies to defeat the cache
        copies = total_bytes // (n * n * itemsize)  # tiny ones sit on the overhead anyway
        count = int(min(256, max(1, copies))) if streaming else 1
        weights = _distinct_weights(count, n, device, dtype)
        x = torch.randn(m, n, device=device, dtype=dtype)

        def run(x=x, weights=weights):
            for w in weights:
                F.linear(x, w)

        t = measure(run, repeats=repeats, device=device)
        nbytes, flops = (2 * m * n + n * n) * itemsize, 2 * m * n * n
        rows.append(
            {
                "rows": m,
                "n": n,
                "bytes": nbytes,
                "flops": flops,
                "memory_s": nbytes / bandwidth,
                "compute_s": flops / peak_flops,
                "measured_s": t.median / count,
                "q1_s": t.q1 / count,
                "q3_s": t.q3 / count,
                "cached": streaming and count * n * n * itemsize < need,
            }
        )
        del weights
    return pd.DataFrame(rows)
