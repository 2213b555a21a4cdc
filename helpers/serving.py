"""A small serving engine on the course's decode loop: requests arriving over time, static vs
continuous batching, a paged KV cache and chunked prefill, timed on a wall or a virtual clock.

    from helpers import serving
    requests = serving.poisson_trace(rate=2.0, n=40, seed=0, scale=1 / 16)
    df = serving.run(model, requests, policy="continuous", max_batch=8, block_size=16,
                     kv_blocks=256, prefill_chunk=64)
    serving.summary(df)            # TTFT / TPOT / latency percentiles, throughput
    df.attrs["steps"]              # the engine's log: one row per step (below)

**The loop.** Each *step* is one forward pass of the model over a set of sequences. A sequence
knows its tokens (prompt + generated so far) and how many of them are already in the KV cache;
the step feeds each scheduled sequence its next tokens — a whole prompt, a chunk of one
(`prefill_chunk`), or the one token it generated last — all flattened into one row of tokens, so
the weight matmuls see every token of the step at once whatever position each sequence is at.
A sequence whose tokens are all in the cache after the step gets its next token from the logits.

**Scheduling.** `policy="static"` admits a batch only when the engine is empty and runs it until
its longest request is done (finished requests return at once, but nobody joins). `"continuous"`
(Orca's iteration-level scheduling) admits waiting requests at every step while there is room:
fewer than `max_batch` running and free KV blocks for the prompt. Without `prefill_chunk` a new
prompt is prefilled whole in the step that admits it; with it, at most that many prompt tokens run
per step (Sarathi-Serve's chunked prefill), so the sequences already decoding keep their pace.

**The paged KV cache** (vLLM's PagedAttention) holds every layer's keys and values in one pool of
`kv_blocks` blocks of `block_size` token slots. A request owns a *block table* (the list of its
blocks): position p lives in slot `table[p // block_size] · block_size + p % block_size`. Blocks
are taken from a free list as a sequence grows and returned when it finishes. When a growing
sequence finds no free block, the youngest running request is *preempted*: its blocks are freed
and it re-queues at the front, to recompute its cache later from its tokens (vLLM's default).
A request that could never fit (`prompt + max_new_tokens - 1 > kv_blocks · block_size` slots) is
rejected at arrival: its row carries an `error` naming the budget, and the others run.

**Clocks.** `clock="wall"` times each step live (arrivals are real time: the engine waits for
them). A callable `clock(step) -> seconds` runs a *virtual* clock: each step costs what the
function says for its `Step` (sequences, tokens, context), e.g. a fit of this machine's measured
steps (`fit_step_time`) or the planner's prediction for a GPU (`planner_step_time`). With
`model=None` nothing is computed at all — the same scheduler, on token counts only — which is how
a load sweep runs in seconds.

**Output.** `run` returns one row per request: `arrival_s`, `admitted_s`, `first_token_s`,
`finish_s`, `tokens` (generated ids; empty when `model=None`), `ttft_s`, `tpot_s`, `latency_s`,
`queue_s`, `preemptions`, `error`. `df.attrs["steps"]` is the step log, one row per step:
`start_s`, `step_s`, `seqs` (batch size), `decode_seqs`, `prefill_seqs`, `prefill_tokens`,
`tokens` (fed this step), `context` (cached positions the step attends to, summed), `blocks_in_use`,
`kv_tokens` (positions stored), `reserved_tokens` (what contiguous caches would reserve for the
running requests: prompt + max_new_tokens each), `running`, `waiting`, `in_system` (arrived and not
finished). `df.attrs["blocks"]`: total, allocated, freed, peak in use, block_size.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import psutil
import torch
import torch.nn.functional as F

from helpers import DATA_DIR, checks, planner
from helpers.bench import timed
from helpers.decode import _check_llama, layers
from helpers.device import check_finite
from helpers.shapes import format_bytes

POLICIES = ("continuous", "static")
# A live run waits for each arrival in real time: one later than this is most likely in ms.
LIVE_ARRIVAL_LIMIT_S = 3600.0


@dataclass(frozen=True)
class Request:
    prompt_ids: torch.Tensor  # 1-D token ids
    max_new_tokens: int
    arrival_s: float = 0.0


@dataclass(frozen=True)
class Step:
    """What one forward pass carries: the input of a step-time model."""

    seqs: int  # sequences in the step (the batch)
    tokens: int  # tokens fed, all sequences together
    context: int  # cached positions attended to, summed over sequences
    prefill_tokens: int = 0
    decode_seqs: int = 0


class KVBudgetError(ValueError):
    """A request needs more KV-cache blocks than the engine has."""


# --- The paged KV cache ---------------------------------------------------------------------


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

    Per layer: (kv_blocks · block_size, kv_heads, head_dim) — a flat array of token *slots*;
    block b owns slots b · block_size … (b + 1) · block_size − 1."""

    def __init__(self, config, kv_blocks: int, block_size: int, dtype, device) -> None:
        self.block_size = block_size
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        shape = (kv_blocks * block_size, config.num_key_value_heads, self.head_dim)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def slots(self, table: list[int], positions) -> torch.Tensor:
        """Slot of each position of a sequence whose block table is `table` (on the CPU)."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        blocks = torch.as_tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v of shape (tokens, kv_heads, head_dim) at `slots`."""
        slots = slots.to(self.keys[layer].device)
        self.keys[layer].index_copy_(0, slots, k)
        self.values[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` (any shape S) as (*S, kv_heads, head_dim) each."""
        slots = slots.to(self.keys[layer].device)
        return self.keys[layer][slots], self.values[layer][slots]


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of `block_size` slots that `tokens` positions take (the last one partly filled)."""
    return _blocks_for(checks.whole("tokens", tokens, minimum=0),
                       checks.whole("block_size", block_size))  # fmt: skip


def _blocks_for(tokens: int, block_size: int) -> int:  # unchecked: the engine's hot path
    return -(-tokens // block_size)


# --- The engine -----------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity
class _Seq:
    index: int
    request: Request
    tokens: list[int]  # prompt, then generated
    prompt_len: int
    table: list[int] = field(default_factory=list)
    cached: int = 0  # positions already in the KV cache
    admitted_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    preemptions: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def done(self) -> bool:
        return self.generated >= self.request.max_new_tokens

    def need_slots(self) -> int:
        """KV slots the whole request needs: every token but the last generated one."""
        return self.prompt_len + self.request.max_new_tokens - 1


def _check_requests(requests, context_limit: int | None, vocab: int | None = None,
                    live: bool = False) -> list[Request]:  # fmt: skip
    if isinstance(requests, Request):
        raise TypeError("requests is one serving.Request: pass a list of them, e.g. [request]")
    if isinstance(requests, str | bytes | dict) or not hasattr(requests, "__iter__"):
        raise TypeError(f"requests must be a list of serving.Request, got {requests!r}")
    requests = list(requests)
    if not requests:
        raise ValueError("requests is empty: give at least one serving.Request")
    last = -math.inf
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise TypeError(f"requests[{i}] is a {type(r).__name__}, not a serving.Request")
        ids = r.prompt_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
            raise TypeError(f"requests[{i}].prompt_ids must be a 1-D tensor of token ids")
        if ids.numel() == 0:
            raise ValueError(f"requests[{i}] has an empty prompt: give at least one token")
        checks.whole(f"requests[{i}].max_new_tokens", r.max_new_tokens)
        checks.positive(f"requests[{i}].arrival_s", r.arrival_s, allow_zero=True)
        if r.arrival_s < last:
            raise ValueError(
                f"requests[{i}] arrives at {r.arrival_s} s, before requests[{i - 1}] "
                f"({last} s): sort the requests by arrival_s"
            )
        last = r.arrival_s
        if live and r.arrival_s > LIVE_ARRIVAL_LIMIT_S:
            raise ValueError(
                f"requests[{i}] arrives at {r.arrival_s:g} s, over an hour away, and "
                "clock='wall' waits for it in real time: is arrival_s in milliseconds? "
                "Give seconds (ms / 1000), or a virtual clock"
            )
        if vocab is not None:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"requests[{i}].prompt_ids holds token id {low if low < 0 else high}, outside "
                    f"the model's vocabulary 0…{vocab - 1}: draw ids below vocab_size, e.g. "
                    f"poisson_trace(..., vocab={vocab}), and never a pad id such as -100"
                )
        total = ids.numel() + r.max_new_tokens
        if context_limit is not None and total > context_limit:
            raise ValueError(
                f"requests[{i}] needs {ids.numel()} prompt + {r.max_new_tokens} new = {total} "
                f"positions; the model's context is {context_limit}: shorten it"
            )
    return requests


class _Engine:
    def __init__(self, model, policy, max_batch, block_size, kv_blocks, prefill_chunk, clock):
        self.model, self.policy, self.max_batch = model, policy, max_batch
        self.block_size, self.prefill_chunk, self.clock = block_size, prefill_chunk, clock
        self.alloc = BlockAllocator(kv_blocks)
        self.cache = None
        if model is not None:
            weight = next(model.parameters())
            self.cache = PagedKVCache(
                model.config, kv_blocks, block_size, weight.dtype, weight.device
            )
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.steps: list[dict] = []
        self.preempted: set[int] = set()  # ids of sequences preempted in this step's planning

    # -- memory --------------------------------------------------------------------------
    def _grow(self, seq: _Seq, upto: int) -> bool:
        """Give `seq` blocks for `upto` positions, preempting the youngest if none are free;
        False if `seq` itself had to be preempted."""
        need = _blocks_for(upto, self.block_size) - len(seq.table)
        while need > self.alloc.free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.table += self.alloc.allocate(max(need, 0))
        return True

    def _preempt(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self.preempted.add(id(seq))
        self.alloc.release(seq.table)
        seq.table, seq.cached = [], 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _retire(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self.alloc.release(seq.table)
        seq.table = []

    # -- scheduling ----------------------------------------------------------------------
    def _admit(self, now: float) -> None:
        free = self.alloc.free
        if self.policy == "static":
            if self.running:
                return
            while self.waiting and len(self.running) < self.max_batch:
                need = _blocks_for(self.waiting[0].need_slots(), self.block_size)
                if need > free:  # a static batch reserves its whole length up front
                    break
                free -= need
                self._start(self.waiting.popleft(), now)
            return
        while self.waiting and len(self.running) < self.max_batch:
            need = _blocks_for(len(self.waiting[0].tokens), self.block_size)
            if need > free:
                break
            free -= need
            self._start(self.waiting.popleft(), now)

    def _start(self, seq: _Seq, now: float) -> None:
        if math.isnan(seq.admitted_s):
            seq.admitted_s = now
        self.running.append(seq)

    def _plan(self) -> list[tuple[_Seq, int]]:
        """(sequence, tokens to feed) for this step; allocates their blocks."""
        budget = math.inf if self.prefill_chunk is None else self.prefill_chunk
        work, self.preempted = [], set()
        for seq in list(self.running):
            if id(seq) in self.preempted:  # preempted while planning an older one
                continue
            todo = len(seq.tokens) - seq.cached
            if todo > 1:  # (part of) a prompt, or a recompute after preemption
                todo = int(min(todo, budget))
                budget -= todo
            if todo == 0:
                continue
            if self._grow(seq, seq.cached + todo):
                work.append((seq, todo))
        return [(s, n) for s, n in work if id(s) not in self.preempted]

    # -- the step ------------------------------------------------------------------------
    def _step(self, work: list[tuple[_Seq, int]]) -> list[int]:
        """One forward pass; the next token of every sequence whose tokens are now all cached
        (placeholder zeros when there is no model)."""
        finishing = [s.cached + n == len(s.tokens) for s, n in work]
        if self.model is None:
            return [0] * sum(finishing)
        return _forward(self.model, self.cache, work, finishing)

    def log(self, now, step_s, work, shape: Step, arrived: int, finished: int) -> None:
        fed = {id(s): n for s, n in work}
        self.steps.append({
            "start_s": now, "step_s": step_s, "seqs": shape.seqs, "decode_seqs": shape.decode_seqs,
            "prefill_seqs": shape.seqs - shape.decode_seqs, "prefill_tokens": shape.prefill_tokens,
            "tokens": shape.tokens, "context": shape.context, "blocks_in_use": self.alloc.in_use,
            "kv_tokens": sum(s.cached + fed.get(id(s), 0) for s in self.running),
            "reserved_tokens": sum(s.prompt_len + s.request.max_new_tokens for s in self.running),
            "running": len(self.running), "waiting": len(self.waiting),
            "in_system": arrived - finished,
        })  # fmt: skip


@torch.inference_mode()
def _forward(model, cache: PagedKVCache, work, finishing) -> list[int]:
    """One batched forward pass over sequences at different positions, on the paged cache.

    Every fed token is one row of a single (1, tokens) batch for the matmuls. For attention, each
    sequence's queries are laid out in a padded (sequences, max new, …) tensor, its keys and
    values gathered from its blocks into a padded (sequences, max context, …) tensor, and a mask
    lets query i of a sequence starting at position p see key positions ≤ p + i."""
    device = cache.keys[0].device
    starts = [s.cached for s, _ in work]
    counts = [n for _, n in work]
    ids = torch.tensor([t for (s, n) in work for t in s.tokens[s.cached : s.cached + n]])
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(starts, counts, strict=True)])
    write_slots = torch.cat([
        cache.slots(s.table, range(s.cached, s.cached + n)) for s, n in work
    ])  # fmt: skip
    batch, max_q, max_kv = len(work), max(counts), max(map(sum, zip(starts, counts, strict=True)))
    # Gather plan: the slots of each sequence's positions 0 … p+n−1, padded with slot 0.
    kv_slots = torch.zeros(batch, max_kv, dtype=torch.long)
    q_rows = torch.zeros(batch, max_q, dtype=torch.long)  # row of each query in the flat batch
    row, flat_b, flat_i = 0, [], []
    for b, ((s, n), p) in enumerate(zip(work, starts, strict=True)):
        kv_slots[b, : p + n] = cache.slots(s.table, range(p + n))
        q_rows[b, :n] = torch.arange(row, row + n)
        flat_b += [b] * n
        flat_i += list(range(n))
        row += n
    query_pos = torch.tensor(starts).view(-1, 1) + torch.arange(max_q).view(1, -1)
    visible = torch.arange(max_kv).view(1, 1, -1) <= query_pos.unsqueeze(-1)  # (B, max_q, max_kv)
    kv_slots, q_rows, visible = kv_slots.to(device), q_rows.to(device), visible.to(device)
    write_slots = write_slots.to(device)
    flat_b, flat_i = torch.tensor(flat_b, device=device), torch.tensor(flat_i, device=device)

    def attend(layer, q, k, v, scale):
        # q: (1, heads, tokens, head_dim); k, v: (1, kv_heads, tokens, head_dim)
        cache.write(layer, write_slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        keys, values = cache.gather(layer, kv_slots)  # (B, max_kv, kv_heads, head_dim)
        queries = q[0][:, q_rows].transpose(0, 1)  # (B, heads, max_q, head_dim)
        out = F.scaled_dot_product_attention(
            queries, keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=visible.unsqueeze(1), scale=scale, enable_gqa=True,
        )  # fmt: skip
        return out[flat_b, :, flat_i].transpose(0, 1).unsqueeze(0)  # back to (1, heads, tokens, …)

    body = model.model
    hidden = body.embed_tokens(ids.to(device).unsqueeze(0))
    cos, sin = body.rotary_emb(hidden, positions.to(device).unsqueeze(0))
    hidden = layers(model, hidden, cos, sin, cache.head_dim, attend)
    if not any(finishing):  # only prompt chunks this step: no sequence needs logits
        return []
    ends = [int(e) for e, f in zip(np.cumsum(counts) - 1, finishing, strict=True) if f]
    logits = model.lm_head(body.norm(hidden[0, torch.tensor(ends, device=device)]))
    return check_finite("the step's logits", logits).argmax(-1).tolist()


def run(
    model,
    requests,
    policy: str = "continuous",
    max_batch: int = 8,
    block_size: int = 16,
    kv_blocks: int = 256,
    prefill_chunk: int | None = None,
    clock: str | Callable[[Step], float] = "wall",
) -> pd.DataFrame:
    """Serve `requests` (sorted by arrival) and return one row per request (module docstring).

    `model`: a Llama-architecture model, or None to simulate the schedule without computing
    (then `clock` must be a step-time function). Greedy decoding, no end-of-sequence: every
    request generates exactly `max_new_tokens`."""
    policy = checks.choice("policy", policy, POLICIES)
    max_batch = checks.whole("max_batch", max_batch)
    block_size = checks.whole("block_size", block_size)
    kv_blocks = checks.whole("kv_blocks", kv_blocks)
    if prefill_chunk is not None:
        prefill_chunk = checks.whole("prefill_chunk", prefill_chunk)
    if clock != "wall" and not callable(clock):
        raise TypeError("clock must be 'wall' or a function step -> seconds (a virtual clock)")
    if model is None and clock == "wall":
        raise ValueError("model=None simulates the schedule: give clock=a step-time function")
    limit = vocab = None
    if model is not None:
        _check_llama(model)
        limit = getattr(model.config, "max_position_embeddings", None)
        vocab = getattr(model.config, "vocab_size", None)
        _check_kv_budget(model, kv_blocks, block_size)
    requests = _check_requests(requests, limit, vocab, live=clock == "wall")

    engine = _Engine(model, policy, max_batch, block_size, kv_blocks, prefill_chunk, clock)
    seqs = [_Seq(i, r, r.prompt_ids.tolist(), r.prompt_ids.numel()) for i, r in enumerate(requests)]
    errors = {}
    for s in seqs:
        need = _blocks_for(s.need_slots(), block_size)
        if need > kv_blocks:
            errors[s.index] = (
                f"needs {need} KV blocks ({s.need_slots()} positions in blocks of {block_size}) "
                f"but the cache has kv_blocks={kv_blocks} ({kv_blocks * block_size} positions): "
                "raise kv_blocks or shorten the request"
            )
    if errors:
        warnings.warn(f"{len(errors)} request(s) rejected: {next(iter(errors.values()))}",
                      stacklevel=2)  # fmt: skip
    pending = deque(s for s in seqs if s.index not in errors)
    start = time.perf_counter()
    now, arrived, finished = 0.0, 0, 0
    while pending or engine.waiting or engine.running:
        if clock == "wall":
            now = time.perf_counter() - start
        while pending and pending[0].request.arrival_s <= now:
            engine.waiting.append(pending.popleft())
            arrived += 1
        engine._admit(now)
        if not engine.running:  # idle: jump (or wait) to the next arrival
            if clock == "wall":
                time.sleep(max(0.0, pending[0].request.arrival_s - now))
            else:
                now = pending[0].request.arrival_s
            continue
        work, plan_s = timed(engine._plan)  # the scheduler's own time counts in the step
        if not work:  # everything planned was preempted: admit again
            continue
        device = (
            engine.cache.keys[0].device if engine.cache is not None else None
        )  # None: simulated
        new_tokens, run_s = timed(lambda w=work: engine._step(w), device)
        shape = _shape(work)
        step_s = plan_s + run_s if clock == "wall" else _clock_seconds(clock, shape, engine)
        engine.log(now, step_s, work, shape, arrived, finished)
        now += step_s
        emitted = iter(new_tokens)
        for seq, n in work:
            seq.cached += n
            if seq.cached == len(seq.tokens):
                seq.tokens.append(next(emitted))
                if seq.generated == 1:
                    seq.first_token_s = now
                if seq.done:
                    seq.finish_s = now
                    engine._retire(seq)
                    finished += 1
    return _results(seqs, errors, engine, block_size, model is None)


def _check_kv_budget(model, kv_blocks: int, block_size: int) -> None:
    """The paged cache's bytes, estimated before allocating it, against the memory there is."""
    config, weight = model.config, next(model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    need = (2 * config.num_hidden_layers * kv_blocks * block_size * kv_heads * head_dim
            * weight.element_size())  # fmt: skip
    if weight.device.type == "cuda":
        have, where = torch.cuda.mem_get_info(weight.device)[0], f"{weight.device} has free"
    else:
        have, where = psutil.virtual_memory().available, "this machine has available"
    if need > have:
        per_block = need // kv_blocks
        raise ValueError(
            f"kv_blocks={kv_blocks} needs {format_bytes(need)} of KV cache ({block_size} positions "
            f"per block, {format_bytes(per_block)} each) and {where} {format_bytes(have)}: lower "
            f"kv_blocks to at most {max(1, int(have * 0.8 // per_block))}"
        )


def _clock_seconds(clock, shape: Step, engine: _Engine) -> float:
    """What a virtual clock says this step costs; a missing, non-finite or negative time stops
    the run here, naming the step (a silent one would make every later figure wrong)."""
    value = clock(shape)
    at = f"at step {len(engine.steps)} ({shape})"
    if value is None:
        raise TypeError(f"clock returned None {at}: the function must `return` the step's seconds")
    try:
        if isinstance(value, str | bytes | bool):
            raise TypeError
        seconds = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"clock returned {value!r} {at}: it must return seconds, a number"
        ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"clock returned {seconds} s {at}: a step costs a finite time ≥ 0 s")
    return seconds


def _is_decode(seq: _Seq, n: int) -> bool:
    """Feeding the one token generated last (not a prompt, chunk or recompute)."""
    return n == 1 and seq.generated >= 1 and seq.cached + 1 == len(seq.tokens)


def _shape(work) -> Step:
    decode = sum(1 for s, n in work if _is_decode(s, n))
    prefill = sum(n for s, n in work) - decode
    return Step(seqs=len(work), tokens=sum(n for _, n in work),
                context=sum(s.cached + n for s, n in work), prefill_tokens=prefill,
                decode_seqs=decode)  # fmt: skip


def _results(seqs, errors, engine, block_size, simulated) -> pd.DataFrame:
    rows = []
    for s in seqs:
        r = s.request
        new = s.tokens[s.prompt_len :]
        rows.append({
            "request": s.index, "prompt_tokens": s.prompt_len, "max_new_tokens": r.max_new_tokens,
            "arrival_s": r.arrival_s, "admitted_s": s.admitted_s,
            "first_token_s": s.first_token_s, "finish_s": s.finish_s,
            "tokens": [] if simulated else new, "preemptions": s.preemptions,
            "error": errors.get(s.index, ""),
        })  # fmt: skip
    df = pd.DataFrame(rows)
    df["ttft_s"] = df.first_token_s - df.arrival_s
    df["tpot_s"] = (df.finish_s - df.first_token_s) / (df.max_new_tokens - 1).where(
        df.max_new_tokens > 1
    )
    df["latency_s"] = df.finish_s - df.arrival_s
    df["queue_s"] = df.admitted_s - df.arrival_s
    df.attrs["steps"] = pd.DataFrame(engine.steps)
    a = engine.alloc
    df.attrs["blocks"] = {"total": a.num_blocks, "allocated": a.allocated, "freed": a.freed,
                          "peak_in_use": a.peak, "block_size": block_size}  # fmt: skip
    return df


# --- Reading the results --------------------------------------------------------------------


def _served(df, what: str) -> pd.DataFrame:
    """The served rows of `run`'s result; a run that served nothing says so instead of NaN."""
    if not isinstance(df, pd.DataFrame) or not {"error", "finish_s"} <= set(df.columns):
        raise TypeError(f"df must be the table serving.run returns (one row per request) for "
                        f"{what}, got {type(df).__name__}")  # fmt: skip
    ok = df[df.error == ""]
    if ok.empty:
        first = next((e for e in df.error if e), "")
        raise ValueError(
            f"no request was served ({len(df)} rejected{': ' + first if first else ''}), so "
            f"{what} has nothing to measure"
        )
    return ok


def _steps(df, what: str) -> pd.DataFrame:
    steps = df.attrs.get("steps")
    if not isinstance(steps, pd.DataFrame) or steps.empty:
        raise ValueError(
            f"{what} needs the step log in df.attrs['steps']: pass the table serving.run "
            "returned, unchanged (a copy made by pandas may drop attrs)"
        )
    return steps


def summary(df: pd.DataFrame, percentiles=(50, 90, 99)) -> dict:
    """Percentiles of TTFT, TPOT and end-to-end latency (s) over served requests, and throughput:
    generated tokens and requests per second from the first arrival to the last finish."""
    ok = _served(df, "summary")
    if isinstance(percentiles, str) or not hasattr(percentiles, "__iter__"):
        raise TypeError(f"percentiles must be a list such as (50, 90, 99), got {percentiles!r}")
    for p in percentiles:
        if checks.positive("percentiles", p, allow_zero=True) > 100:
            raise ValueError(f"percentiles must lie in 0…100, got {p}")
    span = ok.finish_s.max() - ok.arrival_s.min()
    out = {}
    for metric in ("ttft_s", "tpot_s", "latency_s"):
        for p in percentiles:
            out[f"{metric[:-2]}_p{p}_s"] = float(np.nanpercentile(ok[metric], p))
    out["tokens_per_s"] = float(ok.max_new_tokens.sum() / span)
    out["requests_per_s"] = len(ok) / span
    out["served"], out["rejected"] = len(ok), len(df) - len(ok)
    return out


def goodput(df: pd.DataFrame, ttft_s: float, tpot_s: float) -> float:
    """Requests per second that met both latency targets (DistServe's goodput)."""
    served = _served(df, "goodput")
    ttft_s, tpot_s = checks.positive("ttft_s", ttft_s), checks.positive("tpot_s", tpot_s)
    ok = df[(df.error == "") & (df.ttft_s <= ttft_s) & (df.tpot_s.fillna(0) <= tpot_s)]
    return len(ok) / (served.finish_s.max() - served.arrival_s.min())


def littles_law(df: pd.DataFrame) -> dict:
    """L (requests in the system, time-averaged from the step log) against λ·W (arrival rate ×
    mean latency, from the request rows). The two agree when the engine's accounting is right;
    the log counts requests at step starts, so one arriving mid-step is counted from the next
    step and L runs low by about λ · (half a step) ÷ L."""
    ok = _served(df, "littles_law")
    steps = _steps(df, "littles_law")
    span = ok.finish_s.max() - ok.arrival_s.min()
    in_system = float((steps.in_system * steps.step_s).sum() / span)
    rate = len(ok) / span
    return {"L": in_system, "lambda": rate, "W_s": float(ok.latency_s.mean()),
            "lambda_W": rate * float(ok.latency_s.mean())}  # fmt: skip


def kv_usage(df: pd.DataFrame, max_len: int | None = None) -> dict:
    """KV memory held, time-averaged over the run's steps, in token slots: stored positions,
    paged allocation (blocks × block size), and contiguous reservations — prompt +
    max_new_tokens per running request, or `max_len` each (the model's maximum, as early
    systems reserved). Waste = 1 − stored ÷ held."""
    _served(df, "kv_usage")
    steps, size = _steps(df, "kv_usage"), df.attrs["blocks"]["block_size"]
    if max_len is not None:
        max_len = checks.whole("max_len", max_len)
    w = steps.step_s / steps.step_s.sum()
    stored = float((steps.kv_tokens * w).sum())
    held = {"paged": float((steps.blocks_in_use * size * w).sum()),
            "contiguous, prompt + max_new": float((steps.reserved_tokens * w).sum())}  # fmt: skip
    if max_len is not None:
        held[f"contiguous, max length {max_len}"] = float(
            (steps.running * float(max_len) * w).sum()
        )
    return {"stored": stored, **{k: {"held": v, "waste": 1 - stored / v} for k, v in held.items()}}


# --- Step-time models (virtual clocks) ------------------------------------------------------


@dataclass(frozen=True)
class StepModel:
    """seconds ≈ fixed + per_seq · seqs + per_token · tokens + per_context · context."""

    fixed: float
    per_seq: float
    per_token: float
    per_context: float

    def __call__(self, step: Step) -> float:
        return (self.fixed + self.per_seq * step.seqs + self.per_token * step.tokens
                + self.per_context * step.context)  # fmt: skip


def fit_step_time(steps: pd.DataFrame) -> StepModel:
    """Least-squares fit of a StepModel to a step log (`seqs`, `tokens`, `context`, `step_s`).

    A term whose coefficient comes out negative is dropped (set to 0) and the rest refitted. Steps
    more than 3 median deviations from a first fit (a burst from another program on a shared
    machine) are left out of the second."""
    if isinstance(steps, pd.DataFrame) and "request" in steps.columns and "seqs" not in steps:
        raise TypeError("steps is run's table of requests: pass its step log, df.attrs['steps']")
    if not isinstance(steps, pd.DataFrame):
        raise TypeError(f"steps must be a step log (df.attrs['steps']), got {type(steps).__name__}")
    missing = [c for c in ("seqs", "tokens", "context", "step_s") if c not in steps.columns]
    if missing:
        raise ValueError(f"steps lacks the column(s) {missing}: pass run's df.attrs['steps']")
    if not np.isfinite(steps.step_s.to_numpy(dtype=float)).all():
        raise ValueError("steps.step_s holds NaN or inf: drop those steps before fitting")
    x = np.column_stack([np.ones(len(steps)), steps.seqs, steps.tokens, steps.context])
    y = steps.step_s.to_numpy(dtype=float)
    if np.linalg.matrix_rank(x) < 4:
        raise ValueError("the step log does not vary seqs, tokens and context enough to fit: "
                         "measure steps with several batch sizes and prompt lengths")  # fmt: skip

    def fit(rows):
        keep = [0, 1, 2, 3]
        while True:
            coef = np.linalg.lstsq(x[rows][:, keep], y[rows], rcond=None)[0]
            if (coef >= 0).all():
                break
            keep.pop(int(np.argmin(coef)))
        full = np.zeros(4)
        full[keep] = coef
        return full

    coef = fit(np.ones(len(y), dtype=bool))
    deviation = np.abs(y / np.maximum(x @ coef, 1e-12) - 1)
    typical = np.median(deviation)
    calm = deviation <= 3 * typical if typical > 0 else np.ones(len(y), dtype=bool)
    if typical > 0 and np.linalg.matrix_rank(x[calm]) == 4:
        coef = fit(calm)
    return StepModel(*map(float, coef))


def planner_step_time(model, gpu, dtype: str = "bf16", tp: int = 1) -> Callable[[Step], float]:
    """A virtual clock from `planner.step_seconds`: a step of B sequences carrying T tokens over
    C cached positions costs one forward pass of batch B, T/B tokens and C/B context each."""
    pass_s = planner.step_seconds_function(model=model, gpu=gpu, dtype=dtype, tp=tp)  # checked once

    def seconds(step: Step) -> float:
        return pass_s(step.seqs, max(1, round(step.tokens / step.seqs)),
                      max(1, round(step.context / step.seqs)))  # fmt: skip

    return seconds


# --- Workloads ------------------------------------------------------------------------------


def published_lengths(trace: str = "azure-conv-2023") -> pd.DataFrame:
    """Percentiles of prompt and output lengths of a published trace (data/published_serving.csv):
    columns percentile, prompt_tokens, output_tokens."""
    if not isinstance(trace, str):
        raise TypeError(f"trace must be a source name such as 'azure-conv-2023', got {trace!r}")
    t = pd.read_csv(DATA_DIR / "published_serving.csv")
    t = t[(t.source == trace) & t.metric.isin(["prompt_tokens", "output_tokens"])]
    if t.empty:
        known = sorted(pd.read_csv(DATA_DIR / "published_serving.csv").source.unique())
        raise ValueError(f"no length percentiles for trace {trace!r}; known sources: {known}")
    return t.pivot_table(index="percentile", columns="metric", values="value").reset_index()


def poisson_trace(
    rate: float, n: int, seed: int = 0, trace: str = "azure-conv-2023", scale: float = 1.0,
    vocab: int = 49152, max_prompt: int | None = None, max_output: int | None = None,
) -> list[Request]:  # fmt: skip
    """`n` requests arriving as a Poisson process of `rate` per second; prompt and output lengths
    drawn independently from the published trace's percentiles (inverse CDF, linear between
    them), multiplied by `scale` (≥ 1 token) and capped; prompts are random token ids. Seeded."""
    rate = checks.positive("rate", rate)
    n = checks.whole("n", n)
    scale = checks.positive("scale", scale)
    seed = checks.whole("seed", seed, minimum=0)
    vocab = checks.whole("vocab", vocab, minimum=2)
    for name, value in (("seed", seed), ("vocab", vocab)):
        if value >= 2**63:
            raise ValueError(f"{name} must be below 2**63, got {value}")
    max_prompt = None if max_prompt is None else checks.whole("max_prompt", max_prompt)
    max_output = None if max_output is None else checks.whole("max_output", max_output)
    rng = np.random.default_rng(seed)
    q = published_lengths(trace)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    u = rng.random((n, 2))
    prompts = np.interp(u[:, 0] * 100, q.percentile, q.prompt_tokens) * scale
    outputs = np.interp(u[:, 1] * 100, q.percentile, q.output_tokens) * scale
    prompts = np.clip(np.rint(prompts), 1, max_prompt or None).astype(int)
    outputs = np.clip(np.rint(outputs), 1, max_output or None).astype(int)
    gen = torch.Generator().manual_seed(seed)
    return [
        Request(
            torch.randint(min(100, vocab - 1), vocab, (int(p),), generator=gen), int(o), float(a)
        )
        for a, p, o in zip(arrivals, prompts, outputs, strict=True)
    ]
