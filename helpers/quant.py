"""Quantization, written out: round-to-nearest formats (absmax and zero-point, per tensor,
channel or group), their errors, outlier statistics, the input a layer receives, and the quality
of a quantized model (perplexity, top-1 agreement and KL against a reference).

Notebook 01 writes the idea itself (int8 absmax per channel, int4 with zero points per group of
64, dequantize then matmul); tests/test_notebook_01.py checks it against `quantize` here. The
quantized linears live in `quant_linears`, the backends by name and their measurement in
`quant_backends`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from helpers import checks
from helpers.bench import quartiles
from helpers.device import check_finite

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


# --- Quality --------------------------------------------------------------------------------


# Positions whose logits are computed at once: (64, vocabulary) in fp32 is 12 MiB for SmolLM2,
# where a window of 256 would hold 48 MiB of logits and as much again for their softmax.
HEAD_CHUNK = 64


def head_nll(model, hidden: torch.Tensor, targets: torch.Tensor):
    """(negative log-likelihood of each target, the top-1 prediction) at each position, from the
    decoder's final hidden states (positions, hidden) through the output layer, `HEAD_CHUNK`
    positions at a time: never every position's logits at once."""
    head = model.get_output_embeddings()
    nll, top1 = [], []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[start : start + HEAD_CHUNK]).float()
        nll.append(F.cross_entropy(logits, targets[start : start + HEAD_CHUNK], reduction="none"))
        top1.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(top1)


def _window_nll(model, chunk: torch.Tensor) -> torch.Tensor:
    """The nll of each next token of one window of ids (1, n + 1). A plain output layer is fed
    `HEAD_CHUNK` positions at a time; any other (torch.ao's dynamic layer quantizes its whole
    input with one scale, so chunks would change its output), or a model without one, gets the
    window whole."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if type(head) is torch.nn.Linear and hasattr(model, "get_decoder"):
        hidden = model.get_decoder()(input_ids=chunk[:, :-1]).last_hidden_state[0]
        return head_nll(model, hidden, chunk[0, 1:])[0]
    logits = model(input_ids=chunk[:, :-1]).logits.float()
    return F.cross_entropy(logits[0], chunk[0, 1:], reduction="none")


def windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """One text `ids` (n,) cut as `perplexity` scores it: non-overlapping windows of `window`
    inputs, each with the token after its last (the last window may be shorter)."""
    ids = ids.reshape(-1)
    window = checks.whole("window", window)
    return [ids[start : start + window + 1] for start in range(0, ids.numel() - 1, window)]


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
    total, count = 0.0, 0
    for chunk in windows(ids, window):
        total += _window_nll(model, chunk[None]).sum().item()
        count += chunk.numel() - 1
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
    same, kl = [], []
    for start in range(0, logits.shape[0], HEAD_CHUNK):  # a few positions' softmaxes at a time
        ref = F.log_softmax(reference_logits[start : start + HEAD_CHUNK].float(), -1)
        other = F.log_softmax(logits[start : start + HEAD_CHUNK].float(), -1)
        same.append(ref.argmax(-1) == other.argmax(-1))
        kl.append(F.kl_div(other, ref, log_target=True, reduction="none").sum(-1))
    return torch.cat(same).float().mean().item(), torch.cat(kl).mean().item()
