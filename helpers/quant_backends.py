"""Quantization backends by name (what each stores, whether this device runs it, how it
quantizes a freshly loaded model), the bytes a backend's weights and one decode step should take,
and the measurement of every backend: size, quality and speed, one model in memory at a time.

The backends apply the course's linears (`quant_linears`), torchao, bitsandbytes (CUDA only)
and the deprecated `torch.ao` dynamic quantization that old tutorials use.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch

from helpers import checks, decode
from helpers.device import as_device, cpu_has_int8_dot_product
from helpers.memory import PeakMemory, release_freed_memory, weight_bytes
from helpers.quant import agreement_and_kl, perplexity
from helpers.quant_linears import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    kernel_path,
    replace_linears,
    torch_ao_dynamic,
    weight_scales,
)
from helpers.shapes import VALUE_BYTES, WEIGHT_BYTES, Shape, kv_cache_bytes

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
    if BACKENDS[name].linears not in ("fp32", "bf16", "fp16"):
        _own_copies(model)  # unmap the checkpoint the quantized weights were read from
    release_freed_memory()  # the full-precision weights quantization replaced
    return model, ""


def _mapped_checkpoints() -> list[tuple[int, int]]:
    """The address ranges where this process maps a safetensors file (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _own_copies(model: torch.nn.Module) -> None:
    """Give each plain tensor of `model` still read from a memory-mapped checkpoint (the
    embeddings and norms a backend leaves as loaded) memory of its own. The file stays mapped
    while any tensor views it, and with it every page that was read: the pages of the weights
    quantization replaced (200 MiB of SmolLM2's bf16 file) would stay resident beside their
    quantized copies."""
    ranges = _mapped_checkpoints()
    for t in [*model.parameters(), *model.buffers()]:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu":
            continue  # a quantized tensor subclass, or memory no file maps
        if any(start <= t.data_ptr() < end for start, end in ranges):
            t.data = t.data.clone()


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
