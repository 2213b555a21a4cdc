"""Tensor parallelism: run a function on N ranks from a notebook, shard layers, time collectives.

`launch(fn, world_size, ...)` starts N fresh processes (spawn), joins them into one process group
(gloo on CPU, NCCL on GPUs) and returns each rank's result. Worker functions must be importable
(module-level, like those in `helpers.tp_workers`): spawned processes import them by name.
A failing rank's traceback surfaces in the caller; a timeout or failure ends every rank.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.memory import peak_rss_bytes


class WorkerError(RuntimeError):
    pass


# Peak resident memory of each rank of the most recent `launch` (bytes), for memory reports.
last_peak_rss_bytes: list[int] = []


def check_tp_degree(tp: int, *, heads: int, kv_heads: int, intermediate: int) -> None:
    """Refuse a TP degree that does not split the attention heads, KV heads and MLP evenly."""
    for what, n in (
        ("attention heads", heads),
        ("KV heads", kv_heads),
        ("MLP width", intermediate),
    ):
        if n % tp:
            divisors = [d for d in range(1, n + 1) if n % d == 0 and heads % d == 0
                        and kv_heads % d == 0 and intermediate % d == 0]  # fmt: skip
            raise ValueError(
                f"TP degree {tp} does not divide the {n} {what}; use one of {divisors}."
            )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_world(world_size: int, backend: str) -> None:
    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if world_size > gpus:
            raise ValueError(
                f"NCCL needs one GPU per rank: {world_size} ranks but {gpus} GPU(s). "
                f"Use world_size ≤ {gpus}, or backend='gloo' to run the ranks on the CPU."
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
    )  # fmt: skip
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))  # fmt: skip
        # plain pickle copies tensors into bytes (no shared memory outliving this process)
        result = fn(rank, world_size, *args)
        results.put(("ok", rank, pickle.dumps((result, peak_rss_bytes()))))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, backend: str | None = None, timeout: float = 180):
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return results by rank."""
    backend = backend or default_backend()
    check_world(world_size, backend)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results),
                         daemon=True) for r in range(world_size)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        out = {}
        while len(out) < world_size:
            try:
                status, rank, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world_size)) - set(out))} did not finish within "
                    f"{timeout:.0f} s; all ranks were stopped"
                ) from None
            if status == "error":
                raise WorkerError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = pickle.loads(value)
        last_peak_rss_bytes[:] = [out[r][1] for r in range(world_size)]
        return [out[r][0] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


# --- Sharding by hand ----------------------------------------------------------------------


def column_shard(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of a Linear weight (its output features) for this rank: y_local = x @ W_localᵀ."""
    return weight.chunk(world, dim=0)[rank]


def row_shard(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Columns of a Linear weight (its input features) for this rank: partial sums to add up."""
    return weight.chunk(world, dim=1)[rank]


# --- The α–β model of a collective ---------------------------------------------------------


def allreduce_bus_bytes(message_bytes: float, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce: 2 (p−1)/p × message."""
    return 2 * (world - 1) / world * message_bytes


def fit_alpha_beta(message_bytes, seconds) -> tuple[float, float]:
    """Fit t = α + β·n: α the fixed latency (s), β seconds per byte (1/bandwidth).

    Weighted by 1/t, so small messages (which set α) count as much as large ones (which set β).
    """
    n = np.asarray(message_bytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    beta, alpha = np.polyfit(n, t, 1, w=1 / t)
    return float(alpha), float(beta)
