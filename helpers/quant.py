"""Quantization plumbing: the general quantizer, quantized linears, backends by name (with
capability detection), size, quality, and the measurement of every backend.

Notebook 01 writes the idea itself (int8 absmax per channel, int4 with zero points per group of
64, dequantize then matmul); tests/test_notebook_01.py checks it against `quantize` here. The
linears keep a readable dequantize-then-matmul path that runs on any device, with PyTorch's
packed CPU kernels as the fast path; the backends also apply torchao, bitsandbytes (CUDA only)
and the deprecated `torch.ao` dynamic quantization that old tutorials use.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F

from helpers import checks, decode
from helpers.bench import quartiles
from helpers.device import as_device, check_finite, cpu_has_int8_dot_product
from helpers.memory import PeakMemory, release_freed_memory, weight_bytes
from helpers.shapes import VALUE_BYTES, WEIGHT_BYTES, Shape, kv_cache_bytes

# --- Quantizers, written out -----------------------------------------------------------------


GRANULARITIES = ("tensor", "channel", "group")
MAX_BITS = 16


def _matrix(w) -> torch.Tensor:
    """`w` checked: a non-empty 2-D floating-point tensor with no NaN or inf."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(
            f"w must be a non-empty 2-D (rows, columns) matrix, got shape {tuple(w.shape)}: "
            "reshape it first, e.g. w.reshape(1, -1) for a vector or w.reshape(-1, w.shape[-1])"
        )
    return check_finite("w", w, "a NaN or inf would turn its whole group's scale into NaN")


def _groups(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """View a (rows, cols) matrix as (rows', groups, size): one scale per group."""
    rows, cols = _matrix(w).shape
    granularity = checks.choice("granularity", granularity, GRANULARITIES)
    if granularity == "tensor":
        return w.reshape(1, 1, -1)
    if granularity == "channel":  # one scale per output row
        return w.reshape(rows, 1, cols)
    group_size = checks.whole("group_size", group_size)
    if cols % group_size:
        # groups the packed int4 kernel also runs (INT4_KERNEL_GROUPS); smaller ones only if none
        divisors = (
            [d for d in (32, 64, 128, 256) if cols % d == 0]
            or [d for d in (16, 8) if cols % d == 0]
            or [cols]
        )
        raise ValueError(
            f"group_size {group_size} does not divide the {cols} columns; use e.g. {divisors}"
        )
    return w.reshape(rows, cols // group_size, group_size)


def quantize(w, bits=8, granularity=None, group_size=None, symmetric=True):
    """Integers q and the (scale, zero) that map them back: w ≈ (q − zero) · scale.

    Symmetric (absmax): zero = 0, scale = max|w| / (2^(bits−1) − 1), q in [−qmax, qmax].
    Asymmetric (zero-point): the range [min, max] maps onto [0, 2^bits − 1].
    `granularity` is 'tensor', 'channel' (one scale per row, the default) or 'group' (one per
    `group_size` columns of a row, default 64); a `group_size` given alone means 'group', and
    'tensor' or 'channel' ignore it.
    """
    if granularity is None:
        granularity = "channel" if group_size is None else "group"
    lowest = 2 if symmetric else 1  # symmetric 1-bit has no level but zero: every scale is ∞
    bits = checks.whole("bits", bits, minimum=lowest)
    if bits > MAX_BITS:
        raise ValueError(f"bits must be between {lowest} and {MAX_BITS}, got {bits}")
    g = _groups(w, granularity, 64 if group_size is None else group_size).float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
        zero = torch.zeros_like(scale)
        q = torch.round(g / scale).clamp(-qmax, qmax)
    else:
        levels = 2**bits - 1
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-12) / levels
        zero = torch.round(-lo / scale)
        q = (torch.round(g / scale) + zero).clamp(0, levels)
    return q, scale, zero


def dequantize(q, scale, zero, shape) -> torch.Tensor:
    return ((q - zero) * scale).reshape(shape)


def fake_quantize(w, **kwargs) -> torch.Tensor:
    """Quantize and dequantize: the values a quantized layer really computes with."""
    return dequantize(*quantize(w, **kwargs), w.shape)


def quantization_errors(
    w: torch.Tensor, bits: Sequence[int] = (2, 3, 4, 6, 8), group_size: int = 64
) -> pd.DataFrame:
    """Relative error ‖ŵ − w‖ / ‖w‖ of `w` for each bit width × granularity × scheme."""
    rows = []
    for b in bits:
        for granularity in GRANULARITIES:
            for symmetric in (True, False):
                approx = fake_quantize(
                    w, bits=b, granularity=granularity, group_size=group_size, symmetric=symmetric
                )
                rows.append(
                    {
                        "bits": b,
                        "granularity": granularity,
                        "scheme": "absmax" if symmetric else "zero-point",
                        "error": ((approx - w).norm() / w.norm()).item(),
                    }
                )
    return pd.DataFrame(rows)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖."""
    return ((approx - exact).norm() / exact.norm()).item()


def outlier_ratios(model, matrices: Sequence[str] = ("self_attn.q_proj", "mlp.down_proj")):
    """max |w| / std(w) of each named weight matrix in every decoder layer (a Llama's), and its
    int8 absmax error ‖ŵ − w‖ / ‖w‖ with one scale per tensor and one per output channel."""
    rows = []
    for i, layer in enumerate(model.model.layers):
        for name in matrices:
            w = layer.get_submodule(name).weight.detach().float()  # a copy, freed each turn
            row = {"layer": i, "matrix": name, "max / std": (w.abs().max() / w.std()).item()}
            for granularity in ("tensor", "channel"):
                approx = fake_quantize(w, bits=8, granularity=granularity)
                row[f"int8 error, per {granularity}"] = relative_error(approx, w)
            rows.append(row)
    return pd.DataFrame(rows)


@torch.inference_mode()
def output_errors(
    products: dict[str, Callable], exact: Callable, x: torch.Tensor, draws: int = 8, seed: int = 0
) -> pd.DataFrame:
    """Relative error ‖f(x) − exact(x)‖ / ‖exact(x)‖ of each quantized product `f` on `x` (real
    activations, tokens × channels) and on `draws` Gaussian inputs of x's shape and standard
    deviation — the same layer fed values without outlier channels (median and quartiles)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    gaussians = [
        torch.randn(x.shape, generator=gen, device=x.device) * x.std() for _ in range(draws)
    ]
    rows = []
    for name, f in products.items():
        q1, median, q3 = quartiles([relative_error(f(g), exact(g)) for g in gaussians])
        real = relative_error(f(x), exact(x))
        ratio = real / median if median else math.nan
        rows.append(
            {
                "scheme": name,
                "real activations": real,
                "Gaussian inputs": median,
                "Gaussian q1": q1,
                "Gaussian q3": q3,
                "real ÷ Gaussian": ratio,
            }
        )
    return pd.DataFrame(rows).set_index("scheme")


class _Captured(Exception):
    """Raised by capture_input's hook: the rest of the model need not run."""


@torch.inference_mode()
def capture_input(model, module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The input `module` receives while `model` runs on `input_ids` (detached). The forward
    pass stops there: the layers after it and the output layer's logits (tokens × vocabulary,
    200 MB in fp32 for 1,024 of SmolLM2's tokens) are never computed."""
    captured = []

    def keep(mod, inp):
        captured.append(inp[0].detach())
        raise _Captured

    hook = module.register_forward_pre_hook(keep)
    try:
        model(input_ids)
    except _Captured:
        pass
    finally:
        hook.remove()
    if not captured:
        raise ValueError("the module never ran in the model's forward pass: pass one of its layers")
    return captured[0]


# --- Quantized linears: a readable path everywhere, PyTorch's packed kernels where they exist --


# What PyTorch's packed CPU kernels accept (torch 2.13): `_weight_int8pack_mm` crashes the
# process (a segmentation fault, no Python error) when in_features is not a multiple of 16;
# `_weight_int4pack_mm_for_cpu` needs out_features divisible by 16 and a group of 32–256.
INT8_KERNEL_MULTIPLE = 16
INT4_KERNEL_MULTIPLE = 16
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _use_kernel(packed: bool | None, device: torch.device, op_name: str, unfit: str = "") -> bool:
    """Whether a layer runs PyTorch's packed CPU kernel `op_name` (None: wherever it exists and
    the layer's shape suits it; `unfit` says why the shape does not, "" when it does)."""
    available = device.type == "cpu" and hasattr(torch, op_name)
    if packed and not available:
        raise ValueError(
            f"packed=True needs torch.{op_name} on a CPU tensor (this is {device.type}); "
            "pass packed=None to dequantize then matmul where the kernel is missing"
        )
    if packed and unfit:
        raise ValueError(
            f"packed=True: torch.{op_name} {unfit}; pass packed=None to dequantize "
            "then matmul for this shape"
        )
    return (available and not unfit) if packed is None else bool(packed)


def _path(packed: bool, unfit: str) -> str:
    if packed:
        return "packed kernel"
    return f"dequantize then matmul ({unfit})" if unfit else "dequantize then matmul"


def int4_group_sizes(in_features: int) -> list[int]:
    """Group sizes the packed int4 kernel runs that divide `in_features` (the ones to suggest)."""
    return [g for g in INT4_KERNEL_GROUPS if in_features % g == 0]


class Int8WeightOnlyLinear(torch.nn.Module):
    """int8 weights with one absmax scale per output channel; activations stay 16-bit.

    Two paths compute the same product: `dequantize then matmul` (readable, runs on any device)
    and, on CPUs, PyTorch's fused `torch._weight_int8pack_mm`, which never writes ŵ to memory.
    `packed=None` picks the kernel where it exists; True or False forces one path.
    """

    def __init__(self, linear: torch.nn.Linear, compute_dtype=torch.bfloat16, packed=None):
        super().__init__()
        q, scale, _ = quantize(linear.weight.detach(), bits=8, granularity="channel")
        self.register_buffer("weight_int8", q.reshape(linear.weight.shape).to(torch.int8))
        self.register_buffer("scale", scale.reshape(-1).to(compute_dtype))  # (out,)
        self.bias = linear.bias
        in_f = linear.weight.shape[1]
        unfit = (
            f"needs in_features divisible by {INT8_KERNEL_MULTIPLE}, got {in_f}"
            if in_f % INT8_KERNEL_MULTIPLE
            else ""
        )
        self.packed = _use_kernel(packed, linear.weight.device, "_weight_int8pack_mm", unfit)
        self.path = _path(self.packed, unfit)

    def dequantized_weight(self) -> torch.Tensor:
        """ŵ (out, in) = q · scale, in the compute dtype: the values this layer multiplies by."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)  # (tokens, in)
        if self.packed:
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:
            y = flat @ self.dequantized_weight().T  # (tokens, in) · (in, out)
        y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(torch.nn.Module):
    """int4 weights, one scale and zero point per group of `group_size` (`quantize` with bits=4,
    symmetric=False), two weights per byte.

    Storage follows PyTorch's int4 kernels: per group a bf16 scale and a bf16 `offset`, the value
    level 8 stands for, so ŵ = (q − 8) · scale + offset, which equals (q − zero) · scale. On CPUs
    the weights are packed in the layout of `torch._weight_int4pack_mm_for_cpu` (fast path);
    elsewhere (or with packed=False) two nibbles per byte in order and `dequantized_weight()`
    then a plain matmul. Same bytes either way.
    """

    def __init__(self, linear: torch.nn.Linear, group_size: int = 64, packed=None):
        super().__init__()
        out_f, in_f = linear.weight.shape
        q, scale, zero = quantize(
            linear.weight.detach(),
            bits=4,
            granularity="group",
            group_size=group_size,
            symmetric=False,
        )
        q = q.reshape(out_f, in_f).to(torch.int32)  # (out, in), values 0 … 15
        self.group_size = group_size
        unfit = _int4_unfit(out_f, in_f, group_size)
        self.packed = _use_kernel(
            packed, linear.weight.device, "_weight_int4pack_mm_for_cpu", unfit
        )
        self.path = _path(self.packed, unfit)
        if self.packed:
            weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            weight = (q[:, 0::2] | q[:, 1::2] << 4).to(torch.uint8)  # (out, in / 2)
        self.register_buffer("weight_int4", weight)
        offset = (8 - zero) * scale  # (out, groups, 1): the value of level 8
        scales_zeros = torch.cat([scale, offset], 2)  # (out, groups, 2)
        self.register_buffer("scales_zeros", scales_zeros.transpose(0, 1).contiguous().bfloat16())
        self.bias = linear.bias

    def dequantized_weight(self) -> torch.Tensor:
        """ŵ (out, in) in bf16, from the in-order nibbles (the unpacked layout only)."""
        if self.packed:
            raise RuntimeError(
                "the weights are in the CPU kernel's layout; build with packed=False"
            )
        pairs = torch.stack([self.weight_int4 & 15, self.weight_int4 >> 4], -1)  # (out, in/2, 2)
        out_f = pairs.shape[0]
        q = pairs.reshape(out_f, -1, self.group_size).bfloat16()  # (out, groups, group_size)
        scale, offset = self.scales_zeros.transpose(0, 1).unbind(-1)  # (out, groups) each
        return ((q - 8) * scale[..., None] + offset[..., None]).reshape(out_f, -1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (tokens, in)
        if self.packed:
            y = torch._weight_int4pack_mm_for_cpu(
                flat, self.weight_int4, self.group_size, self.scales_zeros
            )
        else:
            y = flat @ self.dequantized_weight().T  # (tokens, in) · (in, out)
        y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _int4_unfit(out_f: int, in_f: int, group_size: int) -> str:
    if out_f % INT4_KERNEL_MULTIPLE:
        return f"needs out_features divisible by {INT4_KERNEL_MULTIPLE}, got {out_f}"
    if group_size not in INT4_KERNEL_GROUPS:
        fits = int4_group_sizes(in_f)
        return f"runs groups of {', '.join(map(str, INT4_KERNEL_GROUPS))}, not {group_size}" + (
            f" (for {in_f} columns: group_size={fits[-1]})" if fits else ""
        )
    return ""


def replace_linears(
    model: torch.nn.Module, make: Callable, skip=("lm_head",), release_every: int = 8
) -> torch.nn.Module:
    """Swap every nn.Linear (except `skip`, e.g. the output head tied to the embeddings).

    The float temporaries each quantizer makes are handed back to the OS every `release_every`
    layers: freed but kept by the C allocator, they added up to several hundred MiB."""
    swapped = 0
    parents = [name for name, module in model.named_modules()]  # names: a list of the modules
    for name in parents:  # themselves would keep every replaced layer alive until the end
        module = model.get_submodule(name)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not any(s in full for s in skip):
                setattr(module, child_name, make(child))
                del child  # the replaced layer's weights can go now
                swapped += 1
                if swapped % release_every == 0:
                    release_freed_memory()
    return model


# --- Backends by name -------------------------------------------------------------------------


@dataclass(kw_only=True)
class Backend:
    name: str
    weights: str  # what the weights are stored as
    why_unsupported: Callable[[torch.device], str]  # "" when it runs on the device
    apply: Callable  # (load(dtype) -> model) -> quantized model
    # Formats (keys of shapes.WEIGHT_BYTES) for the byte prediction: the attention and MLP
    # linears; the embeddings and norms (and the output layer, unless `head` says otherwise);
    # `head`: the format of an output layer the backend quantizes on its own — with tied
    # embeddings that is a second, quantized copy of the embedding matrix.
    linears: str = "fp32"
    rest: str = "fp32"
    head: str | None = None
    # the format its matmuls multiply in (a key of Ceilings.matmul_flops): weight-only formats
    # multiply 16-bit activations (`rest`'s format); dynamic ones int8 by int8
    compute: str | None = None

    @property
    def compute_format(self) -> str:
        if self.compute:
            return self.compute
        return self.linears if self.linears in ("fp32", "bf16", "fp16") else self.rest


def _needs_cuda(dev):
    return "" if dev.type == "cuda" else "bitsandbytes needs a CUDA GPU"


def _torchao(dev):
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return ""


def _torchao_int8_dynamic(dev):
    if dev.type == "cpu" and not cpu_has_int8_dot_product():
        return (
            "this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), so "
            "torch._int_mm falls back to a reference loop that takes minutes per forward pass"
        )
    return _torchao(dev)


def _torchao_int4(dev):
    if dev.type != "cuda":
        return "torchao's int4 weight-only kernels need CUDA (use int4 weight-only (PyTorch op))"
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 8:
        return "tinygemm int4 needs an Ampere or newer GPU (a T4 is Turing)"
    return _torchao(dev)


def _torch_ao_dynamic(dev):
    if dev.type != "cpu":
        return "torch.ao dynamic quantization runs on CPU only"
    return ""


def _not_the_head(module, name):
    """torchao's filter: every Linear but the output layer, which stays tied to the embeddings in
    16 bit, as with the course's linears (quantizing it would untie it: a second, int8 copy of the
    embedding matrix, and a transient fp32 one while it is made)."""
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def _apply_torchao(config_name, **kwargs):
    def apply(load):
        import torchao.quantization as tq

        model = load(torch.bfloat16)
        tq.quantize_(model, getattr(tq, config_name)(**kwargs), filter_fn=_not_the_head)
        return model

    return apply


def _apply_bnb(**kwargs):
    def apply(load):
        from transformers import BitsAndBytesConfig

        return load(torch.float16, quantization_config=BitsAndBytesConfig(**kwargs))

    return apply


def torch_ao_dynamic_linear(linear: torch.nn.Linear, per_channel: bool = False):
    """One Linear as `quantize_dynamic` converts it: int8 weights with one scale per tensor
    (torch.ao's default qconfig) or per output channel (`per_channel_dynamic_qconfig`); at run
    time the activations are quantized per tensor (reduce_range: 7 bits on x86)."""
    q = torch.ao.quantization
    linear = copy.deepcopy(linear).float()  # the caller's layer stays as it is
    linear.qconfig = q.per_channel_dynamic_qconfig if per_channel else q.default_dynamic_qconfig
    return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)


def torch_ao_dynamic(load, per_channel: bool = False):
    """What `quantize_dynamic(model.float(), {nn.Linear}, dtype=torch.qint8)` makes (every Linear,
    the output layer included), converted one layer at a time from the 16-bit checkpoint: a whole
    fp32 copy beside the bf16 one would double the memory this step needs."""

    def make(linear):
        return torch_ao_dynamic_linear(linear, per_channel)

    model = replace_linears(load(torch.bfloat16), make, skip=())
    return model.float()  # embeddings and norms: the activations the int8 layers expect


def _runs_everywhere(dev):
    return ""


def _load_as(dtype):
    return lambda load: load(dtype)


def _course_linears(layer):
    return lambda load: replace_linears(load(torch.bfloat16), layer)


# One backend per entry, its fields aligned (a table: `# fmt: skip` keeps it so); `linears`,
# `rest`, `head` and `compute` are keys of shapes.WEIGHT_BYTES.
BACKENDS = {
    b.name: b
    for b in [
        Backend(name="fp32", weights="fp32", why_unsupported=_runs_everywhere,
                apply=_load_as(torch.float32), linears="fp32", rest="fp32"),
        Backend(name="bf16", weights="bf16", why_unsupported=_runs_everywhere,
                apply=_load_as(torch.bfloat16), linears="bf16", rest="bf16"),
        Backend(name="fp16", weights="fp16", why_unsupported=_runs_everywhere,
                apply=_load_as(torch.float16), linears="fp16", rest="fp16"),
        Backend(name="int8 weight-only (PyTorch op)", weights="int8, per channel",
                why_unsupported=_runs_everywhere, apply=_course_linears(Int8WeightOnlyLinear),
                linears="int8", rest="bf16"),
        Backend(name="int4 weight-only (PyTorch op)", weights="int4, groups of 64",
                why_unsupported=_runs_everywhere, apply=_course_linears(Int4WeightOnlyLinear),
                linears="int4", rest="bf16"),
        Backend(name="int8 weight-only (torchao)", weights="int8, per channel",
                why_unsupported=_torchao, apply=_apply_torchao("Int8WeightOnlyConfig"),
                linears="int8", rest="bf16"),
        Backend(name="int8 dynamic (torchao)", weights="int8 weights and activations",
                why_unsupported=_torchao_int8_dynamic,
                apply=_apply_torchao("Int8DynamicActivationInt8WeightConfig"),
                linears="int8", rest="bf16", compute="int8"),
        Backend(name="int4 weight-only (torchao)", weights="int4, groups of 64",
                why_unsupported=_torchao_int4,
                apply=_apply_torchao("Int4WeightOnlyConfig", group_size=64),
                linears="int4", rest="bf16"),
        Backend(name="int8 (bitsandbytes)", weights="int8 with outliers in fp16",
                why_unsupported=_needs_cuda, apply=_apply_bnb(load_in_8bit=True),
                linears="int8", rest="fp16"),
        Backend(name="nf4 (bitsandbytes)", weights="4-bit NormalFloat",
                why_unsupported=_needs_cuda,
                apply=_apply_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.float16),
                linears="int4", rest="fp16"),
        Backend(name="torch.ao dynamic int8 (deprecated)", weights="int8 weights and activations",
                why_unsupported=_torch_ao_dynamic, apply=torch_ao_dynamic,
                linears="int8", rest="fp32", head="int8", compute="int8"),
    ]
}  # fmt: skip


def load_backend(name: str, load: Callable, device: torch.device):
    """(model, "") for a backend this device runs, or (None, "unsupported here: <reason>").

    `load(dtype, **from_pretrained_kwargs)` returns a fresh copy of the model on `device`.
    The PyTorch-op backends run everywhere: PyTorch's packed kernels on CPUs, the readable
    dequantize-then-matmul path elsewhere (`kernel_path` says which ran).
    """
    name = checks.choice("backend", name, BACKENDS)
    device = as_device(device)
    reason = BACKENDS[name].why_unsupported(device)
    if reason:
        return None, f"unsupported here: {reason}"
    model = BACKENDS[name].apply(load).eval()
    release_freed_memory()  # the full-precision weights quantization replaced
    return model, ""


def kernel_path(model: torch.nn.Module) -> str:
    """How the course's quantized linears in `model` compute ('' when it has none)."""
    paths = {m.path for m in model.modules() if hasattr(m, "path") and hasattr(m, "packed")}
    return ", ".join(sorted(paths))


def predicted_weight_bytes(shape: Shape, backend: str) -> dict[str, float]:
    """Bytes each part of the model should take in `backend`, from the shape's parameter counts
    and `shapes.WEIGHT_BYTES`: the attention and MLP linears in the backend's format, the
    embeddings and norms as loaded (16-bit for the quantized backends, fp32 for torch.ao's), and
    an output layer quantized on its own as a separate copy. Scales per row (int8) are left out
    (~0.2 % for SmolLM2); int4's are in WEIGHT_BYTES."""
    b = BACKENDS[checks.choice("backend", backend, BACKENDS)]
    parts = shape.components()
    head_params = shape.vocab * shape.hidden
    predicted = {
        f"attention + MLP linears ({b.linears})": (parts["attention"] + parts["mlp"])
        * WEIGHT_BYTES[b.linears],
        f"embeddings + norms ({b.rest})": (parts["embeddings"] + parts["norms"])
        * WEIGHT_BYTES[b.rest],
    }
    if not shape.tied_embeddings:
        head = b.head or b.rest
        predicted[f"lm_head ({head})"] = head_params * WEIGHT_BYTES[head]
    elif b.head:
        predicted[f"lm_head, an untied copy of the embeddings ({b.head})"] = (
            head_params * WEIGHT_BYTES[b.head]
        )
    return predicted


def step_bytes(shape: Shape, backend: str, batch: int, context: int) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences reads, by part, when the KV cache holds
    `context` positions: every attention and MLP weight once, the norms, **one embedding row per
    sequence** (a lookup, not the table), the output layer whole (tied: the embedding matrix, in
    the format the backend keeps it), and every cached key and value (the course's loop attends
    over the whole pre-allocated cache, masked)."""
    b = BACKENDS[checks.choice("backend", backend, BACKENDS)]
    parts, head = shape.components(), b.head or b.rest
    return {
        f"attention + MLP linears ({b.linears})": (parts["attention"] + parts["mlp"])
        * WEIGHT_BYTES[b.linears],
        f"norms ({b.rest})": parts["norms"] * WEIGHT_BYTES[b.rest],
        f"{batch} embedding row{'s' if batch > 1 else ''} ({b.rest})": batch
        * shape.hidden
        * WEIGHT_BYTES[b.rest],
        f"lm_head ({head})": shape.vocab * shape.hidden * WEIGHT_BYTES[head],
        f"KV cache ({b.rest})": kv_cache_bytes(shape, batch, context, VALUE_BYTES[b.rest]),
    }


def step_flops(shape: Shape, batch: int, context: int) -> float:
    """FLOPs of one decode step: 2 per weight of every linear and the output layer per sequence,
    plus attention's q·k and p·v over `context` positions (4 · heads · head_dim per position)."""
    parts = shape.components()
    weights = parts["attention"] + parts["mlp"] + shape.vocab * shape.hidden
    attention = 4 * shape.layers * shape.heads * shape.head_dim * context
    return batch * (2 * weights + attention)


def weight_scales(model: torch.nn.Module) -> str:
    """How the first quantized linear of `model` shares its weight scales, read from the layer
    itself: 'per tensor', 'per channel', 'per group of N' ('' when no linear is quantized)."""
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            qscheme = m.weight().qscheme()
            tensor = qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric)
            return f"{'per tensor' if tensor else 'per channel'} (qscheme {qscheme})"
        if isinstance(m, Int8WeightOnlyLinear):
            return "per channel"
        if isinstance(m, Int4WeightOnlyLinear):
            return f"per group of {m.group_size}"
        weight = getattr(m, "weight", None)
        block = getattr(weight, "block_size", None)  # torchao's quantized tensors
        if block is not None:
            rows, cols = weight.shape
            if tuple(block) == (rows, cols):
                return "per tensor"
            return "per channel" if block[-1] == cols else f"per group of {block[-1]}"
        state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit
        if state is not None:
            return f"per block of {state.blocksize}"
        if hasattr(weight, "SCB"):  # bitsandbytes int8: one scale per row
            return "per channel"
    return ""


# --- Measuring every backend, one model in memory at a time ----------------------------------


class BackendResults(NamedTuple):
    """What `measure_backends` returns: two tidy tables.

    `backends`: one row per backend (index: its name) with status, kernel path, weight scales,
    weight bytes (measured and predicted), size on disk, load peak, perplexity, top-1 agreement
    and KL against fp32. `speed`: one row per backend × batch (backend, batch, ms, q1_ms, q3_ms,
    oom): time per output token, median and quartiles; NaN where the batch ran out of memory."""

    backends: pd.DataFrame
    speed: pd.DataFrame


SPEED_COLUMNS = ("backend", "batch", "ms", "q1_ms", "q3_ms", "oom")


def measure_backends(
    load: Callable,
    device,
    eval_ids: torch.Tensor,
    batches: Sequence[int],
    names: Sequence[str] | None = None,
    *,
    prompt_tokens: int = 8,
    new_tokens: int = 15,
    compare_positions: int = 128,
    reference: str = "fp32",
) -> BackendResults:
    """Measure every backend of `names` (default: all) on a fresh copy of the model each.

    Memory and quality as `BackendResults.backends` lists them: perplexity on `eval_ids`, top-1
    agreement and KL against `reference` (fp32, measured first whatever the order of `names`)
    on the first `compare_positions` tokens. Speed from `decode.sweep`: a warm-up, then the
    `new_tokens` − 1 decode steps after a `prompt_tokens`-token prompt, at each batch.

    One model lives at a time: each is freed before the next loads, so the peak is the largest
    single backend's, not their sum.
    """
    device = as_device(device)
    names = checks.names("names", names, BACKENDS) if names is not None else tuple(BACKENDS)
    reference = checks.choice("reference", reference, BACKENDS)
    model, note = load_backend(reference, load, device)
    if model is None:
        raise ValueError(f"the reference backend {reference!r} is {note}: pass reference='fp32'")
    reference_logits = _logits(model, eval_ids[:compare_positions], device)
    del model
    rows, speeds = [], []
    for name in names:  # every name checked above, before the first (slow) measurement
        release_freed_memory()  # the previous backend, before measuring this one
        with PeakMemory(device) as peak:
            model, note = load_backend(name, load, device)
        row = {"backend": name, "stored as": BACKENDS[name].weights, "status": note or "ok"}
        if model is not None:
            row |= _memory_and_quality(model, name, eval_ids, reference_logits, device)
            row["load_peak_increase"] = peak.increase_bytes
            speed = decode.sweep(model, [prompt_tokens], batches, new_tokens)
            speeds.append(_speed_rows(name, speed))
            row["out of memory at batch"] = ", ".join(str(b) for b in speed.batch[speed.oom])
            del model
        rows.append(row)
    release_freed_memory()
    speed = pd.concat(speeds, ignore_index=True) if speeds else pd.DataFrame(columns=SPEED_COLUMNS)
    return BackendResults(pd.DataFrame(rows).set_index("backend"), speed)


@torch.inference_mode()
def _logits(model, ids: torch.Tensor, device) -> torch.Tensor:
    """The model's logits (positions, vocab) on one sequence of ids, in fp32 on the CPU."""
    return model(input_ids=ids.unsqueeze(0).to(device)).logits[0].float().cpu()


def _memory_and_quality(model, name, eval_ids, reference_logits, device) -> dict:
    shape = Shape.of(model.config)
    logits = _logits(model, eval_ids[: reference_logits.shape[0]], device)
    agreement, kl = agreement_and_kl(reference_logits, logits)
    return {
        "kernel": kernel_path(model),
        "weight scales": weight_scales(model),
        "weight_bytes": weight_bytes(model, include_buffers=True),
        "predicted_bytes": sum(predicted_weight_bytes(shape, name).values()),
        "serialized_bytes": serialized_bytes(model),
        "perplexity": perplexity(model, eval_ids.to(device)),
        "top1_agreement": agreement,
        "kl_vs_fp32": kl,
    }


def _speed_rows(name: str, sweep: pd.DataFrame) -> pd.DataFrame:
    """`decode.sweep` rows as the long speed table: ms per output token, NaN where out of memory."""
    oom = sweep.oom.astype(bool)
    ms = sweep.reindex(columns=["tpot_s", "tpot_q1_s", "tpot_q3_s"]).mul(1e3).where(~oom)
    return pd.DataFrame(
        {
            "backend": name,
            "batch": sweep.batch.to_numpy(),
            "ms": ms.tpot_s.to_numpy(),
            "q1_ms": ms.tpot_q1_s.to_numpy(),
            "q3_ms": ms.tpot_q3_s.to_numpy(),
            "oom": oom.to_numpy(),
        }
    )


# --- Size -----------------------------------------------------------------------------------


def serialized_bytes(model: torch.nn.Module) -> int:
    """Size of the model's state dict written with torch.save (to a temporary file, not to
    memory: an in-memory buffer would briefly hold a second copy of the model)."""
    with tempfile.TemporaryFile() as f:
        torch.save(model.state_dict(), f)
        return f.tell()


# --- Quality --------------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 256) -> float:
    """exp(mean negative log-likelihood of each next token), over non-overlapping windows.

    `ids`: one sequence of token ids, shaped (n,) or (1, n) as a tokenizer returns it.
    """
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(
            f"ids must be one sequence of at least 2 tokens, shaped (n,) or (1, n); got shape "
            f"{tuple(ids.shape)}: score several texts one at a time"
        )
    window = checks.whole("window", window)
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    if not math.isfinite(total):
        raise ValueError(
            "the model's logits hold NaN or inf, so perplexity is undefined: check the weights "
            "(e.g. device.check_finite on each parameter) and the precision (fp16 can overflow)"
        )
    return math.exp(total / count)


def agreement_and_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference ‖ other) over positions, in nats."""
    if reference_logits.shape != logits.shape:
        raise ValueError(
            f"the two logits differ in shape: {tuple(reference_logits.shape)} vs "
            f"{tuple(logits.shape)}; compare the same tokens from the two models"
        )
    check_finite("reference_logits", reference_logits)
    check_finite("logits", logits, "the quantized model produced NaN/inf")
    ref = F.log_softmax(reference_logits.float(), -1)
    other = F.log_softmax(logits.float(), -1)
    agree = (ref.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = F.kl_div(other, ref, log_target=True, reduction="none").sum(-1).mean().item()
    return agree, kl
