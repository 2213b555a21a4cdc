"""Tensor parallelism's plumbing: the sharding plan of a Llama, timing a collective, the α–β model.

Notebook 03 writes the ideas themselves (the column and row splits, the Megatron MLP, the
prediction of a TP step) in its `idea` cells; this module holds what its measurements need:

* `COLWISE`, `ROWWISE`, `llama_plan`: which linears of a Llama DTensor splits by columns / rows;
* `slowest`, `fastest`, `timed_parts`: a TP layer timed on every rank in its parts — this rank's
  compute, the **skew** (how long the fastest rank waits for the slowest), and the collective
  itself, timed alone after a barrier so that no rank's wait is counted as communication;
* `fit_alpha_beta`: t(n) = α + β·n fitted to all-reduce timings.

The process launcher lives in `helpers.launch`; `launch`, `WorkerError` and `NotebookFunction`
are importable from here too, as `helpers.tp.launch` has always been.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from helpers import bench
from helpers.launch import (
    COLLECTIVE_BACKENDS,
    NotebookFunction,
    Results,
    WorkerError,
    check_world,
    default_backend,
    launch,
)

__all__ = [
    "COLLECTIVE_BACKENDS", "COLWISE", "ROWWISE", "NotebookFunction", "Results", "WorkerError",
    "check_world", "default_backend", "fastest", "fit_alpha_beta", "launch", "llama_plan",
    "slowest", "timed_parts",
]  # fmt: skip

# --- Sharding a Llama ----------------------------------------------------------------------

# the layers a Megatron split shards: column-parallel, then row-parallel
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
           "mlp.up_proj")  # fmt: skip
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
    Returns seconds per timed run, the same on every rank:
    `compute` and `comm` (the slowest rank's), `skew` (slowest − fastest rank's compute: what
    the fastest rank waits inside a real all-reduce) and `total` (the whole layer, slowest rank).
    A real layer costs about compute + comm; "total − compute" of a rank would add its skew.
    """
    compute_s, comm_s = [], []

    def parts():
        out, seconds = bench.timed(compute, device)
        compute_s.append(seconds)
        dist.barrier()  # everyone starts the collective together
        comm_s.append(bench.timed(lambda: collective(out), device)[1])

    runs = dict(warmup=warmup, repeats=repeats, device=device, before_each=dist.barrier)
    bench.measure(parts, **runs)
    whole = bench.measure(lambda: collective(compute()), **runs)
    compute_s, comm_s = compute_s[warmup:], comm_s[warmup:]  # the runs bench.measure timed
    high, low = slowest(compute_s, device), fastest(compute_s, device)
    return {
        "total": slowest(whole.samples, device),
        "compute": high,
        "skew": [h - lo for h, lo in zip(high, low, strict=True)],
        "comm": slowest(comm_s, device),
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
