"""Pick the device, describe the machine, and size experiments by device kind."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from helpers import checks
from helpers.shapes import format_bytes

DEVICE_ENV = "COURSE_DEVICE"
PRESET_ENV = "COURSE_PRESET"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

# The torch dtype of each floating-point precision name of `shapes.PRECISIONS` (and its alias).
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _mps_known_good() -> bool:
    # MPS had silent correctness bugs in matmul/sdpa before torch 2.3; trust it only after that.
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return torch.backends.mps.is_available() and (major, minor) >= (2, 3)


def pick_device(name: str | None = None) -> torch.device:
    """cuda → mps (where known correct) → cpu; `name` or $COURSE_DEVICE overrides."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ValueError(
            f"Unknown device {name!r}. Use one of {', '.join(DEVICE_CHOICES)} "
            f"(optionally 'cuda:N'), e.g. `export {DEVICE_ENV}=cpu`."
        )
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_known_good():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA was requested but torch sees no CUDA GPU. On Colab choose Runtime → Change "
            f"runtime type → T4 GPU; elsewhere unset {DEVICE_ENV} or set it to 'cpu'."
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"MPS was requested but is not available; set {DEVICE_ENV}=cpu.")
    return torch.device(name)


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or its name ('bf16', 'FP16', 'float32'), whatever the device."""
    if isinstance(dtype, torch.dtype) and dtype in TORCH_DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        name = _ALIASES.get(name, name)
        if name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
    raise ValueError(f"Unknown dtype {dtype!r}; use one of fp32, fp16, bf16 (or a torch dtype).")


def dtype_name(dtype: str | torch.dtype) -> str:
    """The course's short name of a floating-point dtype: torch.bfloat16 → 'bf16'."""
    resolved = to_dtype(dtype)
    return next(name for name, d in TORCH_DTYPES.items() if d == resolved)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Turn 'bf16'/'fp16'/'fp32' into a torch dtype, refusing ones the device cannot run."""
    device = as_device(device)
    resolved = to_dtype(dtype)
    if resolved not in supported_dtypes(device):
        raise ValueError(
            f"{resolved} is not supported on {device}: use one of "
            f"{[str(d) for d in supported_dtypes(device)]} (e.g. fp16 instead of bf16 on a T4)."
        )
    return resolved


def supported_dtypes(device: torch.device | str) -> list[torch.dtype]:
    device = as_device(device)
    if device.type == "cuda":
        out = [torch.float32, torch.float16]
        if torch.cuda.is_bf16_supported(including_emulation=False):
            out.append(torch.bfloat16)
        return out
    if device.type == "mps":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


def serving_dtype(device: torch.device) -> torch.dtype:
    """The precision the course serves models in: fp32 on CPU, bf16 on GPUs with bf16, else fp16."""
    device = as_device(device)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.bfloat16 in supported_dtypes(device) else torch.float16


def dtype_note(dtype: torch.dtype, device: torch.device) -> str:
    """Why a dtype may be slow here, in words (empty when it runs natively)."""
    device = as_device(device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        cap = torch.backends.cpu.get_cpu_capability()
        if dtype == torch.bfloat16 and "AMX" not in cap and not _cpu_has("avx512_bf16"):
            return "no bf16 units on this CPU (no AVX512-BF16/AMX): converted in software"
        if dtype == torch.float16 and not _cpu_has("avx512_fp16") and "AMX" not in cap:
            return "no fp16 arithmetic on this CPU: converted in software"
    return ""


CPU_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def cache_sizes(device: torch.device | str | None = None, root: Path | None = None) -> dict:
    """Bytes of each data cache level between this device and its memory, e.g. {'L1': 32768,
    'L2': 1048576, 'L3': 33554432}: on a CPU as Linux reports them for core 0 (an L3 is shared by
    the cores); on a CUDA GPU its L2. Empty where the system does not say."""
    device = as_device(device or "cpu")
    if device.type == "cuda":
        return {"L2": int(torch.cuda.get_device_properties(device).L2_cache_size)}
    sizes = {}
    for index in sorted((root or CPU_CACHE_DIR).glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction":
            sizes[f"L{level}"] = max(size, sizes.get(f"L{level}", 0))
    return sizes


def _parse_size(text: str) -> int:
    """'32K', '1024K', '32M' (as Linux writes cache sizes) → bytes."""
    text = text.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def last_level_cache(device: torch.device | str | None = None) -> int:
    """Bytes of the largest cache in front of memory (0 if unknown)."""
    return max(cache_sizes(device).values(), default=0)


# Binder gives a notebook 2 GB, and notebooks hold a model (~0.5 GB) beside the kernel (~0.5 GB):
# the streamed buffers get 256 MiB. A VM's share of a big shared L3 is far below what it reports:
# on a 2-core Xeon reporting 480 MiB, reads of 256 MiB ran at 30.3 GB/s, as fast as 768 MiB did
# (29.5; data/measured/cpu_xeon-amx480_*.csv, 2026-12-03), and 64 MiB at 51: memory speed by 256.
STREAM_CAP_BYTES = 256 * 2**20


def streamed_size(device, at_least: int, buffers: int = 1) -> tuple[int, bool]:
    """Bytes per buffer for a measurement that must stream from memory, not from a cache:
    `buffers` buffers that together hold at least twice the last-level cache (and `at_least`
    bytes each), within `STREAM_CAP_BYTES` in all. The flag says whether they got there (False:
    memory did not allow it, and the figure may include cache)."""
    need = 2 * last_level_cache(device)
    each = min(max(at_least, -(-need // buffers)), STREAM_CAP_BYTES // buffers)
    return int(each), each * buffers >= need


# CPU flags (as /proc/cpuinfo names them) for 16-bit and int8 matrix arithmetic
MATRIX_FLAGS = ("avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_has_int8_dot_product() -> bool:
    """AVX512-VNNI, AVX-VNNI or AMX: what CPU int8 matmul kernels (torch._int_mm) rely on."""
    return any(_cpu_has(flag) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | None = None) -> dict[str, str]:
    """The facts a result depends on: hardware, memory and library versions."""
    device = pick_device() if device is None else as_device(device)
    info = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu cores (logical)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "cpu vector ISA (torch)": torch.backends.cpu.get_cpu_capability(),
        "cpu matrix extensions": ", ".join(f for f in MATRIX_FLAGS if _cpu_has(f)) or "none",
        "RAM (GiB)": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "load average (1 min)": f"{os.getloadavg()[0]:.2f}",
        "caches": ", ".join(f"{k} {format_bytes(v)}" for k, v in cache_sizes(device).items()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "gpu count": str(torch.cuda.device_count()),
                "gpu memory (GiB)": f"{props.total_memory / 2**30:.1f}",
                "compute capability": f"{props.major}.{props.minor}",
                "CUDA (torch build)": str(torch.version.cuda),
            }
        )
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def load_note() -> str:
    """A warning when other programs keep this machine's cores busy (timings slow and noisy:
    on 2 cores two busy programs slow torch several-fold), else ""."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if load < 0.5 * cores:
        return ""
    return (
        f"⚠ the machine is busy (load average {load:.1f} on {cores} cores): timings will be slow "
        "and noisy. Close other notebooks and programs, then rerun for figures worth comparing."
    )


def device_kind(device: torch.device | str) -> str:
    device = as_device(device)
    if device.type == "cuda":
        return "multi-gpu" if torch.cuda.device_count() > 1 else "gpu"
    return "cpu"  # MPS laptops get the CPU-sized preset


@dataclass(frozen=True)
class Preset:
    """Sizes of every sweep in the course, chosen by device kind."""

    kind: str
    matmul_sizes: tuple[int, ...]  # square matmul sizes for the FLOP/s ceiling
    bandwidth_mib: int  # buffer for the memory-bandwidth ceiling
    repeats: int
    decode_tokens: int
    batch_sizes: tuple[int, ...]


PRESETS = {
    "cpu": Preset("cpu", (256, 512, 1024, 2048), 256, 7, 32, (1, 2, 4, 8, 16, 32)),
    "gpu": Preset("gpu", (512, 1024, 2048, 4096, 8192), 1024, 20, 64, (1, 4, 16, 64, 256)),
    "multi-gpu": Preset(
        "multi-gpu", (512, 1024, 2048, 4096, 8192), 1024, 20, 64, (1, 4, 16, 64, 256)
    ),
}


def preset(device: torch.device | None = None, override: str | None = None) -> Preset:
    """The preset for this device; `override` or $COURSE_PRESET picks another by name."""
    device = pick_device() if device is None else as_device(device)
    name = override or os.environ.get(PRESET_ENV) or device_kind(device)
    return PRESETS[checks.choice("preset", name, PRESETS)]


def as_device(value) -> torch.device:
    """A `torch.device` from a device or its name ('cpu', 'cuda', 'cuda:1', 'mps')."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value.strip().lower())
        except RuntimeError:
            pass
    hint = " (a GPU is 'cuda', or 'cuda:N')" if str(value).strip().lower() == "gpu" else ""
    raise ValueError(f"Unknown device {value!r}; pass a torch.device or 'cpu', 'cuda', 'mps'{hint}")


def check_finite(name: str, tensor: torch.Tensor, fix: str = "") -> torch.Tensor:
    """`tensor` unchanged if every value is finite; else say how many NaN/inf it holds."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum(dtype=torch.float32)):
        return tensor  # a NaN or inf anywhere makes the sum NaN or inf: one cheap pass
    bad = ~torch.isfinite(tensor)
    if bad.any():
        count = int(bad.sum())
        hint = f": {fix}" if fix else ""
        raise ValueError(f"{name} holds {count} NaN/inf value(s) of {tensor.numel()}{hint}")
    return tensor
