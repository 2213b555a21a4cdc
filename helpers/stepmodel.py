"""What one engine step costs: the virtual clocks that let the scheduler run without a model.

A *step* is one forward pass over some sequences (`Step`: how many, the tokens fed, the cached
positions attended to). Three clocks price it:

- `StepModel`, fitted to this machine's live steps by `fit_step_time`:
  seconds ≈ fixed + per_seq·seqs + per_context·context + matmul(tokens), where matmul is
  piecewise linear in the step's tokens: `per_token[k]` seconds for each token between
  `knots[k]` and `knots[k + 1]`. The rate is batch-dependent because skinny matmuls are: a
  CPU reads the weights once for the first few rows and then pays less per extra row
  (notebook 00's decode-shaped products), so one global per-token price overprices decode
  batches and underprices the first token.
- `roofline_step_time`, a GPU from its datasheet: max(bytes ÷ bandwidth, FLOPs ÷ peak) +
  overhead. Taking the larger assumes that streaming weights and computing overlap within a
  step, as Sarathi-Serve (Agrawal et al., OSDI '24) measured: a prefill chunk that rides on a
  memory-bound decode batch costs almost nothing until the step turns compute-bound.
- `planner_step_time`, the planner's prediction (which sums the two terms for datasheet
  figures, as published prefill times suggest).

`capacity` turns any of them into the requests per second an engine can serve at a full batch.
No torch here: pure arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from helpers import checks, planner
from helpers.shapes import VALUE_BYTES, WEIGHT_BYTES, Shape, kv_cache_bytes

DEFAULT_KNOTS = (0, 8, 32, 128)  # where a CPU's skinny-matmul rate changes most


@dataclass(frozen=True)
class Step:
    """What one forward pass carries: the input of a step-time model."""

    seqs: int  # sequences in the step (the batch)
    tokens: int  # tokens fed, all sequences together
    context: int  # cached positions attended to, summed over sequences
    prefill_tokens: int = 0
    decode_seqs: int = 0


def _hinges(tokens, knots: Sequence[int]) -> np.ndarray:
    """(rows, segments): how many of each row's tokens fall in each segment between knots."""
    t = np.asarray(tokens, dtype=float).reshape(-1, 1)
    lows = np.asarray(knots, dtype=float)
    highs = np.append(lows[1:], np.inf)
    return np.clip(t - lows, 0, highs - lows)


@dataclass(frozen=True)
class StepModel:
    """seconds ≈ fixed + per_seq·seqs + per_context·context + Σₖ per_token[k]·(tokens in
    segment k). A single `per_token` number is one rate for every token (knots (0,))."""

    fixed: float
    per_seq: float
    per_token: float | tuple[float, ...]
    per_context: float
    knots: tuple[int, ...] = (0,)

    def __post_init__(self):
        rates = (self.per_token,) if np.isscalar(self.per_token) else tuple(self.per_token)
        object.__setattr__(self, "per_token", tuple(float(r) for r in rates))
        object.__setattr__(self, "knots", tuple(int(k) for k in self.knots))
        if len(self.knots) != len(self.per_token) or self.knots[0] != 0:
            raise ValueError(
                f"StepModel needs one per_token rate per segment starting at knot 0, got "
                f"knots {self.knots} and {len(self.per_token)} rate(s)"
            )

    def token_seconds(self, tokens: int) -> float:
        """The matmul part of a step that feeds `tokens` tokens."""
        return float(_hinges([tokens], self.knots)[0] @ np.asarray(self.per_token))

    def __call__(self, step: Step) -> float:
        return (
            self.fixed
            + self.per_seq * step.seqs
            + self.per_context * step.context
            + self.token_seconds(step.tokens)
        )


def _check_log(steps) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(steps, pd.DataFrame) and "request" in steps.columns and "seqs" not in steps:
        raise TypeError("steps is run's table of requests: pass its step log, df.attrs['steps']")
    if not isinstance(steps, pd.DataFrame):
        raise TypeError(f"steps must be a step log (df.attrs['steps']), got {type(steps).__name__}")
    missing = [c for c in ("seqs", "tokens", "context", "step_s") if c not in steps.columns]
    if missing:
        raise ValueError(f"steps lacks the column(s) {missing}: pass run's df.attrs['steps']")
    y = steps.step_s.to_numpy(dtype=float)
    if not np.isfinite(y).all():
        raise ValueError("steps.step_s holds NaN or inf: drop those steps before fitting")
    return steps[["seqs", "tokens", "context"]].to_numpy(dtype=float), y


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient ≥ 0: the most negative term is dropped and the rest
    refitted until none is negative."""
    keep = list(range(x.shape[1]))
    while True:
        coef = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(x.shape[1])
    full[keep] = coef
    return full


def fit_step_time(steps: pd.DataFrame, knots: Sequence[int] = DEFAULT_KNOTS) -> StepModel:
    """Fit a StepModel to a step log (`seqs`, `tokens`, `context`, `step_s`).

    Segments above the largest token count in the log are dropped (the last fitted rate goes
    on). Coefficients are kept ≥ 0. Steps more than 3 median deviations from a first fit (a
    burst from another program on a shared machine) are left out of the last, least-squares
    fit; the first minimises relative absolute deviation, which a few bursts cannot pull."""
    data, y = _check_log(steps)
    knots = tuple(int(k) for k in knots)
    if not knots or knots[0] != 0 or list(knots) != sorted(set(knots)):
        raise ValueError(f"knots must rise from 0, e.g. {DEFAULT_KNOTS}; got {knots}")
    knots = tuple(k for k in knots if k < data[:, 1].max()) or (0,)
    x = np.column_stack([np.ones(len(y)), data[:, 0], data[:, 2], _hinges(data[:, 1], knots)])
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise ValueError(
            "the step log does not vary seqs, tokens and context enough to fit: "
            "measure steps with several batch sizes and prompt lengths"
        )
    coef = _nonnegative_fit(x, y)
    for _ in range(20):  # least relative *absolute* deviation first (IRLS): a burst can't pull it
        weight = np.sqrt(1 / np.maximum(np.abs(x @ coef / y - 1), 1e-6)) / y
        coef = _nonnegative_fit(x * weight[:, None], y * weight)
    deviation = np.abs(y / np.maximum(x @ coef, 1e-12) - 1)
    typical = np.median(deviation)
    calm = deviation <= 3 * typical
    if typical > 0 and np.linalg.matrix_rank(x[calm]) == x.shape[1]:
        coef = _nonnegative_fit(x[calm], y[calm])
    fixed, per_seq, per_context, *rates = map(float, coef)
    return StepModel(fixed, per_seq, tuple(rates), per_context, knots)


def capacity(
    clock: Callable[[Step], float],
    prompts,
    outputs,
    batch: int,
    prefill_chunk: int | None = None,
    samples: int = 4000,
) -> float:
    """Requests per second served when `batch` sequences share every step (saturation).

    A request holds a seat for one step per token it makes (its last prefill step gives the
    first) plus one per earlier prompt chunk, so `batch` seats finish batch ÷ seats requests
    per step. A step carries k prompt chunks — k drawn as a Poisson count with the mean that
    rate implies, the chunks drawn from the workload's — and `batch` − k decodes; its cost is
    the clock's, averaged over `samples` such steps (seeded). Capacity = requests per step ÷
    mean step seconds."""
    prompts, outputs = np.asarray(prompts, dtype=int), np.asarray(outputs, dtype=float)
    batch = checks.whole("batch", batch)
    if prompts.size == 0 or prompts.shape != outputs.shape:
        raise ValueError("prompts and outputs must be equal-length lists of token counts")
    chunk = int(prefill_chunk) if prefill_chunk else None
    pieces = [
        [p] if chunk is None else [min(chunk, p - i) for i in range(0, p, chunk)] for p in prompts
    ]
    seats = outputs.mean() + np.mean([len(c) - 1 for c in pieces])
    pool = np.array([x for c in pieces for x in c])
    rng = np.random.default_rng(0)
    counts = np.minimum(
        rng.poisson(batch * np.mean([len(c) for c in pieces]) / seats, samples), batch
    )
    context = batch * (prompts.mean() + (outputs**2).mean() / (2 * outputs.mean()))
    total = 0.0
    for k in counts:
        fed = int(rng.choice(pool, k).sum()) if k else 0
        total += clock(Step(batch, batch - k + fed, int(context), fed, batch - k))
    return float(batch / seats / (total / samples))


def roofline_step_time(model, gpu, dtype: str = "bf16") -> Callable[[Step], float]:
    """A virtual clock for one GPU from its datasheet: max(bytes ÷ bandwidth, FLOPs ÷ peak) +
    the engine's overhead per step (Sarathi-Serve's overlap; see the module docstring).

    Bytes: every linear weight once, plus the keys and values of the `context` positions.
    FLOPs: 2 per linear weight per token, plus attention's 4·layers·heads·head_dim per token and
    attended position (a step's tokens spread evenly over its sequences)."""
    dtype = checks.choice("dtype", dtype, WEIGHT_BYTES)
    shape = Shape.of(model.strip().lower() if isinstance(model, str) else model)
    spec = gpu if isinstance(gpu, planner.GPUSpec) else planner.gpu(gpu)
    bandwidth = spec.bandwidth * spec.engine.memory_efficiency
    flops = spec.flops if dtype != "fp32" else (spec.fp32_flops or spec.flops / 4)
    weights = shape.linear_params * WEIGHT_BYTES[dtype]
    overhead = spec.engine.overhead_s(shape.layers)
    attention = 4 * shape.layers * shape.heads * shape.head_dim

    def seconds(step: Step) -> float:
        kv = kv_cache_bytes(shape, 1, step.context, VALUE_BYTES[dtype])
        work = 2 * shape.linear_params * step.tokens + attention * step.tokens * step.context / max(
            step.seqs, 1
        )
        return max((weights + kv) / bandwidth, work / flops) + overhead

    return seconds


def planner_step_time(model, gpu, dtype: str = "bf16", tp: int = 1) -> Callable[[Step], float]:
    """A virtual clock from `planner.step_seconds`: a step of B sequences carrying T tokens over
    C cached positions costs one forward pass of batch B, T/B tokens and C/B context each."""
    pass_s = planner.step_seconds_function(model=model, gpu=gpu, dtype=dtype, tp=tp)  # checked once

    def seconds(step: Step) -> float:
        return pass_s(
            step.seqs,
            max(1, round(step.tokens / step.seqs)),
            max(1, round(step.context / step.seqs)),
        )

    return seconds
