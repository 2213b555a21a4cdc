"""Workloads for the serving engine: requests with a prompt, a length cap and a true answer
length, arriving as a Poisson process with lengths drawn from a published trace."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from helpers import DATA_DIR, checks

# A live run waits for each arrival in real time: one later than this is most likely in ms.
LIVE_ARRIVAL_LIMIT_S = 3600.0


@dataclass(frozen=True)
class Request:
    prompt_ids: torch.Tensor  # 1-D token ids
    max_new_tokens: int  # the cap the client sends
    arrival_s: float = 0.0
    output_tokens: int | None = None  # the answer's true length (≤ the cap); None: the cap

    @property
    def length(self) -> int:
        """Tokens this request will generate."""
        return min(self.output_tokens or self.max_new_tokens, self.max_new_tokens)


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
    rate: float,
    n: int,
    seed: int = 0,
    trace: str = "azure-conv-2023",
    scale: float = 1.0,
    vocab: int = 49152,
    max_prompt: int | None = None,
    max_output: int | None = None,
) -> list[Request]:
    """`n` requests arriving as a Poisson process of `rate` per second; prompt and answer
    lengths drawn independently from the published trace's percentiles (inverse CDF, linear
    between them), multiplied by `scale` (≥ 1 token) and capped. Each request's answer length
    is its `output_tokens`; its `max_new_tokens` is the cap every client sends (`max_output`,
    or the trace's longest answer × scale), so nothing that reads the cap knows the true
    length. Prompts are random token ids. Seeded."""
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
    cap = max_output or max(1, round(float(q.output_tokens.max()) * scale))
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    u = rng.random((n, 2))
    prompts = np.interp(u[:, 0] * 100, q.percentile, q.prompt_tokens) * scale
    outputs = np.interp(u[:, 1] * 100, q.percentile, q.output_tokens) * scale
    prompts = np.clip(np.rint(prompts), 1, max_prompt or None).astype(int)
    outputs = np.clip(np.rint(outputs), 1, cap).astype(int)
    gen = torch.Generator().manual_seed(seed)
    low = min(100, vocab - 1)
    return [
        Request(torch.randint(low, vocab, (int(p),), generator=gen), cap, float(a), int(o))
        for a, p, o in zip(arrivals, prompts, outputs, strict=True)
    ]


def check_requests(
    requests, context_limit: int | None, vocab: int | None = None, live: bool = False
) -> list[Request]:
    if isinstance(requests, Request):
        raise TypeError("requests is one serving.Request: pass a list of them, e.g. [request]")
    if isinstance(requests, str | bytes | dict) or not hasattr(requests, "__iter__"):
        raise TypeError(f"requests must be a list of serving.Request, got {requests!r}")
    requests = list(requests)
    if not requests:
        raise ValueError("requests is empty: give at least one serving.Request")
    last = -math.inf
    for i, r in enumerate(requests):
        check_request(i, r, context_limit, vocab, live)
        if r.arrival_s < last:
            raise ValueError(
                f"requests[{i}] arrives at {r.arrival_s} s, before requests[{i - 1}] "
                f"({last} s): sort the requests by arrival_s"
            )
        last = r.arrival_s
    return requests


def check_request(i: int, r, context_limit, vocab, live) -> None:
    if not isinstance(r, Request):
        raise TypeError(f"requests[{i}] is a {type(r).__name__}, not a serving.Request")
    ids = r.prompt_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise TypeError(f"requests[{i}].prompt_ids must be a 1-D tensor of token ids")
    if ids.numel() == 0:
        raise ValueError(f"requests[{i}] has an empty prompt: give at least one token")
    checks.whole(f"requests[{i}].max_new_tokens", r.max_new_tokens)
    if r.output_tokens is not None:
        checks.whole(f"requests[{i}].output_tokens", r.output_tokens)
    checks.positive(f"requests[{i}].arrival_s", r.arrival_s, allow_zero=True)
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
