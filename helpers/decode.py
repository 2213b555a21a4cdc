"""Greedy decoding with a pre-allocated (static) KV cache, timed per phase.

Prefill processes the whole prompt once and yields the first token (time to first token, TTFT);
each decode step then feeds one token per sequence and reads every weight once (time per output
token, TPOT). The KV cache is two tensors per layer, allocated up front for prompt + new tokens,
so no step allocates, and its size is exactly 2 · layers · batch · length · kv_heads · head_dim ·
bytes.

The forward pass below calls the Hugging Face Llama model's own modules (embeddings, norms,
projections, rotary embedding) but drives them directly, gpt-fast style, without the framework's
generic machinery; it produces exactly the logits of the model's own forward.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from helpers.bench import measure, quartiles, synchronize


@dataclass
class Generation:
    tokens: torch.Tensor  # (batch, generated) new tokens only
    ttft_s: float  # prefill + first token
    step_s: list[float]  # one entry per later token

    @property
    def tpot_s(self) -> float:
        return quartiles(self.step_s)[1]

    @property
    def latency_s(self) -> float:
        return self.ttft_s + sum(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of the whole batch per second of decode steps."""
        return self.tokens.shape[0] / self.tpot_s

    def row(self, **extra) -> dict:
        return {
            "batch": self.tokens.shape[0],
            "new_tokens": self.tokens.shape[1],
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "tpot_q1_s": quartiles(self.step_s)[0],
            "tpot_q3_s": quartiles(self.step_s)[2],
            "latency_s": self.latency_s,
            "tokens_per_s": self.tokens_per_s,
            **extra,
        }


class KVCache:
    """Keys and values of every layer: (batch, kv_heads, max_len, head_dim) each, pre-allocated."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device) -> None:
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        shape = (batch, config.num_key_value_heads, max_len, head_dim)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _check_llama(model) -> None:
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        raise TypeError(
            f"The course's decode loop drives Llama-architecture models (SmolLM2, Llama-2/3); got "
            f"{type(model).__name__}. Use `model.generate` for other architectures."
        )


def forward(
    model, input_ids: torch.Tensor, cache: KVCache, start: int, all_logits: bool = True
) -> torch.Tensor:
    """Logits for `input_ids` placed at positions start, start+1, …; fills the cache there.

    `all_logits=False` scores only the last position (what serving engines do at prefill)."""
    body, (batch, length) = model.model, input_ids.shape
    end = start + length
    head_dim = cache.keys[0].shape[-1]
    hidden = body.embed_tokens(input_ids)
    positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0)
    cos, sin = body.rotary_emb(hidden, positions)
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache.keys[i][:, :, start:end] = k
        cache.values[i][:, :, start:end] = v
        o = F.scaled_dot_product_attention(
            q,
            cache.keys[i][:, :, :end],
            cache.values[i][:, :, :end],
            is_causal=length > 1,  # the prompt attends causally; one new token sees all keys
            scale=attn.scaling,
            enable_gqa=True,  # several query heads share each key/value head
        )
        hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
        x = layer.post_attention_layernorm(hidden)
        hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(body.norm(hidden if all_logits else hidden[:, -1:]))


@torch.inference_mode()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    all_logits: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Generation:
    """Generate `new_tokens` greedily (fewer if every sequence hits `eos_token_id`).

    Prompts in a batch must have equal length (no padding). Matches `model.generate(...,
    do_sample=False)` token for token. `all_logits=False` scores only the last prompt position
    at prefill, saving batch · prompt · vocab logits (the same tokens up to float rounding).
    """
    if new_tokens < 1:
        raise ValueError("new_tokens must be at least 1")
    _check_llama(model)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    weight = next(model.parameters())
    cache = KVCache(model.config, batch, prompt_len + new_tokens, weight.dtype, device)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(batch, 1, dtype=torch.bool, device=device)

    synchronize(device)
    start = clock()
    token = forward(model, input_ids, cache, 0, all_logits)[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    ttft = clock() - start

    out, step_s = [token], []
    for pos in range(prompt_len, prompt_len + new_tokens - 1):
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if finished.all():
                break
        start = clock()
        token = forward(model, token, cache, pos)[:, -1].argmax(-1, keepdim=True)
        if eos_token_id is not None:
            token = torch.where(finished, pad, token)  # finished sequences emit padding
        synchronize(device)
        step_s.append(clock() - start)
        out.append(token)
    return Generation(torch.cat(out, dim=1), ttft, step_s)


@torch.inference_mode()
def generate_timing(model, input_ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """TTFT and TPOT of Hugging Face `generate`, for comparison with `greedy_decode`.

    `generate` gives only the total time, so we time 1 token (≈ TTFT) and `new_tokens` tokens
    and take TPOT as the difference per extra token. EOS is suppressed so lengths are exact.
    """
    kwargs = dict(
        do_sample=False,
        attention_mask=torch.ones_like(input_ids),
        pad_token_id=model.generation_config.pad_token_id,
    )

    def total(n: int) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run is a warm-up
            synchronize(input_ids.device)
            start = time.perf_counter()
            model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            synchronize(input_ids.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    one, many = total(1), total(new_tokens)
    return {"ttft_s": one, "tpot_s": (many - one) / (new_tokens - 1), "latency_s": many}


@torch.inference_mode()
def matmuls_only(model, batch: int = 1, repeats: int = 10) -> float:
    """Median time of every Linear layer of `model` applied once to `batch` vectors, back to back.

    This is a decode step's weight reading with all the Python, norms, rotary and attention
    around it removed: what the step would cost if the framework added nothing.
    """
    param = next(model.parameters())
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [
        torch.randn(batch, m.in_features, device=param.device, dtype=param.dtype) for m in layers
    ]

    def run():
        for layer, x in zip(layers, inputs, strict=True):
            torch.nn.functional.linear(x, layer.weight)

    return measure(run, repeats=repeats, device=param.device).median
