"""Reading a serving run: latency metrics as `vllm bench serve` defines them, goodput in its two
published definitions, Little's law, KV memory held. Pure pandas; no torch.

Per request (the columns `serving.run` writes), with t₀ its arrival and t₁ … t_n its tokens:
- **TTFT** = t₁ − t₀ (queueing and prefill included);
- **TPOT** = (t_n − t₁) ÷ (n − 1): the mean gap *after* the first token (undefined for n = 1);
- **ITL** = the gaps t_{i+1} − t_i themselves; `summary` pools every request's gaps before taking
  percentiles, as vLLM's benchmark does, and `max_itl_s` is each request's worst gap — the stall
  a long prefill causes and chunked prefill bounds;
- **E2EL** (`latency_s`) = t_n − t₀.
Throughput counts generated tokens (and requests) from the first arrival to the last token.

Goodput, two definitions with one name: `goodput` is vLLM bench's (`--goodput`): served
requests per second that met every target, over the run. `max_rate_meeting` is DistServe's
(Zhong et al., OSDI '24): the highest offered rate at which a target fraction of requests
(e.g. 90 %) meets the targets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers import checks


def _served(df, what: str) -> pd.DataFrame:
    """The served rows of `run`'s result; a run that served nothing says so instead of NaN."""
    if not isinstance(df, pd.DataFrame) or not {"error", "finish_s"} <= set(df.columns):
        raise TypeError(
            f"df must be the table serving.run returns (one row per request) for "
            f"{what}, got {type(df).__name__}"
        )
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


def request_metrics(token_s, arrival_s: float) -> dict:
    """TTFT, TPOT, worst inter-token gap and E2EL of one request from its token times."""
    t = np.asarray(token_s, dtype=float)
    if t.size == 0:
        return {"ttft_s": np.nan, "tpot_s": np.nan, "max_itl_s": np.nan, "latency_s": np.nan}
    gaps = np.diff(t)
    return {
        "ttft_s": t[0] - arrival_s,
        "tpot_s": (t[-1] - t[0]) / (t.size - 1) if t.size > 1 else np.nan,
        "max_itl_s": gaps.max() if gaps.size else np.nan,
        "latency_s": t[-1] - arrival_s,
    }


def inter_token_latencies(df: pd.DataFrame) -> np.ndarray:
    """Every gap between two successive tokens of a served request, all requests pooled."""
    ok = _served(df, "inter_token_latencies")
    gaps = [np.diff(np.asarray(t, dtype=float)) for t in ok.token_s]
    return np.concatenate(gaps) if gaps else np.array([])


def _check_percentiles(percentiles) -> list:
    if isinstance(percentiles, str) or not hasattr(percentiles, "__iter__"):
        raise TypeError(f"percentiles must be a list such as (50, 90, 99), got {percentiles!r}")
    for p in percentiles:
        if checks.positive("percentiles", p, allow_zero=True) > 100:
            raise ValueError(f"percentiles must lie in 0…100, got {p}")
    return list(percentiles)


def _percentile(values, p) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(np.percentile(values, p)) if values.size else 0.0


def summary(df: pd.DataFrame, percentiles=(50, 90, 99)) -> dict:
    """Percentiles of TTFT, TPOT, ITL (pooled gaps), each request's worst gap and E2E latency
    (s) over served requests, and throughput: generated tokens and requests per second from the
    first arrival to the last finish. A metric no request defines (TPOT of one-token answers)
    reads 0."""
    ok = _served(df, "summary")
    percentiles = _check_percentiles(percentiles)
    span = ok.finish_s.max() - ok.arrival_s.min()
    metrics = {
        "ttft": ok.ttft_s,
        "tpot": ok.tpot_s,
        "itl": inter_token_latencies(df),
        "max_itl": ok.max_itl_s,
        "latency": ok.latency_s,
    }
    out = {f"{m}_p{p}_s": _percentile(v, p) for m, v in metrics.items() for p in percentiles}
    out["tokens_per_s"] = float(ok.output_tokens.sum() / span)
    out["requests_per_s"] = len(ok) / span
    out["served"], out["rejected"] = len(ok), len(df) - len(ok)
    return out


def met_targets(df: pd.DataFrame, ttft_s: float, tpot_s: float) -> pd.Series:
    """Per served request: True when its TTFT ≤ ttft_s and its TPOT ≤ tpot_s (a one-token
    answer has no TPOT and meets that target)."""
    ok = _served(df, "met_targets")
    ttft_s, tpot_s = checks.positive("ttft_s", ttft_s), checks.positive("tpot_s", tpot_s)
    return (ok.ttft_s <= ttft_s) & (ok.tpot_s.fillna(0) <= tpot_s)


def goodput(df: pd.DataFrame, ttft_s: float, tpot_s: float) -> float:
    """vLLM bench's goodput: served requests per second that met both targets, over the run
    (first arrival to last finish)."""
    ok = _served(df, "goodput")
    met = met_targets(df, ttft_s, tpot_s)
    return float(met.sum() / (ok.finish_s.max() - ok.arrival_s.min()))


def max_rate_meeting(rates, attainment, target: float = 0.9) -> float:
    """DistServe's goodput: the highest of `rates` (a sweep, any order) up to which every rate's
    SLO `attainment` (fraction of requests meeting the targets) is ≥ `target`; 0 when the lowest
    rate already misses it."""
    rates, attainment = np.asarray(rates, dtype=float), np.asarray(attainment, dtype=float)
    if rates.size == 0 or rates.shape != attainment.shape:
        raise ValueError("rates and attainment must be equal-length, non-empty lists")
    target = checks.positive("target", target)
    order = np.argsort(rates)
    best = 0.0
    for rate, share in zip(rates[order], attainment[order], strict=True):
        if share < target:
            break
        best = float(rate)
    return best


def littles_law(df: pd.DataFrame) -> dict:
    """L (requests in the system, time-averaged from the step log) beside λ·W (arrival rate ×
    mean latency). Over a finite run that serves every request the two are equal by construction
    (both integrate the same time in system), up to the log sampling counts at step starts:
    bookkeeping that checks the engine's accounting, not evidence that the queue is stable."""
    ok = _served(df, "littles_law")
    steps = _steps(df, "littles_law")
    span = ok.finish_s.max() - ok.arrival_s.min()
    in_system = float((steps.in_system * steps.step_s).sum() / span)
    rate = len(ok) / span
    return {
        "L": in_system,
        "lambda": rate,
        "W_s": float(ok.latency_s.mean()),
        "lambda_W": rate * float(ok.latency_s.mean()),
    }


def kv_usage(df: pd.DataFrame, max_len: int | None = None) -> dict:
    """KV memory held, time-averaged over the run's steps, in token slots: stored positions,
    paged allocation (blocks × block size), and contiguous reservations — prompt +
    max_new_tokens per running request (the cap the client sent: the true length is unknown
    when a request starts), or `max_len` each (the model's maximum, as early systems
    reserved). Waste = 1 − stored ÷ held."""
    _served(df, "kv_usage")
    steps, size = _steps(df, "kv_usage"), df.attrs["blocks"]["block_size"]
    if max_len is not None:
        max_len = checks.whole("max_len", max_len)
    w = steps.step_s / steps.step_s.sum()
    stored = float((steps.kv_tokens * w).sum())
    held = {
        "paged": float((steps.blocks_in_use * size * w).sum()),
        "contiguous, prompt + max_new": float((steps.reserved_tokens * w).sum()),
    }
    if max_len is not None:
        held[f"contiguous, max length {max_len}"] = float(
            (steps.running * float(max_len) * w).sum()
        )
    return {"stored": stored, **{k: {"held": v, "waste": 1 - stored / v} for k, v in held.items()}}
