"""Memory readings: peak process memory (CPU), allocator and device-wide views (GPU), bytes a
model holds, and an out-of-memory-safe search. The formulas of what serving needs are in
`helpers.shapes`."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from helpers import checks
from helpers.device import as_device

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


@dataclass
class PeakMemory:
    """Context manager: the peak memory of the code inside it.

    CPU: peak RSS of the whole process (needs a resettable kernel mark, else lifetime peak).
    CUDA: peak bytes allocated by PyTorch tensors on the device.
    """

    device: torch.device | str = "cpu"
    start_bytes: int = 0
    peak_bytes: int = 0
    resettable: bool = True

    def __enter__(self) -> PeakMemory:
        self.device = dev = as_device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.start_bytes = torch.cuda.memory_allocated(dev)
        else:
            self.resettable = reset_peak_rss()
            self.start_bytes = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_bytes = torch.cuda.max_memory_allocated(dev)
        else:
            self.peak_bytes = peak_rss_bytes()

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores, looking inside quantized tensor subclasses (torchao)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()  # (torch.ao's qint8 tensors: one byte per value)


def weight_bytes(model: torch.nn.Module, include_buffers: bool = False) -> int:
    """Bytes of the model's parameters (and buffers), quantized or not; shared (tied) tensors
    are counted once, and torch.ao's packed weights, which live outside `parameters()`, too."""
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    total = sum(tensor_bytes(t) for t in {id(t): t for t in tensors}.values())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += tensor_bytes(weight) + (0 if bias is None else tensor_bytes(bias))
    return total


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
    """Run `trial(n)`; False if it ran out of memory (GPU OOM, MemoryError, BudgetExceeded)."""
    try:
        trial(n)
        return True
    except (torch.OutOfMemoryError, MemoryError):
        return False  # the exception (and the frames holding its tensors) is dropped here
    finally:
        release_freed_memory()


@dataclass
class SearchResult:
    largest: int  # 0 when even the smallest size does not fit
    tried: list[tuple[int, bool]]  # every size tried, in order, and whether it fit


def largest_fitting(trial: Callable[[int], object], start: int = 1, limit: int = 2**16):
    """The largest n in [start, limit] for which `trial(n)` fits, assuming bigger never fits
    better: doubling until the first failure, then bisection between the last fit and it."""
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

    if not attempt(start):
        return SearchResult(0, tried)
    good, bad = start, None
    while bad is None and good < limit:
        n = min(good * 2, limit)
        if attempt(n):
            good = n
        else:
            bad = n
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if attempt(mid):
            good = mid
        else:
            bad = mid
    return SearchResult(good, tried)
