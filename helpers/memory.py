"""Memory readings: peak process memory (CPU), allocator and device-wide views (GPU)."""

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
    device = checks.device(device)
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
        self.device = dev = checks.device(self.device)
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


# --- What serving needs: formulas -----------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that decide its memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def of(cls, config) -> Shape:
        """From a transformers config, a dict of config fields, or a known architecture name."""
        if isinstance(config, Shape):
            return config
        if isinstance(config, str):
            from helpers.models import ARCHITECTURES

            config = ARCHITECTURES[checks.choice("architecture", config, ARCHITECTURES)]
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        missing = [k for k in _CONFIG_FIELDS if not isinstance(get(k), int) or get(k) < 1]
        if missing:
            raise ValueError(
                f"the config lacks {missing} (each a whole number ≥ 1): pass a transformers "
                "config, a dict with all of " + ", ".join(_CONFIG_FIELDS) + ", or a known name"
            )
        heads = get("num_attention_heads")
        return cls(
            layers=get("num_hidden_layers"),
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            vocab=get("vocab_size"),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
        )

    @property
    def params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden  # + two norm weights
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden  # + final norm


_CONFIG_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "vocab_size")  # fmt: skip


def _sizes(shape, batch, tokens, bytes_per_value, tokens_name="context"):
    """The checked arguments of the formulas below (a `Shape`, whole counts, bytes per value)."""
    if not isinstance(shape, Shape):
        raise TypeError(f"shape must be a memory.Shape, got {shape!r}: pass memory.Shape.of(...)")
    checks.whole("batch", batch, minimum=0)
    checks.whole(tokens_name, tokens, minimum=0)
    checks.positive("bytes_per_value", bytes_per_value)


def kv_cache_bytes(shape: Shape, batch: int, context: int, bytes_per_value: float) -> int:
    """Keys and values of all layers: 2 · layers · batch · context · kv_heads · head_dim · bytes."""
    _sizes(shape, batch, context, bytes_per_value)
    return int(
        2 * shape.layers * batch * context * shape.kv_heads * shape.head_dim * bytes_per_value
    )


def logits_bytes(shape: Shape, batch: int, positions: int, bytes_per_value: float = 4) -> int:
    """Scores over the vocabulary for `positions` tokens of each sequence."""
    _sizes(shape, batch, positions, bytes_per_value, "positions")
    return int(batch * positions * shape.vocab * bytes_per_value)


def activation_bytes(
    shape: Shape, batch: int, tokens: int, bytes_per_value: float, tp: int = 1
) -> int:
    """Estimated peak of the temporaries inside one layer while `tokens` per sequence flow through.

    The widest point is the MLP: the residual stream and its normed copy (2 · hidden) live
    beside the gate, up and their product (3 · intermediate). Layers run one after another, so
    this does not grow with depth. Tensor parallelism splits the MLP's width over `tp` devices.
    An estimate, checked against measurement in notebook 02.
    """
    _sizes(shape, batch, tokens, bytes_per_value, "tokens")
    tp = checks.whole("tp", tp)
    width = 2 * shape.hidden + 3 * shape.intermediate // tp
    return int(batch * tokens * width * bytes_per_value)


def serving_memory(
    shape: Shape,
    batch: int,
    context: int,
    weight_bytes_per_param: float,
    value_bytes: float,
    tp: int = 1,
    prefill_tokens: int | None = None,
    all_logits: bool = False,
) -> dict[str, int]:
    """Bytes per device to serve `batch` sequences of `context` tokens, by component.

    `value_bytes` is the size of one cached key/value, activation or logit (2 in bf16/fp16):
    quantizing the weights does not change it.
    Tensor parallelism over `tp` devices splits weights, KV heads and the activations of the
    split layers; each device keeps full-size logits here (the course's loop gathers them).
    `prefill_tokens` (default: the whole context) is how many prompt tokens go through at once;
    `all_logits` keeps scores for every prompt position instead of only the last one.
    """
    from helpers.tp import check_tp_degree  # here: helpers.tp imports this module

    _sizes(shape, batch, context, value_bytes)
    checks.positive("weight_bytes_per_param", weight_bytes_per_param)
    check_tp_degree(tp, heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate)
    tokens = context if prefill_tokens is None else checks.whole("prefill_tokens", prefill_tokens)
    return {
        "weights": int(shape.params * weight_bytes_per_param / tp),
        "kv_cache": kv_cache_bytes(shape, batch, context, value_bytes) // tp,
        "activations": activation_bytes(shape, batch, tokens, value_bytes, tp),
        "logits": logits_bytes(shape, batch, tokens if all_logits else 1, value_bytes),
    }


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
