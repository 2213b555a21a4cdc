"""The time memory costs, and a piece of code's peak beside its time: functions timed in turn
(`time_interleaved`, `peak_and_time`), page faults (`minor_faults`, `first_touch_cost`), and
copies (`copy_sweep`: bandwidth against buffer size; `copy_beside_compute`: a host→device copy
on a side stream while a matmul runs, GPU)."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from helpers import checks
from helpers.bench import Timing, measure, timed
from helpers.device import as_device, last_level_cache, streamed_size
from helpers.memory_readings import peak_added_bytes


@contextlib.contextmanager
def _threads(n: int | None):
    """PyTorch's intra-op threads set to `n` inside (unchanged for None), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_interleaved(
    runs: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    threads: int | None = None,
) -> pd.DataFrame:
    """Time the named functions in turn: one untimed warm-up of each, then `repeats` rounds that
    run each once, so that no variant alone meets a cold allocator or a burst of load on a
    shared machine. With `threads`, PyTorch's intra-op threads are set to it meanwhile.
    One row per name: median and quartiles (`Timing.row()`, the `Timing` in `timing`) and
    `faults`, the minor page faults per timed run (first touches of fresh pages)."""
    device = as_device(device)
    checks.whole("repeats", repeats)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    faults = dict.fromkeys(runs, 0)
    with _threads(threads):
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                samples[name].append(timed(fn, device)[1])
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
    rows = []
    for name, times in samples.items():
        timing = Timing(name, times)
        rows.append({**timing.row(), "timing": timing, "faults": faults[name] / repeats})
    return pd.DataFrame(rows).set_index("name")


def peak_and_time(
    runs: dict[str, Callable[[], object]], device: torch.device | str = "cpu", repeats: int = 5
) -> pd.DataFrame:
    """For each named function: the peak of live tensor bytes one run adds (`peak_bytes`,
    `peak_added_bytes(..., tensors=True)`: exact on a CPU too; counted on one thread, which
    holds the same tensors and, op by op, runs faster on a shared machine), then all of them
    timed interleaved on the threads set (`time_interleaved`: median, quartiles, `timing`,
    `faults` per run)."""
    device = as_device(device)
    with _threads(1):
        peaks = {name: peak_added_bytes(fn, device, tensors=True) for name, fn in runs.items()}
    table = time_interleaved(runs, device, repeats)
    table["peak_bytes"] = pd.Series(peaks)
    return table


def first_touch_cost(nbytes: int = 64 * 2**20, repeats: int = 5) -> dict[str, float] | None:
    """The cost of one page fault, measured: fill a new `nbytes` tensor (its pages are fresh:
    each first touch faults, and the kernel maps in a zeroed page), then fill it again (the
    same writes, no faults). Medians over `repeats` new tensors: first_s, again_s, faults (per
    fill) and per_fault_s = (first_s − again_s) / faults. None where faults cannot be counted."""
    if not sys.platform.startswith("linux"):
        return None
    first, again, faults = [], [], []
    for _ in range(checks.whole("repeats", repeats)):
        fresh = torch.empty(nbytes // 4)  # large enough to be its own mapping (glibc, ≥ 32 MiB)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        first.append(timed(lambda t=fresh: t.fill_(1.0))[1])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
        again.append(timed(lambda t=fresh: t.fill_(1.0))[1])
        del fresh
    row = {"first_s": float(np.median(first)), "again_s": float(np.median(again))}
    row["faults"] = float(np.median(faults))
    row["per_fault_s"] = max(row["first_s"] - row["again_s"], 0.0) / max(row["faults"], 1.0)
    return row


def minor_faults(fn: Callable[[], object]) -> int | None:
    """Pages the OS mapped in for this process while `fn()` ran (minor page faults: first
    touches of fresh memory, each zeroed by the kernel); None where getrusage cannot say."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return after - before if sys.platform.startswith("linux") else None


# --- Copies: bandwidth against buffer size, and beside compute (GPU) -----------------------


def copy_beside_compute(device: torch.device | str, nbytes: int = 64 * 2**20, n: int = 4096):
    """(serial, overlapped) Timings: a pinned host→device copy of `nbytes` then an n×n matmul,
    vs the copy on a side stream while the matmul runs. None without a CUDA device."""
    device = as_device(device)
    if device.type != "cuda":
        return None
    host = torch.randn(nbytes // 4).pin_memory()
    target = torch.empty_like(host, device=device)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    side = torch.cuda.Stream(device)

    def serial():
        target.copy_(host)
        a @ a

    def overlapped():
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            target.copy_(host, non_blocking=True)
        a @ a
        torch.cuda.current_stream(device).wait_stream(side)

    return (
        measure(serial, name="copy, then matmul", device=device),
        measure(overlapped, name="copy beside matmul", device=device),
    )


def copy_sweep(
    device: torch.device | str = "cpu", repeats: int = 15, most_bytes: int = 256 * 2**20
) -> pd.DataFrame:
    """Copy bandwidth (read + write) against buffer size: ×4 steps from 256 KiB up to buffers
    that together pass twice the last-level cache (`device.streamed_size`), each buffer exactly
    that size, so the small ones copy within a cache — but never more than `most_bytes` for the
    two together (a CPU with a 480 MiB L3 would otherwise take ~1 GiB: over Binder's memory);
    `attrs["streamed"]` says whether the largest pair passed twice the last-level cache. Rows as
    `roofline.measure_copy`: size, ceiling ("copy"), value (B/s, from the median) and low / high
    (from the quartiles)."""
    device = as_device(device)
    top = min(streamed_size(device, 64 * 2**20, buffers=2)[0], most_bytes // 2)
    sizes = [n for n in (256 * 2**10 * 4**i for i in range(8)) if n < top] + [top]
    rows = []
    for nbytes in sizes:
        src = torch.ones(nbytes // 4, device=device)
        dst = torch.zeros_like(src)
        t = measure(lambda d=dst, s=src: d.copy_(s), repeats=repeats, device=device)
        rows.append(
            {
                "size": nbytes,
                "ceiling": "copy",
                "value": 2 * nbytes / t.median,
                "low": 2 * nbytes / t.q3,
                "high": 2 * nbytes / t.q1,
            }
        )
        del src, dst
    frame = pd.DataFrame(rows)
    frame.attrs["streamed"] = 2 * top >= 2 * last_level_cache(device)
    return frame


def bandwidth_at(transfers: pd.DataFrame, ceiling: str, size: int):
    """(GB/s, (low, high) GB/s) of one measured ceiling at one buffer size, from rows of
    `roofline.measure_host_device` / `measure_copy`; (NaN, None) where it was not measured."""
    hit = transfers[(transfers["ceiling"] == ceiling) & (transfers["size"] == size)]
    if hit.empty:
        return float("nan"), None
    best = hit.iloc[0]
    return best["value"] / 1e9, (best["low"] / 1e9, best["high"] / 1e9)
