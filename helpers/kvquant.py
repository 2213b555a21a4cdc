"""A quantized KV cache and the decode loop that reads it.

Keys and values are stored in 8 bits with one scale per (sequence, KV head, position) — per head,
per token, so a token's scale never depends on another token's values and a chunk of tokens is
quantized exactly as the same tokens one at a time:

* `int8`: absmax, q = round(x / s) in [−127, 127] with s = max|x| / 127 over the head's
  head_dim values; the round-trip error is at most s / 2;
* `fp8`: float8 e4m3 (`torch.float8_e4m3fn`, 3 mantissa bits, largest 448) of x / s with
  s = max|x| / 448: a relative error of at most 2⁻⁴ per value (subnormals aside).

Scales are kept in fp32 (4 bytes per head per token). `QuantizedKVCache` duplicates
`decode.KVCache`'s interface (`keys`, `values`, `positions`, `head_dim`, `nbytes`) and adds
`store(i, positions, k, v)` and `read(i, end)`; the forward pass below is `decode.forward`'s with
the cache written and read through those two calls, around the same `decode.layers`. Attention
reads the keys and values *dequantized* (a float copy of one layer's cache at a time): plain
PyTorch has no attention kernel that reads int8, so on this path the cache is smaller but each
step moves more bytes, not fewer. `kv_dtype=None` stores the compute dtype unchanged (the same
loop with a float cache, for comparisons).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers import checks, decode
from helpers.bench import timed
from helpers.device import as_device
from helpers.shapes import Shape

KV_DTYPES = ("int8", "fp8")
INT8_MAX = 127
SCALE_BYTES = 4  # one fp32 scale per head per token, for keys and for values


def fp8_unsupported(device) -> str:
    """Why float8 e4m3 storage cannot run on `device` ("" when it can)."""
    device = as_device(device)
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn: upgrade torch, or use int8"
    try:
        torch.ones(2, device=device).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0][:120]
        return f"{device.type} cannot convert to float8_e4m3fn ({first}): use kv_dtype='int8'"
    return ""


def check_kv_dtype(kv_dtype, device) -> str | None:
    if kv_dtype is None:
        return None
    kv_dtype = checks.choice("kv_dtype", kv_dtype, KV_DTYPES)
    reason = fp8_unsupported(device) if kv_dtype == "fp8" else ""
    if reason:
        raise ValueError(f"kv_dtype='fp8' needs float8 on this device: {reason}")
    return kv_dtype


def storage_dtype(kv_dtype: str) -> torch.dtype:
    return torch.int8 if kv_dtype == "int8" else torch.float8_e4m3fn


def largest(kv_dtype: str) -> float:
    return INT8_MAX if kv_dtype == "int8" else torch.finfo(torch.float8_e4m3fn).max


def quantize_kv(x: torch.Tensor, kv_dtype: str = "int8"):
    """(q, scale) for x (batch, heads, tokens, head_dim): scale (batch, heads, tokens, 1)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / largest(kv_dtype)
    if kv_dtype == "int8":
        return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    return (x / scale).to(torch.float8_e4m3fn), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def bytes_per_token(shape: Shape, kv_dtype: str | None, value_bytes: float = 4) -> float:
    """KV bytes one token adds over all layers: keys and values, 1 byte per value + one scale
    per head (quantized), or `value_bytes` per value (float)."""
    values = 2 * shape.layers * shape.kv_heads * shape.head_dim
    if kv_dtype is None:
        return values * value_bytes
    return values + 2 * shape.layers * shape.kv_heads * SCALE_BYTES


class QuantizedKVCache:
    """Every layer's keys and values, 8-bit (batch, kv_heads, max_len, head_dim) with fp32 scales
    (batch, kv_heads, max_len, 1), pre-allocated; `kv_dtype=None` keeps them in `dtype`."""

    def __init__(self, config, batch, max_len, dtype, device, kv_dtype="int8") -> None:
        self.kv_dtype = check_kv_dtype(kv_dtype, device)
        self.dtype = dtype
        shape = Shape.of(config)
        self.head_dim = shape.head_dim
        full = (batch, shape.kv_heads, max_len, shape.head_dim)
        store = dtype if self.kv_dtype is None else storage_dtype(self.kv_dtype)
        n = shape.layers
        self.keys = [torch.zeros(full, dtype=store, device=device) for _ in range(n)]
        self.values = [torch.zeros(full, dtype=store, device=device) for _ in range(n)]
        scales = (*full[:3], 1) if self.kv_dtype else (0,)
        self.key_scales = [torch.zeros(scales, device=device) for _ in range(n)]
        self.value_scales = [torch.zeros(scales, device=device) for _ in range(n)]
        self.positions = torch.arange(max_len, device=device)

    @property
    def nbytes(self) -> int:
        tensors = self.keys + self.values + self.key_scales + self.value_scales
        return sum(t.numel() * t.element_size() for t in tensors)

    def store(self, i: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write layer i's keys and values (batch, kv_heads, len(positions), head_dim)."""
        if self.kv_dtype is None:
            self.keys[i].index_copy_(2, positions, k.to(self.dtype))
            self.values[i].index_copy_(2, positions, v.to(self.dtype))
            return
        for x, data, scales in (
            (k, self.keys, self.key_scales),
            (v, self.values, self.value_scales),
        ):
            q, scale = quantize_kv(x, self.kv_dtype)
            # as bytes: index_copy_ has no float8 kernel on CPU, and a byte copy is the same
            data[i].view(torch.uint8).index_copy_(2, positions, q.view(torch.uint8))
            scales[i].index_copy_(2, positions, scale)

    def read(self, i: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values at positions < end (all when None), in the compute dtype."""
        k, v = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        if self.kv_dtype is None:
            return k, v
        ks, vs = self.key_scales[i][:, :, :end], self.value_scales[i][:, :, :end]
        return dequantize_kv(k, ks, self.dtype), dequantize_kv(v, vs, self.dtype)


def forward(model, input_ids, cache: QuantizedKVCache, start: int, all_logits: bool = True):
    """Logits of `input_ids` at positions start, start + 1, …, attending to everything cached
    before them and causally among themselves (any `start`, so a text can be scored in chunks)."""
    body, end = model.model, start + input_ids.shape[1]
    hidden = body.embed_tokens(input_ids)
    positions = torch.arange(start, end, device=input_ids.device)
    cos, sin = body.rotary_emb(hidden, positions.unsqueeze(0))
    visible = positions[:, None] >= cache.positions[None, :end]  # (len, end): causal, shifted

    def attend(i, q, k, v, scale):
        cache.store(i, positions, k, v)
        keys, values = cache.read(i, end)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )

    hidden = decode.layers(model, hidden, cos, sin, cache.head_dim, attend)
    return model.lm_head(body.norm(hidden if all_logits else hidden[:, -1:]))


def decode_one_token(model, token, cache: QuantizedKVCache, pos: torch.Tensor):
    """The next token (batch, 1) after `token` at position `pos` (a 1-element tensor)."""
    body = model.model
    hidden = body.embed_tokens(token)
    cos, sin = body.rotary_emb(hidden, pos.view(1, 1))
    visible = (cache.positions <= pos).view(1, 1, 1, -1)

    def attend(i, q, k, v, scale):
        cache.store(i, pos, k, v)
        keys, values = cache.read(i)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )

    hidden = decode.layers(model, hidden, cos, sin, cache.head_dim, attend)
    return model.lm_head(body.norm(hidden))[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def greedy_decode(model, input_ids, new_tokens: int, kv_dtype="int8") -> decode.Generation:
    """`decode.greedy_decode` (eager, last-position logits) with a quantized cache."""
    new_tokens = checks.whole("new_tokens", new_tokens)
    decode.check_llama(model)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = QuantizedKVCache(model.config, batch, prompt_len + new_tokens, dtype, device, kv_dtype)

    def first():
        return forward(model, input_ids, cache, 0, all_logits=False)[:, -1].argmax(-1, True)

    token, ttft = timed(first, device)
    out, steps = [token], []
    for pos in range(prompt_len, prompt_len + new_tokens - 1):
        p = cache.positions[pos : pos + 1]
        token, seconds = timed(lambda t=token, p=p: decode_one_token(model, t, cache, p), device)
        out.append(token)
        steps.append(seconds)
    return decode.Generation(torch.cat(out, dim=1), ttft, steps)


@torch.inference_mode()
def prefill(model, input_ids, kv_dtype="int8") -> torch.Tensor:
    """A request's prefill into a quantized cache sized for one more token (notebook 02's
    search): the first new token."""
    batch, length = input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = QuantizedKVCache(model.config, batch, length + 1, dtype, input_ids.device, kv_dtype)
    return forward(model, input_ids, cache, 0, all_logits=False)[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def score(model, ids: torch.Tensor, kv_dtype="int8", chunk: int = 256):
    """(negative log-likelihood of each next token, the top-1 prediction at each position) of one
    text `ids` (n,), read in chunks through a cache holding everything before each chunk: what
    decoding token by token with this cache would compute, at every context up to n."""
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"ids must hold at least 2 tokens, got {ids.numel()}")
    chunk = checks.whole("chunk", chunk)
    dtype = next(model.parameters()).dtype
    cache = QuantizedKVCache(model.config, 1, ids.numel(), dtype, ids.device, kv_dtype)
    nll, top1 = [], []
    for start in range(0, ids.numel() - 1, chunk):
        piece = ids[start : min(start + chunk, ids.numel() - 1)]
        logits = forward(model, piece.unsqueeze(0), cache, start)[0].float()
        target = ids[start + 1 : start + 1 + piece.numel()]
        nll.append(F.cross_entropy(logits, target, reduction="none"))
        top1.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(top1)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.float().mean().item())
