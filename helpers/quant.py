"""Quantization: reference quantizers, backends by name (with capability detection), size, quality.

The quantizers at the top are the teaching code notebook 01 shows; the backends below apply real
kernels to a model: PyTorch's own int8/int4 weight-only matmuls, torchao, bitsandbytes (CUDA only),
and the deprecated `torch.ao` dynamic quantization that old tutorials use.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helpers import checks
from helpers.device import as_device, check_finite, cpu_has_int8_dot_product
from helpers.memory import release_freed_memory

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
        divisors = [d for d in (16, 32, 64, 128, 256) if cols % d == 0] or [cols]
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


# --- Kernels PyTorch ships: int8 and int4 weight-only matmuls --------------------------------


class Int8WeightOnlyLinear(torch.nn.Module):
    """int8 weights with one scale per output channel; activations stay 16-bit."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype=torch.bfloat16):
        super().__init__()
        q, scale, _ = quantize(linear.weight.detach(), bits=8, granularity="channel")
        self.register_buffer("weight_int8", q.reshape(linear.weight.shape).to(torch.int8))
        self.register_buffer("scale", scale.reshape(-1).to(compute_dtype))
        self.bias = linear.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(torch.nn.Module):
    """int4 weights (asymmetric, one scale and zero per group), packed two per byte."""

    def __init__(self, linear: torch.nn.Linear, group_size: int = 64):
        super().__init__()
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        g = _groups(w, "group", group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-6) / 15
        zero = lo + 8 * scale  # PyTorch's int4 kernel dequantizes as (q − 8) · scale + zero
        q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
        self.group_size = group_size
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        scales_zeros = torch.cat([scale.reshape(out_f, -1, 1), zero.reshape(out_f, -1, 1)], 2)
        self.register_buffer("scales_zeros", scales_zeros.transpose(0, 1).contiguous().bfloat16())
        self.bias = linear.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size,
                                              self.scales_zeros)  # fmt: skip
        y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def replace_linears(model: torch.nn.Module, make: Callable, skip=("lm_head",)) -> torch.nn.Module:
    """Swap every nn.Linear (except `skip`, e.g. the output head tied to the embeddings)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not any(s in full for s in skip):
                setattr(module, child_name, make(child))
    return model


# --- Backends by name -------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    weights: str  # what the weights are stored as
    why_unsupported: Callable[[torch.device], str]  # "" when it runs on the device
    apply: Callable  # (load(dtype) -> model) -> quantized model


def _no_cuda(dev):
    return "" if dev.type == "cuda" else "bitsandbytes needs a CUDA GPU"


def _cpu_op(op_name):
    def check(dev):
        if dev.type != "cpu":
            return f"the course's {op_name} kernel is the CPU one; on GPUs use torchao"
        return "" if hasattr(torch, op_name) else f"this torch has no torch.{op_name}"

    return check


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


def _apply_torchao(config_name, **kwargs):
    def apply(load):
        import torchao.quantization as tq

        model = load(torch.bfloat16)
        tq.quantize_(model, getattr(tq, config_name)(**kwargs))
        return model

    return apply


def _apply_bnb(**kwargs):
    def apply(load):
        from transformers import BitsAndBytesConfig

        return load(torch.float16, quantization_config=BitsAndBytesConfig(**kwargs))

    return apply


def _apply_torch_ao_dynamic(load):
    # fp32 copies made from the 16-bit checkpoint: unlike a memory-mapped fp32 load, their
    # memory is really released once quantization replaces them.
    model = load(torch.bfloat16).float()
    return torch.ao.quantization.quantize_dynamic(
        model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
    )


def _ok(dev):
    return ""


BACKENDS = {
    b.name: b
    for b in [
        Backend("fp32", "fp32", _ok, lambda load: load(torch.float32)),
        Backend("bf16", "bf16", _ok, lambda load: load(torch.bfloat16)),
        Backend("fp16", "fp16", _ok, lambda load: load(torch.float16)),
        Backend("int8 weight-only (PyTorch op)", "int8, per channel",
                _cpu_op("_weight_int8pack_mm"),
                lambda load: replace_linears(load(torch.bfloat16), Int8WeightOnlyLinear)),
        Backend("int4 weight-only (PyTorch op)", "int4, groups of 64",
                _cpu_op("_weight_int4pack_mm_for_cpu"),
                lambda load: replace_linears(load(torch.bfloat16), Int4WeightOnlyLinear)),
        Backend("int8 weight-only (torchao)", "int8, per channel", _torchao,
                _apply_torchao("Int8WeightOnlyConfig")),
        Backend("int8 dynamic (torchao)", "int8 weights and activations", _torchao_int8_dynamic,
                _apply_torchao("Int8DynamicActivationInt8WeightConfig")),
        Backend("int4 weight-only (torchao)", "int4, groups of 64", _torchao_int4,
                _apply_torchao("Int4WeightOnlyConfig", group_size=64)),
        Backend("int8 (bitsandbytes)", "int8 with outliers in fp16", _no_cuda,
                _apply_bnb(load_in_8bit=True)),
        Backend("nf4 (bitsandbytes)", "4-bit NormalFloat", _no_cuda,
                _apply_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float16)),
        Backend("torch.ao dynamic int8 (deprecated)", "int8 weights and activations",
                _torch_ao_dynamic, _apply_torch_ao_dynamic),
    ]
}  # fmt: skip


def load_backend(name: str, load: Callable, device: torch.device):
    """(model, "") for a backend this device runs, or (None, "unsupported here: <reason>").

    `load(dtype, **from_pretrained_kwargs)` returns a fresh copy of the model on `device`.
    """
    name = checks.choice("backend", name, BACKENDS)
    device = as_device(device)
    reason = BACKENDS[name].why_unsupported(device)
    if reason:
        return None, f"unsupported here: {reason}"
    model = BACKENDS[name].apply(load).eval()
    release_freed_memory()  # the full-precision weights quantization replaced
    return model, ""


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
            "(e.g. checks.finite on each parameter) and the precision (fp16 can overflow)"
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
