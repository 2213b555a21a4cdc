"""Tensor parallelism's plumbing: the sharding plan of a Llama, timing a collective, the α–β model.

Notebook 03 writes the ideas themselves (the column and row splits, the Megatron MLP, the
prediction of a TP step) in its `idea` cells; this module holds what its measurements need:

* `COLWISE`, `ROWWISE`, `llama_plan`: which linears of a Llama DTensor splits by columns / rows;
* `slowest`, `fastest`, `timed_parts`: a TP layer timed on every rank in its parts — this rank's
  compute, the **skew** (from the first rank reaching the collective to the last), and the
  collective itself, timed alone after a barrier so that no rank's wait counts as communication;
* `fit_alpha_beta`: t(n) = α + β·n fitted to all-reduce timings;
* `miss_by_part`, `largest_miss`, `explain_miss`: which part of a TP layer a prediction got
  wrong, as numbers and as the sentence that says it.

The process launcher lives in `helpers.launch`; `launch`, `WorkerError` and `NotebookFunction`
are importable from here too, as `helpers.tp.launch` has always been.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from helpers import bench
from helpers.launch import NotebookFunction, WorkerError, launch  # noqa: F401 (helpers.tp.launch)

# --- Sharding a Llama ----------------------------------------------------------------------

# the layers a Megatron split shards: column-parallel, then row-parallel
COLWISE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def llama_plan(num_layers: int) -> dict:
    """DTensor's plan for a Llama: q/k/v/gate/up colwise, o/down rowwise, in every layer."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(num_layers):
        plan |= {f"model.layers.{i}.{name}": ColwiseParallel() for name in COLWISE}
        plan |= {f"model.layers.{i}.{name}": RowwiseParallel() for name in ROWWISE}
    return plan


# --- Timing a collective, on every rank ----------------------------------------------------


def _across_ranks(samples: list[float], device, op) -> list[float]:
    t = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def slowest(samples: list[float], device) -> list[float]:
    """Each timed run's slowest rank (a MAX all-reduce over the ranks, run by run): a collective
    ends for everyone only when the last rank arrives, so every rank waits for the slowest."""
    return _across_ranks(samples, device, dist.ReduceOp.MAX)


def fastest(samples: list[float], device) -> list[float]:
    """Each timed run's fastest rank (a MIN all-reduce over the ranks, run by run)."""
    return _across_ranks(samples, device, dist.ReduceOp.MIN)


def timed_parts(
    compute: Callable[[], torch.Tensor],
    collective: Callable[[torch.Tensor], object],
    device,
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """One TP layer, `collective(compute())`, timed run by run on every rank (call it on all).

    In one set of runs the parts: this rank's `compute`, then a barrier, then the `collective`
    alone — every rank enters it together, so its time is the collective's own and not a wait
    for a slower rank. In another set the whole layer as it really runs (no barrier inside).
    Returns seconds per timed run, the same on every rank: `compute` and `comm` (the slowest
    rank's), `skew` (from the first rank reaching the collective to the last: what the first
    waits inside a real all-reduce, from uneven work or uneven starts) and `total` (the whole
    layer, slowest rank). "total − compute" of one rank would count its wait as communication.
    The skew compares clock readings of the ranks: they must share a clock (one machine).
    """
    compute_s, arrived, comm_s = [], [], []

    def parts():
        out, seconds = bench.timed(compute, device)
        arrived.append(time.perf_counter())  # one clock for every process of a machine
        compute_s.append(seconds)
        dist.barrier()  # everyone starts the collective together
        comm_s.append(bench.timed(lambda: collective(out), device)[1])

    runs = dict(warmup=warmup, repeats=repeats, device=device, before_each=dist.barrier)
    bench.measure(parts, **runs)
    whole = bench.measure(lambda: collective(compute()), **runs)
    timed = slice(warmup, None)  # the runs bench.measure timed
    last, first = slowest(arrived[timed], device), fastest(arrived[timed], device)
    return {
        "total": slowest(whole.samples, device),
        "compute": slowest(compute_s[timed], device),
        "skew": [end - start for end, start in zip(last, first, strict=True)],
        "comm": slowest(comm_s[timed], device),
    }


# --- The α–β model of a collective ---------------------------------------------------------


def fit_alpha_beta(message_bytes, seconds) -> tuple[float, float]:
    """Fit t = α + β·n: α the fixed latency (s), β seconds per byte (1/bandwidth).

    Weighted by 1/t, so small messages (which set α) count as much as large ones (which set β).
    """
    n = np.asarray(message_bytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    beta, alpha = np.polyfit(n, t, 1, w=1 / t)
    return float(alpha), float(beta)


# --- Why a prediction missed ---------------------------------------------------------------

PART_NAMES = {
    "compute": "the matmuls (the slowest rank's)",
    "comm": "the all-reduce",
    "rest": "the rest of the total (whole-layer runs minus their parts: waits between the ranks, "
    "and load that changed between the runs)",
}


def miss_by_part(
    measured_s: float,
    compute_s: float,
    compute_predicted_s: float,
    comm_s: float,
    comm_predicted_s: float,
) -> dict[str, float]:
    """Seconds by which each part of a TP layer exceeded its prediction (TP 1 ÷ t, α + β·n):
    the slowest rank's compute, the all-reduce timed alone, and the rest of the measured total
    (predicted as 0). They add up to measured − predicted."""
    return {
        "compute": compute_s - compute_predicted_s,
        "comm": comm_s - comm_predicted_s,
        "rest": measured_s - compute_s - comm_s,
    }


def largest_miss(gaps: dict[str, float]) -> str:
    """The part (`compute`, `comm` or `rest`) that missed its prediction by the most."""
    return max(gaps, key=lambda k: abs(gaps[k]))


def explain_miss(
    measured_s: float,
    predicted_s: float,
    compute_s: float,
    compute_predicted_s: float,
    comm_s: float,
    comm_predicted_s: float,
    skew_s: float,
) -> str:
    """Which part of a TP layer its prediction (TP 1 ÷ t + α + β·n) got most wrong, in ms."""
    gaps = miss_by_part(measured_s, compute_s, compute_predicted_s, comm_s, comm_predicted_s)
    worst = largest_miss(gaps)
    more = "more" if gaps[worst] > 0 else "less"
    return (
        f"measured {measured_s * 1e3:.3g} ms vs predicted {predicted_s * 1e3:.3g} ms "
        f"({measured_s / predicted_s - 1:+.0%}): matmuls {compute_s * 1e3:.3g} ms vs "
        f"{compute_predicted_s * 1e3:.3g} (TP 1 ÷ t); all-reduce {comm_s * 1e3:.3g} ms vs "
        f"{comm_predicted_s * 1e3:.3g} (α + β·n); the rest {gaps['rest'] * 1e3:.3g} ms vs 0, "
        f"beside {skew_s * 1e3:.3g} ms of skew between the ranks' arrivals. "
        f"The largest gap: {PART_NAMES[worst]}, {abs(gaps[worst]) * 1e3:.3g} ms {more} than "
        "predicted."
    )
