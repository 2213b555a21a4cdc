"""Calibrated weight quantization: GPTQ and AWQ (the fast paths of notebook 01's idea cells) and
the driver that feeds them a model's activations, one decoder layer at a time.

Both keep round-to-nearest's format — `bits`-bit integers with one scale and one zero point per
group of `group_size` columns (`quant.quantize(..., symmetric=False)`) — and change only which
integers are stored:

* **GPTQ** (Frantar et al., ICLR 2023) rounds one column at a time and moves each column's
  rounding error onto the columns not yet rounded, weighted by the inverse of the Hessian
  H = 2·XᵀX / n of the layer's inputs X (tokens × in), so the layer's *output* on those inputs
  errs least. Dampening (a fraction of H's mean diagonal added to it) keeps H invertible; the
  updates inside a block of columns are applied at once to the rest (lazy batch updates).
* **AWQ** (Lin et al., MLSys 2024) multiplies each input channel of W by s = mean|x|^α before
  rounding and divides the input by s (folded into the previous norm or linear, so no bytes are
  added): channels with large activations get finer steps. α is searched on a grid for the
  lowest output error on the calibration inputs.

`quantize_model(model, calibration_ids, method, bits, group_size)` runs the calibration text
through the decoder layers in order, quantizes each layer from the inputs it receives (already
through the quantized layers before it, as GPTQ's reference code does), and replaces the
weights by their dequantized values in place (fake quantization: same values as the packed
format computes with). `quantized_nll` does the same and scores a text as it goes, each layer
released once the text has passed through it (one quantized layer in memory at a time);
`token_nll(..., release=True)` and `decoder_distinct` read a model the same way.
"""

from __future__ import annotations

import math
import sys

import torch

from helpers import checks, quant

METHODS = ("rtn", "gptq", "awq")
MAX_BITS = 8


def check_bits(bits) -> int:
    bits = checks.whole("bits", bits)
    if not 2 <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be 2–{MAX_BITS} for calibrated quantization, got {bits}: one bit leaves "
            "two levels per group (no zero point to spare); use bits=2 or more"
        )
    return bits


def check_group(group_size, columns: int) -> int:
    group_size = checks.whole("group_size", group_size)
    if columns % group_size:
        fits = [g for g in (32, 64, 128, 256) if columns % g == 0] or [columns]
        raise ValueError(
            f"group_size {group_size} does not divide the {columns} input columns; use one that "
            f"does, e.g. {fits}"
        )
    return group_size


def check_inputs(x: torch.Tensor, columns: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"the calibration inputs are empty or not (tokens, {columns}): got {got}; give at "
            "least one calibration token (e.g. a few hundred tokens of text)"
        )
    if x.shape[1] != columns:
        raise ValueError(f"the calibration inputs have {x.shape[1]} channels, W has {columns}")
    return x.float()


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 64) -> torch.Tensor:
    """Round-to-nearest with a zero point per group: the baseline both methods improve on."""
    check_group(group_size, w.shape[1])
    return quant.fake_quantize(w.float(), bits=check_bits(bits), group_size=group_size,
                               symmetric=False)  # fmt: skip


def torchao_rtn(w: torch.Tensor, bits: int = 4, group_size: int = 64) -> torch.Tensor:
    """ŵ from torchao's affine quantization primitives (what its int4 weight-only configs build
    on), asymmetric with `bits`-bit unsigned levels per group of `group_size` columns: a library's
    round-to-nearest to check `rtn` against. torchao's range always includes 0 (min(w, 0) to
    max(w, 0)), so the two agree on every group whose values span 0, not on one-signed groups."""
    bits, group_size = check_bits(bits), check_group(group_size, w.shape[1])
    try:
        from torchao.quantization import quant_primitives as qp
    except ImportError as err:
        raise ImportError("torchao_rtn needs torchao: pip install torchao") from err
    block, levels = (1, group_size), (0, 2**bits - 1)
    w = w.float()
    scale, zero = qp.choose_qparams_affine(
        w,
        qp.MappingType.ASYMMETRIC,
        block,
        torch.uint8,
        *levels,
        eps=1e-12,
        scale_dtype=torch.float32,
        zero_point_dtype=torch.float32,
    )
    q = qp.quantize_affine(w, block, scale, zero, torch.uint8, *levels)
    return qp.dequantize_affine(q, block, scale, zero, torch.uint8, *levels)


def spans_zero(w: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """(rows, groups) True where a group of `group_size` columns holds values of both signs."""
    g = w.reshape(w.shape[0], -1, check_group(group_size, w.shape[1]))
    return (g.amin(-1) < 0) & (g.amax(-1) > 0)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2·XᵀX / n (in × in) of inputs x (tokens × in): the curvature of ‖(Ŵ − W)·xᵀ‖²."""
    x = x.float()
    return 2 * x.T @ x / x.shape[0]


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹: row i holds how column i's
    error is spread over the columns after it."""
    h = h.float().clone()
    dead = h.diagonal() == 0  # an input channel that never fires: any weight does
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def group_grid(g: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) (rows,) of round-to-nearest's zero-point grid for each row of g."""
    _, scale, zero = quant.quantize(g, bits=bits, granularity="channel", symmetric=False)
    return scale.reshape(-1), zero.reshape(-1)


@torch.no_grad()
def gptq(w, h, bits=4, group_size=64, damp=0.01) -> torch.Tensor:
    """ŵ (out, in) on the group grid, chosen column by column to minimise ‖(ŵ − w)·Xᵀ‖ for the
    inputs whose Hessian is `h`. The lazy updates go block by block, one block per group: each
    group's grid is set at its first column from columns that hold every earlier update."""
    bits = check_bits(bits)
    rows, cols = w.shape
    group_size = check_group(group_size, cols)
    block = group_size
    levels = 2**bits - 1
    u = inverse_hessian_factor(h, damp)  # (in, in), upper triangular
    wt = w.float().T.clone()  # (in, out): one column of w is one contiguous row here
    wt[h.diagonal() == 0] = 0
    out = torch.empty_like(wt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small vector ops: a thread pool only adds waiting
    try:
        for start in range(0, cols, block):
            end = min(start + block, cols)
            wb, ub = wt[start:end].clone(), u[start:end, start:end]  # (block, out), (block, block)
            errors = torch.empty_like(wb)
            for i in range(end - start):
                if i % group_size == 0:  # this group's grid, from its columns as updated so far
                    scale, zero = group_grid(wb[i : i + group_size].T, bits)  # (out,) each
                q = (torch.round(wb[i] / scale) + zero).clamp_(0, levels)
                torch.mul(q - zero, scale, out=out[start + i])
                torch.div(wb[i] - out[start + i], ub[i, i], out=errors[i])
                wb[i + 1 :].addr_(ub[i, i + 1 :], errors[i], alpha=-1)  # spread over the block
            wt[end:].addmm_(u[start:end, end:].T, errors, alpha=-1)  # …and lazily the rest
    finally:
        torch.set_num_threads(threads)
    return out.T.contiguous().to(w.dtype)


@torch.no_grad()
def awq_scales(w, x, bits=4, group_size=64, grid=20) -> tuple[torch.Tensor, float, float]:
    """(s (in,), α, output error) for w (out, in) fed x (tokens, in): s = mean|x|^α, normalised
    to a geometric mean of 1, with α on `grid` points in [0, 1) minimising ‖x·(Q(w·s)/s)ᵀ − x·wᵀ‖
    (α = 0 is round-to-nearest, so the search never does worse on x)."""
    bits, grid = check_bits(bits), checks.whole("grid", grid)
    x = check_inputs(x, w.shape[1])
    w = w.float()
    exact = x @ w.T  # (tokens, out)
    magnitude = x.abs().mean(0).clamp(min=1e-8)  # (in,)
    best = (math.inf, None, 0.0)
    for alpha in [k / grid for k in range(grid)]:
        s = magnitude**alpha
        s = s / (s.max() * s.min()).sqrt()
        approx = rtn(w * s, bits, group_size) / s
        error = ((x @ approx.T - exact).norm() / exact.norm()).item()
        if error < best[0]:
            best = (error, s, alpha)
    error, s, alpha = best
    return s, alpha, error


# --- The driver: one decoder layer at a time -------------------------------------------------


# Linears that read the same input, and what produced it (where AWQ folds its 1/s): a norm or
# a linear. SmolLM2's o_proj reads the attention output, whose v heads are shared (GQA), so its
# scales could not be folded into v_proj: it gets round-to-nearest under AWQ, as AutoAWQ does.
SHARED_INPUTS = {
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    "o": (("self_attn.o_proj",), None),
    "gate_up": (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    "down": (("mlp.down_proj",), "mlp.up_proj"),
}


def capture_layer_inputs(layer, hidden, position_embeddings) -> tuple[dict, torch.Tensor]:
    """({group: inputs (tokens, in)}, the layer's output) for one decoder layer run on `hidden`."""
    captured, hooks = {}, []
    for group, (names, _) in SHARED_INPUTS.items():
        module = layer.get_submodule(names[0])

        def keep(mod, inp, out, group=group):
            captured[group] = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()

        hooks.append(module.register_forward_hook(keep))
    try:
        output = layer(hidden, position_embeddings=position_embeddings)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, output


def _set_weight(module: torch.nn.Module, w: torch.Tensor) -> None:
    """In place: a memory-mapped checkpoint's pages are replaced, not kept beside a new copy."""
    module.weight.data.copy_(w)


def _stacked(layer, names) -> torch.Tensor:
    return torch.cat([layer.get_submodule(n).weight.detach().float() for n in names])


def _unstack(layer, names, w: torch.Tensor) -> None:
    sizes = [layer.get_submodule(n).weight.shape[0] for n in names]
    for name, part in zip(names, w.split(sizes), strict=True):
        _set_weight(layer.get_submodule(name), part)


def quantize_layer(layer, inputs: dict, method: str, bits: int, group_size: int, **options):
    """Quantize one decoder layer's seven linears in place from its captured `inputs`."""
    if method == "awq":  # scales first, on the float layer, folded where their inputs come from
        for group, (names, source) in SHARED_INPUTS.items():
            if source is None:
                continue
            w = _stacked(layer, names)
            s, _, _ = awq_scales(w, inputs[group], bits, group_size, options.get("grid", 20))
            _unstack(layer, names, w * s)
            producer = layer.get_submodule(source)
            folded = producer.weight.detach().float()
            _set_weight(producer, folded / s if folded.dim() == 1 else folded / s[:, None])
    for group, (names, _) in SHARED_INPUTS.items():
        w = _stacked(layer, names)
        if method == "gptq":
            h = hessian(check_inputs(inputs[group], w.shape[1]))
            w = gptq(w, h, bits, group_size, options.get("damp", 0.01))
        else:
            w = rtn(w, bits, group_size)
        _unstack(layer, names, w)


def _layers_quantized(model, calibration_ids, method, bits, group_size, **options):
    """Each decoder layer of a Llama `model`, yielded right after it is quantized in place from
    the calibration inputs it receives through the layers quantized before it."""
    method = checks.choice("method", method, METHODS)
    bits = check_bits(bits)
    check_group(group_size, model.config.hidden_size)
    check_group(group_size, model.config.intermediate_size)
    if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.numel() == 0:
        raise ValueError(
            "the calibration set is empty: give token ids (batch, length), e.g. "
            "tokenizer(text, return_tensors='pt').input_ids[:, :512]"
        )
    ids = calibration_ids.reshape(-1, calibration_ids.shape[-1])
    body = model.model
    hidden = body.embed_tokens(ids)
    position_embeddings = _position_embeddings(body, hidden)
    for layer in body.layers:
        inputs, _ = capture_layer_inputs(layer, hidden, position_embeddings)
        quantize_layer(layer, inputs, method, bits, group_size, **options)
        del inputs
        hidden = layer(hidden, position_embeddings=position_embeddings)  # through the quantized one
        yield layer


def _position_embeddings(body, hidden: torch.Tensor):
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    return body.rotary_emb(hidden, positions)


@torch.no_grad()
def quantize_model(model, calibration_ids, method="gptq", bits=4, group_size=64, **options):
    """Quantize every decoder linear of a Llama `model` in place (the tied output layer stays as
    loaded), calibrated on `calibration_ids` (batch, length); 'rtn' ignores them."""
    for _ in _layers_quantized(model, calibration_ids, method, bits, group_size, **options):
        pass
    return model


def _layerwise_nll(model, ids, window, layers, release) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, top-1) of each next token of `ids`, its windows carried through `layers` (the
    decoder's, in order) one layer at a time, each layer's weights released after it when
    `release`; then the final norm and the output layer (`quant.head_nll`)."""
    body = model.get_decoder()
    windows = quant.windows(ids, window)
    hidden = [body.embed_tokens(chunk[None, :-1]) for chunk in windows]  # (1, positions, hidden)
    position_embeddings = [_position_embeddings(body, h) for h in hidden]
    for layer in layers:
        hidden = [
            layer(h, position_embeddings=pe)
            for h, pe in zip(hidden, position_embeddings, strict=True)
        ]
        if release:
            _release(layer)
    scored = [
        quant.head_nll(model, body.norm(h)[0], c[1:]) for h, c in zip(hidden, windows, strict=True)
    ]
    return torch.cat([n for n, _ in scored]), torch.cat([t for _, t in scored])


@torch.inference_mode()
def token_nll(
    model, ids: torch.Tensor, window: int = 256, release: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood of each next token, the top-1 prediction at each position) of
    one text `ids` (n,), in non-overlapping windows as `quant.perplexity` scores it: the mean's
    exponential is that perplexity, and paired per-token differences give a spread. The windows
    go through a Llama's decoder layers one layer at a time; `release=True` frees each layer's
    weights once they have (the model is used up), so a memory-mapped checkpoint is never
    resident whole."""
    return _layerwise_nll(model, ids, window, model.get_decoder().layers, release)


@torch.no_grad()
def quantized_nll(
    model, calibration_ids, ids, method="gptq", bits=4, group_size=64, window=256, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_nll(quantize_model(model, calibration_ids, method, bits, group_size), ids)`, one
    decoder layer at a time: the text's windows go through each layer right after it is
    quantized, and the layer's weights are then released, so one quantized layer is in memory at
    a time instead of a whole quantized copy. The model is used up: its decoder layers are left
    empty (load a fresh one for the next quantization)."""
    layers = _layers_quantized(model, calibration_ids, method, bits, group_size, **options)
    return _layerwise_nll(model, ids, window, layers, release=True)


_MADV_DONTNEED = 4  # Linux: drop these pages now; a later read sees the file (or zeros) again
_PAGE = 4096


def _release(module: torch.nn.Module) -> None:
    """Empty `module`'s parameters and hand their pages back to the OS at once. A checkpoint
    loaded memory-mapped keeps every page that was read — or copied when quantized in place —
    resident until the whole file is unmapped, with the last of the model's tensors; freeing a
    layer's tensors alone would return nothing. `madvise(MADV_DONTNEED)` on the whole pages
    inside each tensor returns them now (only pages no other tensor shares; CPU tensors)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    for p in module.parameters():
        if libc and p.device.type == "cpu" and p.numel() and p.is_contiguous():
            start = -(-p.data_ptr() // _PAGE) * _PAGE  # whole pages only: neighbours untouched
            end = (p.data_ptr() + p.numel() * p.element_size()) // _PAGE * _PAGE
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def paired_difference(nll_a: torch.Tensor, nll_b: torch.Tensor) -> tuple[float, float, float]:
    """(mean, low, high) of nll_a − nll_b per token in nats, low/high ± 2 standard errors: a
    difference whose range holds 0 is within the noise of which tokens were scored."""
    d = (nll_a - nll_b).double()
    mean, se = d.mean().item(), (d.std() / math.sqrt(d.numel())).item()
    return mean, mean - 2 * se, mean + 2 * se


def output_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """‖x·ŵᵀ − x·wᵀ‖ / ‖x·wᵀ‖: a quantized layer's error on inputs x (tokens, in)."""
    exact = x.float() @ w.float().T
    return ((x.float() @ w_hat.float().T - exact).norm() / exact.norm()).item()


def distinct_per_group(w: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """How many distinct values each group of `group_size` consecutive columns of w holds: at
    most 2^bits where w was dequantized from a `bits`-bit file with one grid per group (a Q4_1
    file: 16 per block of 32)."""
    check_group(group_size, w.shape[1])
    ordered = w.detach().reshape(-1, group_size).sort(-1).values
    return 1 + (ordered.diff(dim=-1) != 0).sum(-1)


def decoder_distinct(model, group_size: int = 32) -> torch.Tensor:
    """`distinct_per_group` of every decoder linear of `model` (the output layer left out), one
    count per group, each linear's weights released once counted: a memory-mapped checkpoint is
    never resident whole, and the model is used up."""
    counts = []
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            counts.append(distinct_per_group(module.weight, group_size))
            _release(module)
    return torch.cat(counts)


def planted_layer(seed: int, rows=128, cols=512, tokens=4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (rows, cols), x (tokens, cols)): a weight and inputs whose channels are correlated (a
    shared low-rank part), as real activations are, so GPTQ's error feedback has work to do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, 16, generator=g)
    x = torch.randn(tokens, 16, generator=g) @ mix.T + 0.3 * torch.randn(tokens, cols, generator=g)
    return torch.randn(rows, cols, generator=g) * 0.02, x


def salient_layer(
    seed: int, rows=128, cols=512, tokens=4096, salient=8, boost=20.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (rows, cols), x (tokens, cols)): inputs whose channels differ in size (a log-normal
    spread, e^(0.5·z)) with `salient` channels `boost`× larger, as a few channels of real
    activations are, so AWQ's per-channel scales have work to do (α = 0 is round-to-nearest)."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(0.5 * torch.randn(cols, generator=g))
    spread[torch.randperm(cols, generator=g)[:salient]] *= boost
    x = torch.randn(tokens, cols, generator=g) * spread
    return torch.randn(rows, cols, generator=g) * 0.02, x
