"""Timing done right: warm-up, device synchronisation, repeats, median and spread (IQR)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from helpers import BUILD_DIR, checks
from helpers.device import as_device


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); NaN for no samples, the value for one."""
    if not samples:
        return (float("nan"),) * 3
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def _format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


@dataclass
class Timing:
    """Repeated measurements of one thing, in seconds."""

    name: str
    samples: list[float]
    meta: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return quartiles(self.samples)[1]

    @property
    def q1(self) -> float:
        return quartiles(self.samples)[0]

    @property
    def q3(self) -> float:
        return quartiles(self.samples)[2]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def __str__(self) -> str:
        return (
            f"{self.name}: {_format_seconds(self.median)} median "
            f"(IQR {_format_seconds(self.q1)}–{_format_seconds(self.q3)}, n={len(self.samples)})"
        )

    def row(self, **extra) -> dict:
        """One tidy DataFrame row: name, median/q1/q3 in seconds, repeats, meta and extras."""
        return {
            "name": self.name,
            "median_s": self.median,
            "q1_s": self.q1,
            "q3_s": self.q3,
            "repeats": len(self.samples),
            **self.meta,
            **extra,
        }


def synchronize(device: torch.device | str | None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], object], device=None, clock: Callable[[], float] = time.perf_counter):
    """`(fn(), seconds)`: one run, with the device synchronised before the start and the stop, so
    the time covers the work and not only its launch. The one stopwatch every loop uses."""
    synchronize(device)
    start = clock()
    result = fn()
    synchronize(device)
    return result, clock() - start


def measure(
    fn: Callable[[], object],
    *,
    name: str = "",
    warmup: int = 2,
    repeats: int = 10,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    before_each: Callable[[], object] | None = None,
    **meta,
) -> Timing:
    """Run `fn` `warmup` times untimed, then time `repeats` runs.

    On CUDA each run is timed with CUDA events (device time, not launch time); elsewhere with
    `clock`, synchronising the device around each run. `before_each` runs untimed before every
    timed run (e.g. a barrier, so that all ranks of a collective start together).
    """
    if not callable(fn):
        raise TypeError(
            f"fn must be a function to time, got {type(fn).__name__}: pass e.g. "
            "lambda: model(x), not model(x)'s result"
        )
    if before_each is not None and not callable(before_each):
        raise TypeError(f"before_each must be a function or None, got {before_each!r}")
    warmup = checks.whole("warmup", warmup, minimum=0)
    repeats = checks.whole("repeats", repeats)
    device = as_device(device) if device is not None else None
    for _ in range(warmup):
        fn()
    if device is not None and device.type == "cuda" and before_each is None:
        return Timing(name, _cuda_event_samples(fn, repeats, device), meta)
    samples = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        samples.append(timed(fn, device, clock)[1])
    return Timing(name, samples, meta)


def _cuda_event_samples(fn, repeats: int, device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]


def save_measured(name: str, rows, folder: Path | None = None) -> Path:
    """Write this run's measurements (a DataFrame, or a list of dicts) to
    build/measured/<name>.csv, whole or not at all (a temporary file, then a rename), so an
    interrupted run never leaves half a file. Copy it to data/measured/ with its provenance
    columns to share a machine's numbers with the course."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    path = Path(folder or BUILD_DIR / "measured") / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    frame.to_csv(partial, index=False)
    os.replace(partial, path)
    return path
