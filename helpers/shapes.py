"""Shapes and byte formulas of decoder-only transformers: pure arithmetic, no torch.

The one place for what a model *is* (its `Shape`, the published `ARCHITECTURES`) and for what its
numbers cost in bytes (`WEIGHT_BYTES`, `VALUE_BYTES`, the KV / activation / logits formulas, what
serving needs per device, which TP degrees split it). The planner, the memory calculator, the
decode loop and the notebooks all read these; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers import checks

# Published architectures (from each model's config.json on the hub).
ARCHITECTURES = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    ),
    "llama-2-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
    ),
    "llama-2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    ),
    "llama-3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    ),
}  # fmt: skip

# Bytes per stored weight for each serving precision. The weight-only formats keep a 16-bit
# scale per output row (int8) or a 16-bit scale and zero point per group of 64 (int4): the layout
# of the course's own `quant` linears and of torchao's defaults. fp8 is e4m3 (1 sign, 4 exponent,
# 3 mantissa bits) with one scale per tensor, as vLLM's `--quantization fp8` stores it.
INT4_GROUP = 64
WEIGHT_BYTES = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0,
    "int4": 0.5 + 4 / INT4_GROUP,
    "fp8": 1.0,
}
# Bytes of one activation, cached key/value or logit: weight-only formats still compute in 16 bit
# (an fp8 model that also multiplies in fp8, W8A8, quantizes each matmul's input on the fly and
# keeps what it stores between layers in 16 bit).
VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 2, "int4": 2, "fp8": 2}
PRECISIONS = tuple(WEIGHT_BYTES)

# Formats of the KV cache (`--kv-cache-dtype` in vLLM): bytes per cached value before scales. fp8
# (e4m3) keeps one scale per tensor; int8 one 16-bit scale per head and token (KV_SCALE_BYTES).
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
KV_DTYPES = tuple(KV_BYTES)
KV_SCALE_BYTES = 2


def kv_value_bytes(kv_dtype: str, head_dim: int) -> float:
    """Bytes per cached key or value in `kv_dtype`, scales included (int8: one 16-bit scale per
    head and token, shared by its `head_dim` values)."""
    kv_dtype = checks.choice("kv_dtype", kv_dtype, KV_DTYPES)
    head_dim = checks.whole("head_dim", head_dim)
    return KV_BYTES[kv_dtype] + (KV_SCALE_BYTES / head_dim if kv_dtype == "int8" else 0)


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that decide its memory and its work."""

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

    def components(self) -> dict[str, int]:
        """Parameters by component: what each part of the model holds."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q,o,k,v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return {
            "embeddings": self.vocab * self.hidden,
            "attention": self.layers * attention,
            "mlp": self.layers * mlp,
            "norms": (2 * self.layers + 1) * self.hidden,  # two per layer + the final one
            "lm_head": 0 if self.tied_embeddings else self.vocab * self.hidden,
        }

    @property
    def params(self) -> int:
        return sum(self.components().values())

    @property
    def linear_params(self) -> int:
        """Weights that multiply every token: all but the input embedding (a decode step reads one
        row of it per token), unless the output layer shares it."""
        return self.params - (0 if self.tied_embeddings else self.vocab * self.hidden)


_CONFIG_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)


def _sizes(shape, batch, tokens, bytes_per_value, tokens_name="context"):
    """The checked arguments of the formulas below (a `Shape`, whole counts, bytes per value)."""
    if not isinstance(shape, Shape):
        raise TypeError(f"shape must be a shapes.Shape, got {shape!r}: pass shapes.Shape.of(...)")
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
    shape: Shape,
    batch: int,
    tokens: int,
    bytes_per_value: float,
    tp: int = 1,
    scores_materialized: bool = False,
) -> int:
    """Peak of the temporaries live inside one layer while `tokens` per sequence flow through.

    Per token, at the widest moment (the MLP's product): the embeddings (the caller still holds
    them) and the residual stream, the normed input (3 · hidden, whole on every device); queries,
    keys and values after rotary and the attention output (2 · hidden + 2 · kv_heads · head_dim);
    the MLP's activated gate, up and their product (3 · intermediate). Per position, shared by
    the batch: the rotary tables cos, sin and signed sin (3 · head_dim). An attention kernel that
    materializes its scores (PyTorch's math path, not a fused flash kernel) adds a score matrix
    and its softmax, 2 · heads · tokens per token, while the layer's previous output is still
    bound. Layers run one after another, so this does not grow with depth; tensor parallelism
    splits heads and the MLP's width over `tp` devices. Derived and measured in notebook 02.
    """
    _sizes(shape, batch, tokens, bytes_per_value, "tokens")
    tp = checks.whole("tp", tp)
    h, kv = shape.hidden, 2 * shape.kv_heads * shape.head_dim
    held = 3 * h + (2 * h + kv) // tp  # embeddings, residual, normed; q, k, v, attention out
    mlp = held + 3 * shape.intermediate // tp
    scores = 2 * shape.heads // tp * tokens if scores_materialized else 0
    attention = held + h // tp + scores
    rotary = 3 * shape.head_dim
    return int((batch * tokens * max(mlp, attention) + tokens * rotary) * bytes_per_value)


def check_tp_degree(tp: int, *, heads: int, kv_heads: int, intermediate: int) -> int:
    """`tp` if it splits the attention heads, KV heads and MLP evenly; else say which degrees do."""
    tp = checks.whole("TP degree", tp)
    for what, n in (
        ("attention heads", heads),
        ("KV heads", kv_heads),
        ("MLP width", intermediate),
    ):
        if n % tp:
            divisors = [
                d
                for d in range(1, n + 1)
                if n % d == 0 and heads % d == 0 and kv_heads % d == 0 and intermediate % d == 0
            ]
            raise ValueError(
                f"TP degree {tp} does not divide the {n} {what}; use one of {divisors}."
            )
    return tp


def allreduce_bus_bytes(message_bytes: float, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce: 2 (p−1)/p × message."""
    return 2 * (world - 1) / world * message_bytes


def serving_memory(
    shape: Shape,
    batch: int,
    context: int,
    weight_bytes_per_param: float,
    value_bytes: float,
    tp: int = 1,
    prefill_tokens: int | None = None,
    all_logits: bool = False,
    kv_bytes: float | None = None,
) -> dict[str, int]:
    """Bytes per device to serve `batch` sequences of `context` tokens, by component.

    `value_bytes` is the size of one cached key/value, activation or logit (2 in bf16/fp16):
    quantizing the weights does not change it.
    Tensor parallelism over `tp` devices splits weights, KV heads and the activations of the
    split layers; each device keeps full-size logits here (the course's loop gathers them).
    `prefill_tokens` (default: the whole context) is how many prompt tokens go through at once;
    `all_logits` keeps scores for every prompt position instead of only the last one.
    `kv_bytes` (default: `value_bytes`) is one cached key/value in a quantized cache's format,
    scales included (`kv_value_bytes`).
    """
    _sizes(shape, batch, context, value_bytes)
    kv_bytes = value_bytes if kv_bytes is None else checks.positive("kv_bytes", kv_bytes)
    checks.positive("weight_bytes_per_param", weight_bytes_per_param)
    check_tp_degree(tp, heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate)
    tokens = context if prefill_tokens is None else checks.whole("prefill_tokens", prefill_tokens)
    return {
        "weights": int(shape.params * weight_bytes_per_param / tp),
        "kv_cache": kv_cache_bytes(shape, batch, context, kv_bytes) // tp,
        "activations": activation_bytes(shape, batch, tokens, value_bytes, tp),
        "logits": logits_bytes(shape, batch, tokens if all_logits else 1, value_bytes),
    }


def format_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


# More published architectures (each model's config.json on the hub): the planner, `deploy.serve`
# and the memory calculator take any of them, or any config.json itself (`Shape.of(dict)`,
# `shape_from_config_file`). Qwen2's q/k/v biases (a few thousand values) are left out.
ARCHITECTURES.update(
    {
        "llama-3.1-8b": ARCHITECTURES["llama-3-8b"],  # meta-llama/Llama-3.1-8B: same shape
        "mistral-7b": dict(  # mistralai/Mistral-7B-v0.1
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        ),
        "qwen2.5-7b": dict(  # Qwen/Qwen2.5-7B
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        ),
    }
)  # fmt: skip


def shape_from_config_file(path) -> Shape:
    """A model's shape from its Hugging Face `config.json` (Llama, Mistral, Qwen2 and other
    decoder-only models that name their fields as Llama does)."""
    import json  # standard library only: the facts layer stays free of torch
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}: give a model directory or its file")
    return Shape.of(json.loads(path.read_text()))


# meta-llama/Llama-3.1-405B: too big for one node of 8 × 80 GB in 16 bits (notebook 06's
# multi-node deployment).
ARCHITECTURES["llama-3.1-405b"] = dict(
    hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
    num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
)  # fmt: skip
