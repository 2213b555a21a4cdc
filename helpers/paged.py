"""The paged KV cache (vLLM's PagedAttention) and one batched forward pass over it.

Every layer's keys and values live in one pool of `kv_blocks` blocks of `block_size` token
*slots*. A sequence owns a *block table* (the list of its blocks): position p lives in slot
`table[p // block_size] · block_size + p % block_size`. `BlockAllocator` hands blocks out and
takes them back; `PagedKVCache` stores and reads keys and values by slot; `forward` runs one
engine step: several sequences, each at its own position, in one pass of the model.

A cache that stores keys and values differently subclasses `PagedKVCache` and overrides its
four storage methods — `allocate`, `write`, `read` and `bytes_per_slot` — and nothing else
changes: `forward` only writes and reads through them. `QuantizedPagedKVCache` is one: 8-bit
keys and values with one fp32 scale per head per token, quantized and dequantized by
`helpers.kvquant`'s functions (the same math as notebook 02's quantized cache). `make_cache`
picks the class from `kv_dtype`, `block_bytes` and `blocks_in` say what a block costs and how
many fit a budget of bytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from helpers import checks, kvquant
from helpers.decode import layers
from helpers.device import check_finite
from helpers.shapes import Shape


class KVBudgetError(ValueError):
    """A request needs more KV-cache blocks than the engine has."""


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of `block_size` slots that `tokens` positions take (the last one partly filled)."""
    tokens = checks.whole("tokens", tokens, minimum=0)
    return -(-tokens // checks.whole("block_size", block_size))


class BlockAllocator:
    """A free list of block ids, with counts to prove that nothing leaks.

    Ids never used yet are handed out in order from a counter (a simulated budget of 10⁹ blocks
    costs nothing), then the returned ones in the order they came back."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._unused = 0  # ids below this were handed out at least once
        self._returned: deque[int] = deque()
        self.allocated = self.freed = self.peak = 0

    @property
    def free(self) -> int:
        return self.num_blocks - self._unused + len(self._returned)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.free

    def allocate(self, n: int) -> list[int]:
        if n > self.free:
            raise KVBudgetError(f"asked for {n} KV blocks, {self.free} free")
        fresh = min(n, self.num_blocks - self._unused)
        ids = list(range(self._unused, self._unused + fresh))
        self._unused += fresh
        ids += [self._returned.popleft() for _ in range(n - fresh)]
        self.allocated += n
        self.peak = max(self.peak, self.in_use)
        return ids

    def release(self, ids: list[int]) -> None:
        self._returned.extend(ids)
        self.freed += len(ids)


class PagedKVCache:
    """Keys and values of every layer in one pool of fixed-size blocks.

    Per layer: (kv_blocks · block_size, kv_heads, head_dim) — a flat array of token slots;
    block b owns slots b · block_size … (b + 1) · block_size − 1. The shape comes from
    `shapes.Shape.of(config)`, as the contiguous `decode.KVCache`'s does."""

    def __init__(self, config, kv_blocks: int, block_size: int, dtype, device) -> None:
        shape = Shape.of(config)
        self.block_size, self.head_dim, self.kv_heads = block_size, shape.head_dim, shape.kv_heads
        self.device = torch.device(device)
        self.storage = [
            self.allocate(kv_blocks * block_size, dtype, self.device) for _ in range(shape.layers)
        ]

    # -- storage: what a subclass (a quantized cache) replaces ------------------------------
    def allocate(self, slots: int, dtype, device) -> dict[str, torch.Tensor]:
        """One layer's storage for `slots` token slots."""
        size = (slots, self.kv_heads, self.head_dim)
        return {name: torch.zeros(size, dtype=dtype, device=device) for name in ("k", "v")}

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v of shape (tokens, kv_heads, head_dim) at `slots`."""
        store = self.storage[layer]
        store["k"].index_copy_(0, slots, k)
        store["v"].index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` (any shape S) as (*S, kv_heads, head_dim) each."""
        store = self.storage[layer]
        return store["k"][slots], store["v"][slots]

    @staticmethod
    def bytes_per_slot(shape: Shape, element_size: int) -> int:
        """Bytes one token slot takes, keys and values of every layer."""
        return 2 * shape.layers * shape.kv_heads * shape.head_dim * element_size

    # -- addressing ------------------------------------------------------------------------
    def slots(self, table: list[int], positions) -> torch.Tensor:
        """Slot of each position of a sequence whose block table is `table` (on the CPU)."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        blocks = torch.as_tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size


class QuantizedPagedKVCache(PagedKVCache):
    """The paged cache in 8 bits: per layer, keys and values (slots, kv_heads, head_dim) as
    int8 (or float8 e4m3, `kv_dtype="fp8"`) and their scales (slots, kv_heads, 1) in fp32, one
    per head per token, so a token's stored values never depend on another token's. `read`
    returns them dequantized to the compute `dtype`: attention runs on a float copy of the
    gathered slots (plain PyTorch has no attention kernel that reads int8)."""

    def __init__(self, config, kv_blocks, block_size, dtype, device, kv_dtype="int8") -> None:
        self.kv_dtype = kvquant.check_kv_dtype(kv_dtype, device) or "int8"
        self.dtype = dtype
        super().__init__(config, kv_blocks, block_size, dtype, device)

    def allocate(self, slots: int, dtype, device) -> dict[str, torch.Tensor]:
        values, scales = (slots, self.kv_heads, self.head_dim), (slots, self.kv_heads, 1)
        store = kvquant.storage_dtype(self.kv_dtype)
        data = {name: torch.zeros(values, dtype=store, device=device) for name in ("k", "v")}
        return data | {f"{name}_scale": torch.zeros(scales, device=device) for name in ("k", "v")}

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        store = self.storage[layer]
        for name, x in (("k", k), ("v", v)):
            q, scale = kvquant.quantize_kv(x, self.kv_dtype)  # scale: (tokens, kv_heads, 1)
            # as bytes: index_copy_ has no float8 kernel on CPU, and a byte copy is the same
            store[name].view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))
            store[f"{name}_scale"].index_copy_(0, slots, scale)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store = self.storage[layer]
        return tuple(
            kvquant.dequantize_kv(store[name][slots], store[f"{name}_scale"][slots], self.dtype)
            for name in ("k", "v")
        )

    @staticmethod
    def bytes_per_slot(shape: Shape, element_size: int) -> int:
        """1 byte per key and value, plus one fp32 scale per head for each (any compute dtype)."""
        return int(kvquant.bytes_per_token(shape, "int8"))


def cache_class(kv_dtype: str | None) -> type[PagedKVCache]:
    """The paged cache storing `kv_dtype` (None: the model's own dtype; "int8" or "fp8")."""
    if kv_dtype is None:
        return PagedKVCache
    checks.choice("kv_dtype", kv_dtype, kvquant.KV_DTYPES)
    return QuantizedPagedKVCache


def make_cache(config, kv_blocks, block_size, dtype, device, kv_dtype=None) -> PagedKVCache:
    if kv_dtype is None:
        return PagedKVCache(config, kv_blocks, block_size, dtype, device)
    return QuantizedPagedKVCache(config, kv_blocks, block_size, dtype, device, kv_dtype)


def block_bytes(config, block_size: int, element_size: int, kv_dtype: str | None = None) -> int:
    """Bytes one block of `block_size` slots takes, over every layer (scales included)."""
    block_size = checks.whole("block_size", block_size)
    return block_size * cache_class(kv_dtype).bytes_per_slot(Shape.of(config), element_size)


def blocks_in(
    budget_bytes: float, config, block_size: int, element_size: int, kv_dtype: str | None = None
) -> int:
    """How many whole blocks fit in `budget_bytes` of KV memory."""
    budget_bytes = checks.positive("budget_bytes", budget_bytes)
    return int(budget_bytes // block_bytes(config, block_size, element_size, kv_dtype))


@dataclass(frozen=True)
class Feed:
    """What one sequence feeds a step: `tokens` placed at positions start, start+1, …, found
    through `table`; `last` when they are the sequence's last uncached tokens (it gets logits)."""

    tokens: list[int]
    start: int
    table: list[int]
    last: bool


def _attention_plan(cache: PagedKVCache, feeds: list[Feed]) -> dict[str, torch.Tensor]:
    """Where each fed token is written, which slots each sequence reads, and the mask."""
    counts = [len(f.tokens) for f in feeds]
    max_q, max_kv = max(counts), max(f.start + n for f, n in zip(feeds, counts, strict=True))
    kv_slots = torch.zeros(len(feeds), max_kv, dtype=torch.long)  # padded with slot 0
    q_rows = torch.zeros(len(feeds), max_q, dtype=torch.long)  # row of each query, flat batch
    row, flat_b, flat_i = 0, [], []
    for b, (f, n) in enumerate(zip(feeds, counts, strict=True)):
        kv_slots[b, : f.start + n] = cache.slots(f.table, range(f.start + n))
        q_rows[b, :n] = torch.arange(row, row + n)
        flat_b += [b] * n
        flat_i += list(range(n))
        row += n
    query_pos = torch.tensor([f.start for f in feeds]).view(-1, 1) + torch.arange(max_q)
    plan = {
        "write": torch.cat(
            [cache.slots(f.table, range(f.start, f.start + len(f.tokens))) for f in feeds]
        ),
        "read": kv_slots,
        "q_rows": q_rows,
        "visible": torch.arange(max_kv).view(1, 1, -1) <= query_pos.unsqueeze(-1),
        "flat_b": torch.tensor(flat_b),
        "flat_i": torch.tensor(flat_i),
    }
    return {k: v.to(cache.device) for k, v in plan.items()}


@torch.inference_mode()
def forward(model, cache: PagedKVCache, feeds: list[Feed]) -> list[int]:
    """One batched forward pass over sequences at different positions, on the paged cache; the
    greedy next token of every feed with `last` set, in order.

    Every fed token is one row of a single (1, tokens) batch for the matmuls. For attention, each
    sequence's queries are laid out in a padded (sequences, max new, …) tensor, its keys and
    values read from its blocks into a padded (sequences, max context, …) tensor, and a mask
    lets query i of a sequence starting at position p see key positions ≤ p + i."""
    plan = _attention_plan(cache, feeds)
    ids = torch.tensor([t for f in feeds for t in f.tokens], device=cache.device)
    positions = torch.cat([torch.arange(f.start, f.start + len(f.tokens)) for f in feeds])

    def attend(layer, q, k, v, scale):
        # q: (1, heads, tokens, head_dim); k, v: (1, kv_heads, tokens, head_dim)
        cache.write(layer, plan["write"], k[0].transpose(0, 1), v[0].transpose(0, 1))
        keys, values = cache.read(layer, plan["read"])  # (B, max_kv, kv_heads, head_dim)
        queries = q[0][:, plan["q_rows"]].transpose(0, 1)  # (B, heads, max_q, head_dim)
        out = F.scaled_dot_product_attention(
            queries,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=plan["visible"].unsqueeze(1),
            scale=scale,
            enable_gqa=True,
        )
        return out[plan["flat_b"], :, plan["flat_i"]].transpose(0, 1).unsqueeze(0)

    body = model.model
    hidden = body.embed_tokens(ids.unsqueeze(0))
    cos, sin = body.rotary_emb(hidden, positions.to(cache.device).unsqueeze(0))
    hidden = layers(model, hidden, cos, sin, cache.head_dim, attend)
    ends = np.cumsum([len(f.tokens) for f in feeds]) - 1
    ends = [int(e) for e, f in zip(ends, feeds, strict=True) if f.last]
    if not ends:  # only prompt chunks this step: no sequence needs logits
        return []
    logits = model.lm_head(body.norm(hidden[0, torch.tensor(ends, device=cache.device)]))
    return check_finite("the step's logits", logits).argmax(-1).tolist()
