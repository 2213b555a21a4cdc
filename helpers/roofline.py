"""This machine's ceilings (matmul FLOP/s per dtype, memory bandwidth) and the roofline model.

The roofline: a kernel doing `intensity` FLOPs per byte it moves can run no faster than
min(peak FLOP/s, intensity × bandwidth). Below the ridge point (peak / bandwidth) memory limits
it; above, arithmetic does.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers import BUILD_DIR, overhead
from helpers.bench import measure
from helpers.device import (
    STREAM_CAP_BYTES,
    Preset,
    as_device,
    describe,
    dtype_name,
    dtype_note,
    last_level_cache,
    streamed_size,
    supported_dtypes,
)


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """Roofline: the best FLOP/s a kernel of this arithmetic intensity (FLOP/byte) can reach."""
    return min(peak_flops, intensity * bandwidth)


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """Arithmetic intensity (FLOP/byte) where memory-bound turns compute-bound."""
    return peak_flops / bandwidth


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m×k)·(k×n) product: one multiply and one add per term."""
    return 2 * m * n * k


def matmul_intensity(m: int, n: int, k: int, bytes_per_element: int) -> float:
    """FLOPs per byte when each operand and the result cross memory exactly once."""
    return matmul_flops(m, n, k) / (bytes_per_element * (m * k + k * n + m * n))


class CeilingsFileError(ValueError):
    """A saved ceilings file that cannot be used (empty, half written, another version)."""


@dataclass
class Ceilings:
    """Measured limits of one device (FLOP/s per dtype, bytes/s)."""

    device: str
    matmul_flops: dict[str, float]
    read_bandwidth: float
    copy_bandwidth: float
    host_to_device: float | None = None
    device_to_host: float | None = None
    notes: dict[str, str] = field(default_factory=dict)
    # The third limit (helpers.overhead): seconds per tiny operation; an eager decode step's
    # fixed and per-layer cost; FLOP/s of decode-shaped products by rows per product.
    op_overhead_s: float | None = None
    step_overhead_s: float | None = None
    layer_overhead_s: float | None = None
    linear_flops: dict[int, float] = field(default_factory=dict)
    machine: str = ""  # machine_key() of where these were measured

    def peak(self, dtype: str = "fp32") -> float:
        if dtype not in self.matmul_flops:
            key = dtype.strip().lower() if isinstance(dtype, str) else dtype
            if key not in self.matmul_flops:
                raise ValueError(
                    f"Unknown dtype {dtype!r} for these ceilings; measured: "
                    f"{sorted(self.matmul_flops)} (int8/int4 are weight-only: they compute "
                    "in a 16-bit dtype)"
                )
            dtype = key
        return self.matmul_flops[dtype]

    def save(self, path: Path | None = None) -> Path:
        """Write the ceilings whole or not at all: a temporary file beside `path`, then a rename,
        so an interrupted notebook never leaves half a file for the next one to trip on."""
        path = Path(path or saved_path(self.device))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(self), indent=2))
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path) -> Ceilings:
        """The ceilings saved at `path`; `CeilingsFileError` (saying why) if they cannot be read:
        empty, half written, or written by another version of the course."""
        path = Path(path)
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problem = "it is empty" if path.exists() and not path.stat().st_size else str(err)
            raise CeilingsFileError(f"{path} cannot be read ({problem})") from None
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}
        if not isinstance(saved, dict) or set(saved) - known or required - set(saved):
            have = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise CeilingsFileError(f"{path} was written by another version (fields {have})")
        try:
            saved["linear_flops"] = {int(m): v for m, v in saved.get("linear_flops", {}).items()}
            ceilings = cls(**saved)
        except (AttributeError, TypeError, ValueError) as err:
            raise CeilingsFileError(f"{path} holds unexpected values ({err})") from None
        if not isinstance(ceilings.matmul_flops, dict) or not ceilings.matmul_flops:
            raise CeilingsFileError(f"{path} holds no matmul ceilings")
        return ceilings

    @classmethod
    def from_frame(cls, df: pd.DataFrame, device: str, overhead: dict | None = None) -> Ceilings:
        best = df.groupby(["ceiling", "dtype"], dropna=False)["value"].max()
        get = best.to_dict().get
        return cls(
            device=device,
            matmul_flops={dt: v for (c, dt), v in best.items() if c == "matmul"},
            read_bandwidth=get(("read", "bytes")),
            copy_bandwidth=get(("copy", "bytes")),
            host_to_device=get(("host→device pinned", "bytes")),
            device_to_host=get(("device→host pinned", "bytes")),
            notes={r.dtype: r.note for r in df.itertuples() if r.ceiling == "matmul" and r.note},
            machine=machine_key(torch.device(device)),
            **(overhead or {}),
        )


def machine_key(device: torch.device) -> str:
    """Names this machine, device and software: ceilings measured elsewhere are never reused."""
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    threads = str(torch.get_num_threads())
    facts = [platform.node(), device.type, hardware, torch.__version__, threads]
    return hashlib.sha1("|".join(facts).encode()).hexdigest()[:12]


def _cpu_model() -> str:
    return describe(torch.device("cpu"))["cpu"]


def saved_path(device) -> Path:
    device = torch.device(device)
    return BUILD_DIR / f"ceilings_{device.type}_{machine_key(device)}.json"


def load_or_measure(device: torch.device, preset: Preset) -> Ceilings:
    """The ceilings notebook 00 saved on this machine with this torch, or measure them now.

    The file name carries `machine_key`, so another machine, device or torch version measures
    afresh instead of reusing stale numbers."""
    path = saved_path(device)
    if path.exists():
        try:
            ceilings = Ceilings.load(path)
        except CeilingsFileError as err:
            print(
                f"{err}: measuring the ceilings again (~1 min) and saving them anew",
                file=sys.stderr,
                flush=True,
            )
        else:
            if ceilings.machine == machine_key(device) and ceilings.step_overhead_s is not None:
                return ceilings
    ceilings = Ceilings.from_frame(
        measure_ceilings(device, preset), str(device), overhead_fields(measure_overhead(device))
    )
    ceilings.save(path)
    return ceilings


def measure_overhead(device: torch.device) -> dict[str, pd.DataFrame]:
    """The third limit's measurements (see helpers.overhead), as tidy frames."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return {
        "ops": overhead.op_overhead(device),
        "steps": overhead.step_overhead(device),
        "linear": overhead.linear_rates(device, dtype, **_linear_sizes(device)),
    }


def _linear_sizes(device: torch.device) -> dict:
    if device.type == "cpu":
        return {}
    return {"batches": (1, 4, 16, 64, 256), "width": 4096, "total_bytes": 1e9}


def overhead_fields(frames: dict[str, pd.DataFrame]) -> dict:
    """The Ceilings fields from `measure_overhead`'s frames: a line through step time vs layers
    gives the fixed and per-layer cost of a step."""
    fit = overhead.fit_line(frames["steps"].layers, frames["steps"].step_s)
    return {
        "op_overhead_s": float(frames["ops"].seconds_per_op.iloc[0]),
        "step_overhead_s": max(fit.intercept, 0.0),
        "layer_overhead_s": fit.slope,
        "linear_flops": {int(r.batch): float(r.flops_per_s) for r in frames["linear"].itertuples()},
    }


def _row(timing, ceiling: str, dtype: str, size: int, work: float, unit: str, note="") -> dict:
    return timing.row(
        ceiling=ceiling,
        dtype=dtype,
        size=size,
        value=work / timing.median,
        low=work / timing.q3,
        high=work / timing.q1,
        unit=unit,
        note=note,
    )


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    # F.linear, not `a @ b`: some CPU builds take a pathologically slow path for fp16 `@`.
    timing = measure(lambda: F.linear(a, w), name=f"matmul {n}", repeats=repeats, device=device)
    return _row(timing, "matmul", dtype_name(dtype), n, matmul_flops(n, n, n), "FLOP/s")


def _cache_note(beyond_cache: bool) -> str:
    if beyond_cache:
        return "streamed: the buffers hold ≥ 2× the last-level cache"
    return "buffers smaller than 2× the last-level cache (memory cap): may include cache"


def measure_read(device: torch.device, nbytes: int, repeats: int) -> dict:
    nbytes, beyond = streamed_size(device, nbytes)
    x = torch.ones(nbytes // 4, device=device)  # ones, not empty: untouched pages read as free
    timing = measure(lambda: x.sum(), name="read", repeats=repeats, device=device)
    return _row(timing, "read", "bytes", nbytes, nbytes, "B/s", _cache_note(beyond))


def measure_copy(device: torch.device, nbytes: int, repeats: int) -> dict:
    nbytes, beyond = streamed_size(device, nbytes, buffers=2)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    timing = measure(lambda: dst.copy_(src), name="copy", repeats=repeats, device=device)
    return _row(timing, "copy", "bytes", nbytes, 2 * nbytes, "B/s", _cache_note(beyond))


def read_sweep(device, sizes: list[int], repeats: int = 7) -> pd.DataFrame:
    """Read bandwidth against buffer size, for the L2 → L3 → memory staircase.

    Each size is read by one sum over the buffer repeated (a stride-0 view, `expand`) until a
    call reads ≥ 64 MiB: the buffer itself is re-read from wherever it sits, and the cost of
    calling the operation (Python, dispatch, waking the other threads) is spread over all of it,
    so a small buffer shows the cache's speed, not the call's. Sizes beyond `STREAM_CAP_BYTES`
    are left out."""
    device = as_device(device)
    rows = []
    for nbytes in sorted(set(int(n) for n in sizes)):
        if nbytes > STREAM_CAP_BYTES:
            continue
        x = torch.ones(max(1, nbytes // 4), device=device)
        times = max(1, -(-(64 * 2**20) // nbytes))  # re-reads per call
        view = x.expand(times, x.numel())
        t = measure(lambda v=view: v.sum(), repeats=repeats, device=device)
        read = nbytes * times
        rows.append(
            {
                "bytes": nbytes,
                "reads_per_call": times,
                "seconds": t.median,
                "bandwidth": read / t.median,
                "low": read / t.q3,
                "high": read / t.q1,
            }
        )
        del x, view
    return pd.DataFrame(rows)


def read_sweep_sizes(device, working_set: int | None = None) -> list[int]:
    """Buffer sizes for `read_sweep`: ×4 steps from 256 KiB to 2× the last-level cache (at least
    256 MiB), plus `working_set` (e.g. the bytes one decode step reads)."""
    top = min(max(256 * 2**20, 2 * last_level_cache(device)), STREAM_CAP_BYTES)
    sizes, n = [], 256 * 2**10
    while n < top:
        sizes.append(n)
        n *= 4
    return sorted({*sizes, top, *([int(working_set)] if working_set else [])})


def measure_host_device(device: torch.device, nbytes: int, repeats: int) -> list[dict]:
    rows = []
    on_device = torch.ones(nbytes // 4, device=device)
    for pinned in (True, False):
        host = torch.ones(nbytes // 4, pin_memory=pinned)
        kind = "pinned" if pinned else "pageable"
        h2d = measure(lambda h=host: on_device.copy_(h), repeats=repeats, device=device)
        d2h = measure(lambda h=host: h.copy_(on_device), repeats=repeats, device=device)
        rows.append(_row(h2d, f"host→device {kind}", "bytes", nbytes, nbytes, "B/s"))
        rows.append(_row(d2h, f"device→host {kind}", "bytes", nbytes, nbytes, "B/s"))
    return rows


def native_notes(df: pd.DataFrame) -> dict[str, str]:
    """Per matmul dtype, whether it runs natively here, judged from the measurement: a format
    without arithmetic units of its own is converted and computed in fp32, so it cannot beat
    fp32; a 16-bit format whose best matmul is faster than fp32's has units for it."""
    best = df[df.ceiling == "matmul"].groupby("dtype")["value"].max()
    if "fp32" not in best:
        return {}
    notes = {"fp32": "the reference format"}
    for dt, value in best.drop("fp32").items():
        ratio = value / best["fp32"]
        notes[dt] = (
            f"native: {ratio:.1f}× fp32's best (faster than converting to fp32 could be)"
            if ratio > 1
            else f"emulated: {ratio:.2f}× fp32's best (no faster than converting to fp32)"
        )
    return notes


def measure_ceilings(device: torch.device, preset: Preset) -> pd.DataFrame:
    """Every ceiling of this device as tidy rows (one per measurement)."""
    nbytes = preset.bandwidth_mib * 2**20
    jobs = [
        (measure_matmul, (device, dtype, n, preset.repeats))
        for dtype in supported_dtypes(device)
        for n in preset.matmul_sizes
        if not (dtype_note(dtype, device) and n > 1024)  # software-emulated dtypes: keep it short
    ]
    jobs += [(measure_read, (device, nbytes, preset.repeats))]
    jobs += [(measure_copy, (device, nbytes, preset.repeats))]
    rows = []
    for fn, args in tqdm(jobs, desc="measuring ceilings"):
        rows.append(fn(*args))
    if device.type == "cuda":
        rows += measure_host_device(device, nbytes, preset.repeats)
    df = pd.DataFrame(rows)
    df["note"] = df.note.mask(df.ceiling == "matmul", df.dtype.map(native_notes(df)))
    df["device"] = str(device)
    df["torch"] = torch.__version__
    return df
