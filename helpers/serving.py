"""A small serving engine on the course's decode loop: requests arriving over time, static vs
continuous batching, a paged KV cache and chunked prefill, timed on a wall or a virtual clock.

    from helpers import serving
    requests = serving.poisson_trace(rate=2.0, n=40, seed=0, scale=1 / 16)
    df = serving.run(model, requests, policy="continuous", max_batch=8, block_size=16,
                     kv_blocks=256, prefill_chunk=64)
    serving.summary(df)            # TTFT / TPOT / ITL / latency percentiles, throughput
    df.attrs["steps"]              # the engine's log: one row per step (below)

**The step** (`ServingEngine.step`, written out in notebook 05) is one forward pass over a set
of sequences, decided in vLLM v1's order: the running requests first, oldest first, each fed
its next tokens — the one token it generated last, or (part of) a prompt; when a growing
sequence finds no free KV block, the youngest running request is *preempted* (its blocks
freed, re-queued at the front, to recompute its cache later: vLLM's default). Only if nobody
was preempted are waiting requests admitted, while there is room. Then the forward pass, and
every sequence whose tokens are all cached gets its next token; a finished one is retired.
`run` is only the loop around it: the clock, and arrivals joining the queue.

**Scheduling.** `policy="static"` admits a batch only when the engine is empty and reserves
each request's whole length up front (`prompt + max_new_tokens`); nobody joins until the batch
is done. `"continuous"` (Orca's iteration-level scheduling) admits at every step while fewer
than `max_batch` run and the blocks for the newcomer's first tokens are free. Without
`prefill_chunk` a new prompt is prefilled whole in one step; with it, at most that many prompt
tokens run per step (Sarathi-Serve's chunked prefill), so the decoding sequences keep pace.

**KV dtype.** `kv_dtype="int8"` (or `"fp8"`) keeps keys and values in 8 bits with one fp32
scale per head per token (`paged.QuantizedPagedKVCache`, `helpers.kvquant`'s math): a block takes
`paged.block_bytes(...)`, about a quarter of fp32's, so `paged.blocks_in(budget)` gives the same
memory more blocks and more requests run at once.

**Lengths.** A `Request` asks for at most `max_new_tokens` (the cap a client sends) and stops
after `output_tokens` if given (the length its answer really has — an end-of-sequence the
engine cannot foresee). Reservations and the context check use the cap; only the stop uses
the true length. A request that could never fit (`prompt + max_new_tokens − 1` slots over the
cache) is rejected at arrival: its row carries an `error` naming the budget, and the others run.

**Clocks.** `clock="wall"` times each step live (arrivals are real time: the engine waits for
them). A callable `clock(step) -> seconds` runs a *virtual* clock (`helpers.stepmodel`). With
`model=None` nothing is computed — the same scheduler on token counts — so a sweep takes seconds.

**Output.** One row per request: `arrival_s`, `admitted_s` (first scheduled), `first_token_s`,
`finish_s`, `token_s` (time of each token), `tokens` (ids; empty when `model=None`),
`output_tokens`, `ttft_s`, `tpot_s`, `max_itl_s`, `latency_s`, `queue_s`, `preemptions`, `error`
(metrics as `helpers.serving_metrics` defines them). `df.attrs["steps"]`: one row per step —
`start_s`, `step_s`, `seqs`, `decode_seqs`, `prefill_seqs`, `prefill_tokens`, `tokens`, `context`
(cached positions attended, summed), `blocks_in_use`, `kv_tokens` (positions stored),
`reserved_tokens` (prompt + max_new_tokens of the running requests), `running`, `waiting`,
`in_system`, `preempted`. `df.attrs["blocks"]`: total, allocated, freed, peak in use, block_size.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import psutil
import torch

from helpers import checks, paged
from helpers.bench import synchronize
from helpers.decode import check_llama
from helpers.paged import (
    BlockAllocator,
    Feed,
    KVBudgetError,
    PagedKVCache,
    QuantizedPagedKVCache,
    block_bytes,
    blocks_for,
    blocks_in,
)
from helpers.serving_metrics import (
    goodput,
    inter_token_latencies,
    kv_usage,
    littles_law,
    max_rate_meeting,
    met_targets,
    request_metrics,
    summary,
)
from helpers.shapes import format_bytes
from helpers.stepmodel import (
    Step,
    StepModel,
    capacity,
    fit_step_time,
    planner_step_time,
    roofline_step_time,
)
from helpers.workloads import Request, check_requests, poisson_trace, published_lengths

# What notebooks reach through `serving`, by origin: here and workloads, paged, stepmodel, metrics
__all__ = [
    "POLICIES", "Request", "Seq", "ServingEngine", "run", "poisson_trace", "published_lengths",
    "BlockAllocator", "Feed", "KVBudgetError", "PagedKVCache", "QuantizedPagedKVCache",
    "blocks_for", "blocks_in", "block_bytes",
    "Step", "StepModel", "capacity", "fit_step_time", "planner_step_time", "roofline_step_time",
    "goodput", "inter_token_latencies", "kv_usage", "littles_law", "max_rate_meeting",
    "met_targets", "request_metrics", "summary",
]  # fmt: skip

POLICIES = ("continuous", "static")


@dataclass(eq=False)  # compared by identity
class Seq:
    """A request inside the engine: its tokens (prompt, then generated) and how many of them
    are in the KV cache, its block table and its timestamps."""

    index: int
    request: Request
    tokens: list[int]
    prompt_len: int
    table: list[int] = field(default_factory=list)
    cached: int = 0  # positions already in the KV cache
    admitted_s: float = math.nan
    token_s: list[float] = field(default_factory=list)  # when each generated token came out
    preemptions: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def uncached(self) -> int:
        return len(self.tokens) - self.cached

    @property
    def done(self) -> bool:
        return self.generated >= self.request.length

    def need_slots(self) -> int:
        """KV slots the request may need (its cap): every token but the last generated one."""
        return self.prompt_len + self.request.max_new_tokens - 1


def _ceil_div(a: int, b: int) -> int:  # blocks_for without its checks: the hot path
    return -(-a // b)


class ServingEngine:
    """The scheduler, the paged KV cache and the model (None: token counts only)."""

    def __init__(
        self, model, policy, max_batch, block_size, kv_blocks, prefill_chunk, clock, kv_dtype=None
    ):
        self.model, self.policy, self.max_batch = model, policy, max_batch
        self.block_size, self.prefill_chunk, self.clock = block_size, prefill_chunk, clock
        self.alloc = BlockAllocator(kv_blocks)
        self.cache, self.kv_dtype = None, kv_dtype
        if model is not None:
            weight = next(model.parameters())
            self.cache = paged.make_cache(
                model.config, kv_blocks, block_size, weight.dtype, weight.device, kv_dtype
            )
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.steps: list[dict] = []
        self.arrived = self.finished = 0

    # -- the step ----------------------------------------------------------------------------
    def step(self, now: float) -> float | None:
        """One iteration at time `now` (vLLM v1's order); its seconds, or None if nothing ran.
        Notebook 05 writes the same function out (tests/test_notebook_05.py checks it)."""
        start = time.perf_counter()
        budget = self.prefill_budget()  # prompt tokens this step may carry (chunked prefill)
        work, preempted = [], []  # work: (sequence, tokens it feeds)
        for seq in list(self.running):  # 1. running requests first, oldest first
            if seq in preempted:
                continue
            n = self.feed_size(seq, budget)
            preempted += self.make_room(seq, seq.cached + n)  # short of blocks: youngest out
            if seq not in preempted:
                self.grow(seq, seq.cached + n)
                work.append((seq, n))
                budget -= n if n > 1 else 0
        while not preempted and (seq := self.next_admissible(budget)):  # 2. then newcomers
            n = self.feed_size(seq, budget)
            self.admit(seq, now)
            self.grow(seq, seq.cached + n)
            work.append((seq, n))
            budget -= n if n > 1 else 0
        if not work:
            return None
        tokens = self.forward(work)  # 3. one forward pass over every fed token
        seconds = self.seconds(work, time.perf_counter() - start)
        self.log(now, seconds, work, len(preempted))
        self.advance(work, tokens, now + seconds)  # 4. new tokens out, finished ones retired
        return seconds

    # -- its parts -----------------------------------------------------------------------------
    def prefill_budget(self) -> float:
        """Prompt tokens one step may carry: `prefill_chunk`, or no limit."""
        return math.inf if self.prefill_chunk is None else self.prefill_chunk

    def feed_size(self, seq: Seq, budget: float) -> int:
        """Tokens `seq` feeds this step: its last token (decode), or as much of its prompt
        (or of a recompute after preemption) as the budget allows."""
        todo = seq.uncached
        return int(min(todo, budget)) if todo > 1 else todo

    def make_room(self, seq: Seq, upto: int) -> list[Seq]:
        """Preempt the youngest running requests until `seq` can hold `upto` positions; the
        preempted (`seq` itself among them when it was the youngest left)."""
        victims = []
        need = _ceil_div(upto, self.block_size) - len(seq.table)
        while need > self.alloc.free and seq in self.running:
            victims.append(self.running[-1])
            self.preempt(self.running[-1])
        return victims

    def grow(self, seq: Seq, upto: int) -> None:
        """Give `seq` blocks for `upto` positions (they are free: `make_room` saw to it)."""
        seq.table += self.alloc.allocate(max(_ceil_div(upto, self.block_size) - len(seq.table), 0))

    def preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.alloc.release(seq.table)
        seq.table, seq.cached = [], 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def next_admissible(self, budget: float) -> Seq | None:
        """The first waiting request if it may start now, else None. Static: only into an empty
        engine, with its whole length reserved; continuous: while the batch has a seat and the
        blocks for the tokens it would feed now are free."""
        if not self.waiting or len(self.running) >= self.max_batch:
            return None
        seq = self.waiting[0]
        if self.policy == "static":
            if any(s.cached for s in self.running):
                return None  # a static batch is under way (it has run): nobody joins
            reserved = sum(_ceil_div(s.need_slots(), self.block_size) for s in self.running)
            need = _ceil_div(seq.need_slots(), self.block_size)
            return seq if reserved + need <= self.alloc.num_blocks else None
        n = self.feed_size(seq, budget)
        if n == 0:  # the step's prompt budget is spent
            return None
        return seq if _ceil_div(n, self.block_size) <= self.alloc.free else None

    def admit(self, seq: Seq, now: float) -> None:
        self.waiting.popleft()
        if math.isnan(seq.admitted_s):
            seq.admitted_s = now
        self.running.append(seq)

    def forward(self, work: list[tuple[Seq, int]]) -> list[int]:
        """The next token of every sequence whose tokens are now all cached (placeholder zeros
        when there is no model)."""
        finishing = [s.cached + n == len(s.tokens) for s, n in work]
        if self.model is None:
            return [0] * sum(finishing)
        feeds = [
            Feed(s.tokens[s.cached : s.cached + n], s.cached, s.table, last)
            for (s, n), last in zip(work, finishing, strict=True)
        ]
        tokens = paged.forward(self.model, self.cache, feeds)
        synchronize(self.cache.device)
        return tokens

    def advance(self, work: list[tuple[Seq, int]], tokens: list[int], end: float) -> None:
        """After the pass: the fed positions are cached, new tokens come out at `end`, and the
        requests that are done leave, returning their blocks."""
        emitted = iter(tokens)
        for seq, n in work:
            seq.cached += n
            if seq.cached == len(seq.tokens):
                seq.tokens.append(next(emitted))
                seq.token_s.append(end)
                if seq.done:
                    self.running.remove(seq)
                    self.alloc.release(seq.table)
                    seq.table = []
                    self.finished += 1

    def seconds(self, work: list[tuple[Seq, int]], wall_s: float) -> float:
        """What the step cost: `wall_s` as timed, or the virtual clock's price of its shape."""
        return (
            wall_s if self.clock == "wall" else _clock_seconds(self.clock, step_shape(work), self)
        )

    def log(self, now: float, step_s: float, work: list[tuple[Seq, int]], preempted: int) -> None:
        shape, fed = step_shape(work), {id(s): n for s, n in work}
        self.steps.append(
            {
                "start_s": now,
                "step_s": step_s,
                "seqs": shape.seqs,
                "decode_seqs": shape.decode_seqs,
                "prefill_seqs": shape.seqs - shape.decode_seqs,
                "prefill_tokens": shape.prefill_tokens,
                "tokens": shape.tokens,
                "context": shape.context,
                "blocks_in_use": self.alloc.in_use,
                "kv_tokens": sum(s.cached + fed.get(id(s), 0) for s in self.running),
                "reserved_tokens": sum(
                    s.prompt_len + s.request.max_new_tokens for s in self.running
                ),
                "running": len(self.running),
                "waiting": len(self.waiting),
                "in_system": self.arrived - self.finished,
                "preempted": preempted,
            }
        )


def _is_decode(seq: Seq, n: int) -> bool:
    """Feeding the one token generated last (not a prompt, chunk or recompute)."""
    return n == 1 and seq.generated >= 1 and seq.cached + 1 == len(seq.tokens)


def step_shape(work: list[tuple[Seq, int]]) -> Step:
    """What a planned step carries, for a step-time model."""
    decode = sum(1 for s, n in work if _is_decode(s, n))
    tokens = sum(n for _, n in work)
    return Step(
        seqs=len(work),
        tokens=tokens,
        context=sum(s.cached + n for s, n in work),
        prefill_tokens=tokens - decode,
        decode_seqs=decode,
    )


def _clock_seconds(clock, shape: Step, engine: ServingEngine) -> float:
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


# --- The loop: the clock and the arrivals ---------------------------------------------------


def run(
    model,
    requests,
    policy: str = "continuous",
    max_batch: int = 8,
    block_size: int = 16,
    kv_blocks: int = 256,
    prefill_chunk: int | None = None,
    clock: str | Callable[[Step], float] = "wall",
    step: Callable[[ServingEngine, float], float | None] | None = None,
    kv_dtype: str | None = None,
) -> pd.DataFrame:
    """Serve `requests` (sorted by arrival) and return one row per request (module docstring).

    `model`: a Llama-architecture model, or None to simulate the schedule without computing
    (then `clock` must be a step-time function). Greedy decoding; each request stops at its
    `output_tokens` (or at `max_new_tokens`). `step(engine, now)`: a step function to use
    instead of `ServingEngine.step` (notebook 05 runs its own). `kv_dtype`: None keeps keys and
    values in the model's dtype; "int8" (or "fp8") stores them in 8 bits with one scale per head
    per token (`paged.QuantizedPagedKVCache`): give it the blocks of the same bytes with
    `paged.blocks_in`."""
    if step is not None and not callable(step):
        raise TypeError("step must be None or a function (engine, now) -> seconds or None")
    engine = _engine(
        model, policy, max_batch, block_size, kv_blocks, prefill_chunk, clock, kv_dtype
    )
    requests = check_requests(
        requests,
        getattr(model.config, "max_position_embeddings", None) if model is not None else None,
        getattr(model.config, "vocab_size", None) if model is not None else None,
        live=clock == "wall",
    )
    seqs = [Seq(i, r, r.prompt_ids.tolist(), r.prompt_ids.numel()) for i, r in enumerate(requests)]
    errors = _too_big(seqs, engine.block_size, engine.alloc.num_blocks)
    pending = deque(s for s in seqs if s.index not in errors)
    start = time.perf_counter()
    now = 0.0
    while pending or engine.waiting or engine.running:
        if clock == "wall":
            now = time.perf_counter() - start
        while pending and pending[0].request.arrival_s <= now:
            engine.waiting.append(pending.popleft())
            engine.arrived += 1
        seconds = engine.step(now) if step is None else step(engine, now)
        if seconds is not None:
            now += seconds
        elif not engine.running and pending:  # idle: jump (or wait) to the next arrival
            if clock == "wall":
                time.sleep(max(0.0, pending[0].request.arrival_s - now))
            else:
                now = pending[0].request.arrival_s
    return _results(seqs, errors, engine, model is None)


def _engine(model, policy, max_batch, block_size, kv_blocks, prefill_chunk, clock, kv_dtype):
    policy = checks.choice("policy", policy, POLICIES)
    paged.cache_class(kv_dtype)  # a bad kv_dtype is refused before anything runs
    max_batch = checks.whole("max_batch", max_batch)
    block_size = checks.whole("block_size", block_size)
    kv_blocks = checks.whole("kv_blocks", kv_blocks)
    if prefill_chunk is not None:
        prefill_chunk = checks.whole("prefill_chunk", prefill_chunk)
    if clock != "wall" and not callable(clock):
        raise TypeError("clock must be 'wall' or a function step -> seconds (a virtual clock)")
    if model is None and clock == "wall":
        raise ValueError("model=None simulates the schedule: give clock=a step-time function")
    if model is not None:
        check_llama(model)
        _check_kv_budget(model, kv_blocks, block_size, kv_dtype)
    return ServingEngine(
        model, policy, max_batch, block_size, kv_blocks, prefill_chunk, clock, kv_dtype
    )


def _too_big(seqs: list[Seq], block_size: int, kv_blocks: int) -> dict[int, str]:
    errors = {}
    for s in seqs:
        need = _ceil_div(s.need_slots(), block_size)
        if need > kv_blocks:
            errors[s.index] = (
                f"needs {need} KV blocks ({s.need_slots()} positions in blocks of {block_size}) "
                f"but the cache has kv_blocks={kv_blocks} ({kv_blocks * block_size} positions): "
                "raise kv_blocks or shorten the request"
            )
    if errors:
        warnings.warn(
            f"{len(errors)} request(s) rejected: {next(iter(errors.values()))}", stacklevel=3
        )
    return errors


def _check_kv_budget(model, kv_blocks: int, block_size: int, kv_dtype=None) -> None:
    """The paged cache's bytes, estimated before allocating it, against the memory there is."""
    weight = next(model.parameters())
    per_block = paged.block_bytes(model.config, block_size, weight.element_size(), kv_dtype)
    need = kv_blocks * per_block
    if weight.device.type == "cuda":
        have, where = torch.cuda.mem_get_info(weight.device)[0], f"{weight.device} has free"
    else:
        have, where = psutil.virtual_memory().available, "this machine has available"
    if need > have:
        raise ValueError(
            f"kv_blocks={kv_blocks} needs {format_bytes(need)} of KV cache ({block_size} positions "
            f"per block, {format_bytes(per_block)} each) and {where} {format_bytes(have)}: lower "
            f"kv_blocks to at most {max(1, int(have * 0.8 // per_block))}"
        )


def _results(seqs, errors, engine, simulated) -> pd.DataFrame:
    rows = []
    for s in seqs:
        r = s.request
        rows.append(
            {
                "request": s.index,
                "prompt_tokens": s.prompt_len,
                "max_new_tokens": r.max_new_tokens,
                "output_tokens": s.generated,
                "arrival_s": r.arrival_s,
                "admitted_s": s.admitted_s,
                "first_token_s": s.token_s[0] if s.token_s else math.nan,
                "finish_s": s.token_s[-1] if s.done and s.token_s else math.nan,
                "token_s": s.token_s,
                "tokens": [] if simulated else s.tokens[s.prompt_len :],
                "preemptions": s.preemptions,
                "error": errors.get(s.index, ""),
                **request_metrics(s.token_s, r.arrival_s),
            }
        )
    df = pd.DataFrame(rows)
    df["queue_s"] = df.admitted_s - df.arrival_s
    df.attrs["steps"] = pd.DataFrame(engine.steps)
    a = engine.alloc
    df.attrs["blocks"] = {
        "total": a.num_blocks,
        "allocated": a.allocated,
        "freed": a.freed,
        "peak_in_use": a.peak,
        "block_size": engine.block_size,
        "kv_dtype": engine.kv_dtype,
    }
    return df
