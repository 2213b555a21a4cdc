"""What memory holds, read the same way on a CPU and a GPU: the process's resident memory and its
peak, the caching allocator's and the driver's views, live tensor bytes op by op, the bytes a
model holds, and what was live at a peak by the operation that allocated it. `helpers.memory`
gathers these names with the out-of-memory-safe search (`memory_search`) and the timings of
memory (`memory_timing`); the formulas of what serving needs are in `helpers.shapes`."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers.device import as_device
from helpers.noise import quiet_native_stderr
from helpers.shapes import format_bytes

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last `reset_peak_rss()`.

    Linux: VmHWM from /proc. Elsewhere: getrusage's lifetime peak (it cannot be reset).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def gpu_memory(device: torch.device | str = "cuda") -> dict[str, int]:
    """The caching allocator's view: what tensors hold, what it reserved, and the peak."""
    device = as_device(device)
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
    }


def device_memory(index: int = 0) -> dict[str, int] | None:
    """The device-wide view (what nvidia-smi shows), through NVML; None without NVIDIA's driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            return {"used": int(info.used), "total": int(info.total), "free": int(info.free)}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, or no device: there is no device-wide view
        return None


class LiveTensorBytes(TorchDispatchMode):
    """Context manager: live bytes of the tensor storages created inside it, op by op, and their
    peak: on a CPU what a GPU's caching allocator counts (`max_memory_allocated`), free of the C
    allocator's reuse of freed blocks. A storage counts from the op that creates it (one whose
    result aliases no input: not a view, not in place) until it is freed (PyTorch keeps a
    storage's Python object as long as the storage lives). Buffers a
    kernel uses internally are not seen; each op costs a little Python time."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = self.peak_bytes = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op: it returns storage that exists already
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._alive:
                    self._alive.add(key)
                    self.live_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


@dataclass
class PeakMemory:
    """Context manager: the peak memory of the code inside it.

    CPU: peak RSS of the whole process (needs a resettable kernel mark, else lifetime peak);
    with `tensors=True`, the peak of live tensor bytes created inside (`LiveTensorBytes`).
    CUDA: peak bytes allocated by PyTorch tensors on the device.
    """

    device: torch.device | str = "cpu"
    start_bytes: int = 0
    peak_bytes: int = 0
    resettable: bool = True
    tensors: bool = False

    def __enter__(self) -> PeakMemory:
        self.device = dev = as_device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.start_bytes = torch.cuda.memory_allocated(dev)
        elif self.tensors:
            self._tracker = LiveTensorBytes().__enter__()
        else:
            self.resettable = reset_peak_rss()
            self.start_bytes = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_bytes = torch.cuda.max_memory_allocated(dev)
        elif self.tensors:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self._tracker.peak_bytes
        else:
            self.peak_bytes = peak_rss_bytes()

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores, looking inside tensor subclasses: torchao's quantized ones,
    and a DTensor's local shard (what this rank holds; its device mesh is not a tensor)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, n) for n in names)
        return sum(tensor_bytes(x) for x in inner if isinstance(x, torch.Tensor))
    return t.numel() * t.element_size()  # (torch.ao's qint8 tensors: one byte per value)


def weight_bytes(model: torch.nn.Module, include_buffers: bool = False) -> int:
    """Bytes of the model's parameters (and buffers), quantized or not; shared (tied) tensors
    are counted once, and torch.ao's packed weights, which live outside `parameters()`, too."""
    model = _module("model", model)
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    total = sum(tensor_bytes(t) for t in {id(t): t for t in tensors}.values())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += tensor_bytes(weight) + (0 if bias is None else tensor_bytes(bias))
    return total


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in _module("model", model).parameters())


def _module(name: str, value) -> torch.nn.Module:
    """`value` if it is a torch module; a loaded model's wrapper (e.g. what
    `models.load_smollm2` returns) is refused naming its `.model`."""
    if isinstance(value, torch.nn.Module):
        return value
    if isinstance(getattr(value, "model", None), torch.nn.Module):
        raise TypeError(
            f"{name} is a {type(value).__name__}, not the model itself: pass its .model "
            f"(e.g. memory.weight_bytes(loaded.model))"
        )
    raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def release_freed_memory() -> None:
    """Collect garbage and hand freed memory back: the CUDA cache to the driver, and on Linux the
    C allocator's free heap to the OS (glibc keeps it otherwise, and resident memory only grows)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- One call per reading, the same on a CPU and a GPU --------------------------------------


def in_use_bytes(device: torch.device | str = "cpu") -> int:
    """What the process holds now: resident memory on a CPU, live tensor bytes on a GPU."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def runtime_bytes(device: torch.device | str = "cpu") -> float:
    """The runtime's own memory before any model: on a CPU the resident interpreter and
    libraries; on a GPU the CUDA context (what the driver holds beyond PyTorch's allocator,
    through NVML; NaN without it)."""
    device = as_device(device)
    if device.type != "cuda":
        return float(rss_bytes())
    torch.cuda.synchronize(device)  # creates the context if nothing has yet
    smi = device_memory(device.index or 0)
    return float("nan") if smi is None else smi["used"] - torch.cuda.memory_reserved(device)


def reconcile(rows: dict[str, tuple[float | None, float]]) -> pd.DataFrame:
    """component → (predicted bytes or None, measured bytes), as a table with the relative error
    (bytes as numbers: format them with `shapes.format_bytes` for display)."""
    frame = pd.DataFrame(
        [(k, np.nan if p is None else p, m) for k, (p, m) in rows.items()],
        columns=["component", "predicted", "measured"],
    ).set_index("component")
    frame["error"] = frame.measured / frame.predicted - 1
    return frame


def readable(frame: pd.DataFrame, byte_columns=("predicted", "measured")) -> pd.DataFrame:
    """`frame` with its byte columns formatted ('1.5 MiB'; missing values as '—') and a column
    `error` (measured / predicted − 1) as a signed percentage."""
    formatted = {
        c: frame[c].map(lambda v: "—" if pd.isna(v) else format_bytes(v))
        for c in byte_columns
        if c in frame
    }
    if "error" in frame:
        formatted["error"] = frame.error.map(lambda v: "—" if pd.isna(v) else f"{v:+.1%}")
    return frame.assign(**formatted).round(3)


def allocator_view(device: torch.device | str, recorded_csv: Path) -> pd.DataFrame:
    """Live tensors, the caching allocator's reserve, its peak and the driver's device-wide
    count (nvidia-smi). On a GPU from this run; elsewhere the course's recorded run."""
    device = as_device(device)
    names = {
        "allocated": "allocated (live tensors)",
        "reserved": "reserved (allocator's cache)",
        "peak_allocated": "peak allocated",
        "used": "nvidia-smi used (whole device)",
    }
    if device.type == "cuda":
        smi = device_memory(device.index or 0) or {"used": float("nan")}
        values = {**gpu_memory(device), "used": smi["used"]}
        source = f"this run: {torch.cuda.get_device_name(device)}"
    else:
        recorded = pd.read_csv(recorded_csv).iloc[0]
        values = recorded[list(names)].to_dict()
        source = f"recorded: {recorded.device}, {recorded.model} ({Path(recorded_csv).name})"
    return pd.DataFrame({"bytes": [values[k] for k in names]}, index=list(names.values())).assign(
        readable=lambda d: d.bytes.map(format_bytes), source=source
    )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@contextlib.contextmanager
def freed_blocks_returned(threshold: int = 64 * 2**10):
    """CPU (glibc): inside, every block of ≥ `threshold` bytes is its own mapping, handed back to
    the OS when freed, so resident memory follows the live tensors instead of the C allocator's
    reuse of freed blocks. Afterwards the thresholds glibc's own adaptation settles at (32 MiB
    mapping, 64 MiB trim) are set again. Elsewhere, nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        changed = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc: there is no such knob
        libc, changed = None, False
    try:
        yield changed
    finally:
        if changed:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def peak_added_bytes(
    fn: Callable[[], object], device: torch.device | str = "cpu", tensors: bool = False
) -> int:
    """Peak bytes `fn()` adds above what is in use when it starts (`PeakMemory`): live tensor
    bytes on a GPU; on a CPU resident memory, with freed blocks handed back at once, or with
    `tensors=True` live tensor bytes as on a GPU (exact, slower: `LiveTensorBytes`)."""
    device = as_device(device)
    release_freed_memory()
    with freed_blocks_returned(), PeakMemory(device, tensors=tensors) as peak:
        fn()
    release_freed_memory()
    return peak.increase_bytes


# --- The allocator's timeline (GPU) and what is live at the peak, by operation --------------


def allocator_timeline(
    run: Callable[[], object],
    device: torch.device | str,
    recorded_csv: Path,
    save_to: Path | None = None,
    points: int = 4000,
) -> pd.DataFrame:
    """Live tensor bytes after every allocation and free while `run()` runs, from PyTorch's
    allocator history (GPU; the snapshot is saved to `save_to`, which opens in
    https://pytorch.org/memory_viz). Elsewhere `run` is not called: the course's recorded run.
    Columns: event, live_bytes, source."""
    device = as_device(device)
    if device.type != "cuda":
        recorded = pd.read_csv(recorded_csv)
        source = f"recorded: {recorded.device.iloc[0]} ({Path(recorded_csv).name})"
        return recorded[["event", "live_bytes"]].assign(source=source)
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        run()
        snapshot = torch.cuda.memory._snapshot()
        if save_to is not None:
            torch.cuda.memory._dump_snapshot(str(save_to))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, trace = 0, []
    for event in snapshot["device_traces"][device.index or 0]:
        sign = {"alloc": 1, "free_completed": -1}.get(event["action"], 0)
        live += sign * event["size"]
        if sign:
            trace.append(live)
    timeline = pd.DataFrame({"event": range(len(trace)), "live_bytes": trace})
    step = max(1, len(timeline) // points)  # keep the peaks, drop the detail
    timeline = timeline.groupby(timeline.event // step).max()
    return timeline.assign(source=f"this run: {torch.cuda.get_device_name(device)}")


@dataclass
class AllocationPeak:
    """`live_at_peak`'s answer: the peak of bytes allocated through PyTorch's allocator while a
    function ran (kernels' internal buffers included), what was live then by operation, and
    the name of every operation that ran (e.g. to see which attention kernel was chosen)."""

    peak_bytes: int
    by_op: pd.DataFrame  # op, tensors, bytes: live at the peak, by the op that allocated them
    ops: frozenset[str]


def _top_op(event) -> str:
    """The outermost ATen operation around a profiler event: the call the Python code made."""
    name = "(outside any op)"
    while event is not None:
        if event.name.startswith("aten::"):
            name = event.name
        event = event.parent
    return name


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def live_at_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> AllocationPeak:
    """Run `fn()` under `torch.profiler` (profile_memory=True) and replay its allocations and
    frees in order: the peak of bytes live (only blocks allocated inside `fn` count) and, at that
    moment, which operations had allocated them. Unlike `LiveTensorBytes`, it sees buffers a
    kernel allocates internally; like it, nothing the C allocator or a library (MKL, oneDNN)
    holds outside PyTorch's allocator. Only `device`'s allocations count."""
    from torch._C._profiler import _EventType  # the profiler's event tree (torch ≥ 2.1)
    from torch.profiler import profile

    with quiet_native_stderr(), profile(profile_memory=True) as prof:
        fn()
    roots = prof.profiler.kineto_results.experimental_event_tree()
    events = list(_walk(roots))
    allocations = sorted(
        (e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size, _top_op(e.parent))
        for e in events
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == as_device(device).type
    )
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for _, ptr, size, op in allocations:
        if size > 0:
            live[ptr] = (size, op)
            total += size
        elif ptr in live:
            total -= live.pop(ptr)[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    rows = pd.DataFrame(list(at_peak.values()), columns=["bytes", "op"])
    by_op = (
        rows.groupby("op")
        .bytes.agg(tensors="count", bytes="sum")
        .reset_index()
        .sort_values("bytes", ascending=False, ignore_index=True)
    )
    ops = frozenset(e.name for e in events if e.tag == _EventType.TorchOp)
    return AllocationPeak(peak, by_op, ops)
