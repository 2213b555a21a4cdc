"""Weight-only quantized linears: a readable dequantize-then-matmul path that runs on any device,
PyTorch's packed CPU kernels as the fast path (used only for the shapes those kernels run), the
swap of a model's linears, and how a quantized model computes (`kernel_path`, `weight_scales`).
Also torch.ao's deprecated dynamic int8 linear, as old tutorials build it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from helpers.memory import release_freed_memory
from helpers.quant import quantize

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


def kernel_path(model: torch.nn.Module) -> str:
    """How the course's quantized linears in `model` compute ('' when it has none)."""
    paths = {m.path for m in model.modules() if hasattr(m, "path") and hasattr(m, "packed")}
    return ", ".join(sorted(paths))


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
