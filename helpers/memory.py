"""Memory readings: peak process memory (CPU), allocator and device-wide views (GPU)."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import psutil
import torch

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
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.start_bytes = torch.cuda.memory_allocated(dev)
        else:
            self.resettable = reset_peak_rss()
            self.start_bytes = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_bytes = torch.cuda.max_memory_allocated(dev)
        else:
            self.peak_bytes = peak_rss_bytes()

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def weight_bytes(model: torch.nn.Module, include_buffers: bool = False) -> int:
    """Bytes of the model's parameters; `parameters()` yields tied (shared) weights once."""
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def format_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
