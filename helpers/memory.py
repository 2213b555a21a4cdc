"""Memory readings: peak process memory (CPU), allocator and device-wide views (GPU), bytes a
model holds, and an out-of-memory-safe search. The formulas of what serving needs are in
`helpers.shapes` (and written out in notebook 02).

Each reading a notebook needs is one call that works on a CPU and a GPU alike (`in_use_bytes`,
`runtime_bytes`, `peak_added_bytes`, `peak_and_time`, `time_interleaved`, `search_frontier`,
`allocator_view`, `allocator_timeline`, `copy_sweep`), so the notebook's cells hold the idea and
not the device plumbing; `first_touch_cost` times one page fault (CPU)."""

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

from helpers import checks
from helpers.bench import Timing, measure, timed
from helpers.device import as_device, last_level_cache, streamed_size
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


# --- What fits: an out-of-memory-safe search ------------------------------------------------


class BudgetExceeded(MemoryError):
    """A trial used more memory than the budget the caller set (the CPU's stand-in for OOM)."""


def release_freed_memory() -> None:
    """Collect garbage and hand freed memory back: the CUDA cache to the driver, and on Linux the
    C allocator's free heap to the OS (glibc keeps it otherwise, and resident memory only grows)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def fits(trial: Callable[[int], object], n: int) -> bool:
    """Run `trial(n)`; False if it ran out of memory (GPU OOM, MemoryError, BudgetExceeded).

    A trial says "does not fit" by raising, never by its return value (what it returns when it
    fits is ignored): one that returns False is refused, since the search would read it as a fit."""
    try:
        result = trial(n)
        if isinstance(result, bool | np.bool_) and not result:
            raise TypeError(
                f"trial({n}) returned {result!r}: a trial signals 'does not fit' by raising "
                "(MemoryError, memory.BudgetExceeded or torch.OutOfMemoryError) and returns "
                "nothing when it fits"
            )
        return True
    except (torch.OutOfMemoryError, MemoryError):
        return False  # the exception (and the frames holding its tensors) is dropped here
    finally:
        release_freed_memory()


@dataclass
class SearchResult:
    largest: int  # 0 when even the smallest size does not fit
    tried: list[tuple[int, bool]]  # every size tried, in order, and whether it fit


def largest_fitting(
    trial: Callable[[int], object], start: int = 1, limit: int = 2**16, guess: int | None = None
):
    """The largest n in [start, limit] for which `trial(n)` fits, assuming bigger never fits
    better: doubling from `start` until the first failure, then bisection between the last fit
    and it. With a `guess` (e.g. a formula's prediction) the search starts there and steps away
    from it by 1, 2, 4 … until it brackets the answer, then bisects: a right guess costs two
    trials (the guess fits, one more does not), a wrong one a few more."""
    if not callable(trial):
        raise TypeError(f"trial must be a function of the size n, got {trial!r}")
    start = checks.whole("start", start)
    limit = checks.whole("limit", limit)
    if limit < start:
        raise ValueError(f"limit ({limit}) is below start ({start}): pass limit ≥ start")
    tried: list[tuple[int, bool]] = []

    def attempt(n: int) -> bool:
        ok = fits(trial, n)
        tried.append((n, ok))
        return ok

    n = start if guess is None else min(max(guess, start), limit)
    good, bad = (n, None) if attempt(n) else (None, n)
    distance = 1
    while good is None and guess is not None and bad > start:  # the guess failed: step down
        n = max(bad - distance, start)
        good, bad = (n, bad) if attempt(n) else (None, n)
        distance *= 2
    if good is None:
        return SearchResult(0, tried)
    distance = 1
    while bad is None and good < limit:  # step up (doubling without a guess) until one fails
        n = min(good * 2 if guess is None else good + distance, limit)
        good, bad = (n, None) if attempt(n) else (good, n)
        distance *= 2
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if attempt(mid) else (good, mid)
    return SearchResult(good, tried)


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


# --- Peak and time of a piece of code -------------------------------------------------------

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


# --- What fits, predicted and searched ------------------------------------------------------


def search_frontier(
    request: Callable[[int, int], object],
    need: Callable[[int, int], float],
    contexts: list[int],
    budget: int,
    device: torch.device | str = "cpu",
    limit: int = 4096,
) -> pd.DataFrame:
    """For each context: the largest batch the formula `need(batch, context)` (bytes beyond the
    loaded model) fits in `budget`, and the largest `request(batch, context)` really runs in it.

    A GPU trial runs with this process capped at what it holds + `budget`, so it meets a real
    `torch.OutOfMemoryError`; a CPU trial fails when its measured peak exceeds the budget
    (`BudgetExceeded`). A trial predicted to need over 1.5 × the budget is not run at all. The
    search starts at the formula's batch (`largest_fitting(guess=...)`): two real trials when
    the formula is right, more where it is not; what it finds does not depend on the guess.
    Columns: context, predicted and found batch, tries, and for the found batch the predicted
    and measured bytes."""
    device = as_device(device)
    budget = checks.whole("budget", budget)
    measured: dict[tuple[int, int], int] = {}

    def trial(batch: int, context: int) -> None:
        if need(batch, context) > 1.5 * budget:
            raise BudgetExceeded("predicted to overshoot by far: not run")
        # on a GPU, raises torch.OutOfMemoryError past the cap
        measured[batch, context] = used = peak_added_bytes(lambda: request(batch, context), device)
        if device.type != "cuda" and used > budget:
            raise BudgetExceeded(f"{format_bytes(used)} > budget")

    rows = []
    if device.type == "cuda":  # cap this process so the search meets real out-of-memory errors
        release_freed_memory()
        total = torch.cuda.get_device_properties(device).total_memory
        held = torch.cuda.memory_reserved(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, (held + budget) / total), device)
    try:
        for ctx in contexts:
            predicted = max((b for b in range(1, limit + 1) if need(b, ctx) <= budget), default=0)
            found = largest_fitting(lambda b, c=ctx: trial(b, c), limit=limit, guess=predicted or 1)
            best = (found.largest, ctx)
            rows.append(
                {
                    "context": ctx,
                    "predicted": predicted,
                    "found": found.largest,
                    "tries": len(found.tried),
                    "need_predicted": need(*best) if found.largest else float("nan"),
                    "need_measured": measured.get(best, float("nan")),
                }
            )
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    limit = (
        "a hard cap on this process (real out-of-memory errors)"
        if device.type == "cuda"
        else (
            "a budget: this process's resident memory is not capped, so a trial fails when its "
            "measured peak exceeds the budget"
        )
    )
    frame = pd.DataFrame(rows)
    frame.attrs["limit"] = limit
    return frame


def minor_faults(fn: Callable[[], object]) -> int | None:
    """Pages the OS mapped in for this process while `fn()` ran (minor page faults: first
    touches of fresh memory, each zeroed by the kernel); None where getrusage cannot say."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return after - before if sys.platform.startswith("linux") else None


# --- The allocator's timeline and copies beside compute (GPU) -------------------------------


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


# --- What is live at the peak, by the operation that allocated it ----------------------------


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
