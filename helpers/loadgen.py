"""A benchmark client for any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp's server).

    from helpers import loadgen
    jobs = loadgen.jobs_from(serving.poisson_trace(rate=2.0, n=40, scale=1 / 16))  # open loop
    df = loadgen.run(jobs, url, model)                   # at the jobs' Poisson arrival times
    df = loadgen.run(jobs, url, model, concurrency=4)    # closed loop: 4 in flight
    loadgen.summary(df, slo_ttft_s=1.0, slo_tpot_s=0.1)

Each request streams (`"stream": true`) from `/v1/completions` (a prompt of token ids or text) or
`/v1/chat/completions` (text). The client stamps every streamed chunk on arrival, so per request:
`ttft_s` (send → first token), `itl_s` (every inter-token gap: `tokens − 1` of them), `tpot_s`
(vLLM's definition: (latency − TTFT) ÷ (tokens − 1), the first token excluded), `latency_s` (send
→ end of stream), `tokens` (counted by the client from the chunks), `prompt_tokens` and
`completion_tokens` (the server's own `usage`), `error` ("" when it completed). A chunk that
carries k > 1 tokens (the server's `continuous_usage_stats` say so) gives k tokens at the same
instant: gaps of 0, as the client saw them.

A request that fails (HTTP error, a server that dies mid-stream, the run's time limit) keeps its
row with `error` set; `summary` counts it and leaves it out of the latency statistics. The run is
bounded: at most `MAX_JOBS` requests and `time_limit_s` seconds. `FakeServer` is a loop-back
OpenAI-style server with planted delays, for the tests and to measure the client's own overhead.
The client runs in a thread with its own event loop, so it works inside Jupyter's running loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from helpers import checks
from helpers.fake_server import FakeServer  # noqa: F401 (re-exported: loadgen.FakeServer)

ENDPOINTS = ("completions", "chat")
MAX_JOBS = 10_000
CONNECT_TIMEOUT_S = 3.0
# vLLM's extensions: exactly max_tokens tokens (no early end), and usage in every chunk.
VLLM_EXTRA = {"ignore_eos": True}


class ClientError(RuntimeError):
    """A benchmark that cannot run as asked (server unreachable, wrong model, bad endpoint)."""


@dataclass(frozen=True)
class Job:
    """One request to send: a prompt (token ids or text), how many tokens, when (s from start)."""

    prompt: tuple[int, ...] | str
    max_tokens: int
    arrival_s: float = 0.0


def jobs_from(requests) -> list[Job]:
    """Jobs from the course's requests (`serving.Request`: prompt_ids, arrival_s, and the answer's
    true length `length` — its sampled `output_tokens` under the `max_new_tokens` cap), or from
    (prompt, max_tokens[, arrival_s]) tuples. A server cannot know where a trace's answer ended,
    so each job asks for exactly that many tokens (`max_tokens` with `ignore_eos`, as `vllm bench
    serve` replays a dataset's output lengths), not the cap."""
    jobs = []
    for r in requests:
        if hasattr(r, "prompt_ids"):
            prompt = tuple(int(t) for t in r.prompt_ids.tolist())
            jobs.append(Job(prompt, int(r.length), float(r.arrival_s)))
        else:
            prompt = r[0] if isinstance(r[0], str) else tuple(int(t) for t in r[0])
            jobs.append(Job(prompt, int(r[1]), float(r[2]) if len(r) > 2 else 0.0))
    return jobs


def at_rate(jobs: list[Job], rate: float, seed: int = 0) -> list[Job]:
    """The same jobs re-timed as a Poisson process of `rate` requests/s (inf: all at once)."""
    if rate == math.inf:
        return [Job(j.prompt, j.max_tokens, 0.0) for j in jobs]
    rate = checks.positive("rate", rate)
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(jobs))
    return [
        Job(j.prompt, j.max_tokens, float(t)) for j, t in zip(jobs, np.cumsum(gaps), strict=True)
    ]


# --- One request ------------------------------------------------------------------------------


def _body(job: Job, model: str, endpoint: str, extra: dict) -> dict:
    body = {
        "model": model,
        "max_tokens": job.max_tokens,
        "stream": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        **extra,
    }
    if endpoint == "chat":
        if not isinstance(job.prompt, str):
            raise ClientError(
                "the chat endpoint takes text prompts: give Job(prompt='...') or "
                "use endpoint='completions' for token ids"
            )
        body["messages"] = [{"role": "user", "content": job.prompt}]
    else:
        body["prompt"] = job.prompt if isinstance(job.prompt, str) else list(job.prompt)
    return body


def _chunk_text(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def _error_line(response_text: str, status: int) -> str:
    try:
        err = json.loads(response_text)
        err = err.get("error", err) if isinstance(err, dict) else err
        message = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        message = response_text
    return f"HTTP {status}: {str(message).strip().splitlines()[0][:300] if message else ''}"


async def _one(client, url, model, job, endpoint, extra, t0) -> dict:
    row = {
        "sent_s": time.perf_counter() - t0,
        "arrival_s": job.arrival_s,
        "max_tokens": job.max_tokens,
        "stamps": [],
        "text": "",
        "prompt_tokens": None,
        "completion_tokens": None,
        "error": "",
    }
    seen = 0  # completion tokens so far, by the server's running usage
    try:
        async with client.stream("POST", url, json=_body(job, model, endpoint, extra)) as r:
            if r.status_code != 200:
                row["error"] = _error_line(
                    (await r.aread()).decode(errors="replace"), r.status_code
                )
                return row
            if "text/event-stream" not in r.headers.get("content-type", ""):
                row["error"] = "not streamed: the endpoint answered without server-sent events"
                return row
            async for line in r.aiter_lines():
                now = time.perf_counter() - t0
                if line.startswith("data:") and line[5:].strip() == "[DONE]":
                    row["finish_s"] = now
                    break
                if not line.startswith("data:"):
                    continue
                chunk = json.loads(line[5:])
                text, usage = _chunk_text(chunk, endpoint), chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None and chunk.get("choices"):
                    k = usage["completion_tokens"] - seen  # tokens this chunk carried
                elif chunk.get("choices"):
                    k = 1 if text else 0
                else:
                    k = 0  # the final usage-only chunk
                seen += k
                row["stamps"] += [now] * k
                row["text"] += text
                if usage:
                    row["prompt_tokens"] = usage.get("prompt_tokens")
                    row["completion_tokens"] = usage.get("completion_tokens")
        if "finish_s" not in row:
            row["error"] = "the stream ended without [DONE]: the server closed the connection"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        row["error"] = (
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'connection lost'}"
        )
    except asyncio.CancelledError:
        row["error"] = "cancelled: the run's time limit"
    return row


def _finish(row: dict) -> dict:
    stamps = row.pop("stamps")
    row["tokens"] = len(stamps)
    row["itl_s"] = list(np.diff(stamps)) if stamps else []
    if row["error"] == "" and not stamps:
        row["error"] = "no tokens streamed"
    ok = row["error"] == ""
    row["first_token_s"] = stamps[0] if stamps else math.nan
    row["ttft_s"] = stamps[0] - row["sent_s"] if stamps else math.nan
    row.setdefault("finish_s", math.nan)
    row["latency_s"] = row["finish_s"] - row["sent_s"] if ok else math.nan
    row["tpot_s"] = (
        (row["latency_s"] - row["ttft_s"]) / (len(stamps) - 1)
        if ok and len(stamps) > 1
        else math.nan
    )
    return row


# --- A run ------------------------------------------------------------------------------------


def _base(url: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ClientError(
            f"url must be an http(s) address such as http://127.0.0.1:8011, got {url!r}"
        )
    return url.rstrip("/").removesuffix("/v1")


def preflight(url: str, model: str | None = None) -> str:
    """The model to ask for: checked against the server's /v1/models (one line if unreachable,
    or if `model` is not served); the first served model when `model` is None."""
    base = _base(url)
    try:
        r = httpx.get(f"{base}/v1/models", timeout=CONNECT_TIMEOUT_S)
        r.raise_for_status()
        served = [m["id"] for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        raise ClientError(
            f"no OpenAI-compatible server answers at {base} ({type(err).__name__}): "
            "start one (helpers.server.start) or set COURSE_SERVER_URL"
        ) from None
    if model is None:
        if not served:
            raise ClientError(f"the server at {base} lists no model on /v1/models")
        return served[0]
    if model not in served:
        raise ClientError(
            f"the server at {base} does not serve model {model!r}; it serves {served}"
        )
    return model


async def _drive(
    jobs, url, model, endpoint, extra, concurrency, time_limit_s, request_timeout_s, progress
):
    limits = httpx.Limits(
        max_connections=(concurrency or len(jobs)) + 4, max_keepalive_connections=64
    )
    timeout = httpx.Timeout(request_timeout_s, connect=CONNECT_TIMEOUT_S)
    bar = tqdm(total=len(jobs), desc="requests", disable=not progress, leave=False)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        rows: list[dict | None] = [None] * len(jobs)

        async def send(i):
            if concurrency is None:
                await asyncio.sleep(max(0.0, jobs[i].arrival_s - (time.perf_counter() - t0)))
            rows[i] = await _one(client, url, model, jobs[i], endpoint, extra, t0)
            bar.update(1)

        async def worker(queue):
            while not queue.empty():
                await send(queue.get_nowait())

        if concurrency is None:
            tasks = [asyncio.create_task(send(i)) for i in range(len(jobs))]
        else:
            queue = asyncio.Queue()
            for i in range(len(jobs)):
                queue.put_nowait(i)
            tasks = [asyncio.create_task(worker(queue)) for _ in range(min(concurrency, len(jobs)))]
        done, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    bar.close()
    unsent = {
        "sent_s": math.nan,
        "stamps": [],
        "text": "",
        "prompt_tokens": None,
        "completion_tokens": None,
        "error": "not sent: the run's time limit",
    }
    return [
        _finish(
            r if r is not None else {**unsent, "arrival_s": j.arrival_s, "max_tokens": j.max_tokens}
        )
        for r, j in zip(rows, jobs, strict=True)
    ]


def _in_thread(coro):
    """Run a coroutine to its end on a fresh event loop in a thread (works inside Jupyter)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run(
    jobs: list[Job],
    url: str,
    model: str | None = None,
    *,
    endpoint: str = "completions",
    concurrency: int | None = None,
    warmup: int = 1,
    time_limit_s: float = 300.0,
    request_timeout_s: float = 120.0,
    extra: dict | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Send `jobs` and return one row per job (module docstring). `concurrency=None`: open loop,
    each job sent at its `arrival_s`; `concurrency=N`: closed loop, N in flight. `warmup` copies
    of the first job are sent first and not recorded. `extra` adds fields to every request body
    (default: vLLM's `ignore_eos`, so each request generates exactly `max_tokens`)."""
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, Job) for j in jobs):
        raise TypeError("jobs must be a non-empty list of loadgen.Job (see loadgen.jobs_from)")
    if len(jobs) > MAX_JOBS:
        raise ValueError(f"{len(jobs)} jobs: a run is bounded to {MAX_JOBS}; send fewer")
    endpoint = checks.choice("endpoint", endpoint, ENDPOINTS)
    concurrency = None if concurrency is None else checks.whole("concurrency", concurrency)
    warmup = checks.whole("warmup", warmup, minimum=0)
    time_limit_s = checks.positive("time_limit_s", time_limit_s)
    request_timeout_s = checks.positive("request_timeout_s", request_timeout_s)
    model = preflight(url, model)
    path = f"{_base(url)}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    extra = VLLM_EXTRA if extra is None else dict(extra)
    for job in jobs[:1]:
        _body(job, model, endpoint, extra)  # a chat run with token ids fails here, in one line
    if warmup:
        first = [Job(jobs[0].prompt, jobs[0].max_tokens, 0.0)] * warmup
        seen = _in_thread(
            _drive(first, path, model, endpoint, extra, 1, time_limit_s, request_timeout_s, False)
        )
        if seen[0]["error"].startswith(("HTTP", "not streamed")):
            raise ClientError(f"the warm-up request to {path} failed: {seen[0]['error']}")
    rows = _in_thread(
        _drive(
            jobs,
            path,
            model,
            endpoint,
            extra,
            concurrency,
            time_limit_s,
            request_timeout_s,
            progress,
        )
    )
    df = pd.DataFrame(rows)
    df.insert(0, "request", range(len(df)))
    df.attrs.update(url=path, model=model, endpoint=endpoint, concurrency=concurrency)
    return df


# --- Summaries --------------------------------------------------------------------------------


def summary(
    df: pd.DataFrame,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    percentiles=(50, 90, 99),
) -> dict:
    """p50/p90/p99 of TTFT, TPOT, every inter-token gap (ITL) and latency over completed
    requests; request and token throughput from the first send to the last finish; failed
    requests counted. With SLOs: `slo_attainment` (share of *all* requests meeting both) and
    `goodput_rps` (requests/s meeting both: vLLM's request goodput)."""
    if not isinstance(df, pd.DataFrame) or "ttft_s" not in df:
        raise TypeError("summary takes the table that loadgen.run returns")
    ok = df[df.error == ""]
    out = {"requests": len(df), "completed": len(ok), "failed": len(df) - len(ok)}
    if ok.empty:
        return out
    gaps = np.concatenate([np.asarray(g, dtype=float) for g in ok.itl_s] + [np.empty(0)])
    series = {"ttft": ok.ttft_s, "tpot": ok.tpot_s.dropna(), "itl": gaps, "latency": ok.latency_s}
    for name, values in series.items():
        for p in percentiles:
            out[f"{name}_p{p}_s"] = float(np.percentile(values, p)) if len(values) else math.nan
    span = float(ok.finish_s.max() - ok.sent_s.min())
    out["duration_s"] = span
    out["requests_per_s"] = len(ok) / span
    out["output_tokens_per_s"] = float(ok.completion_tokens.fillna(ok.tokens).sum()) / span
    out["total_tokens_per_s"] = (
        float((ok.completion_tokens.fillna(ok.tokens) + ok.prompt_tokens.fillna(0)).sum()) / span
    )
    if slo_ttft_s is not None or slo_tpot_s is not None:
        met = meets_slo(df, slo_ttft_s, slo_tpot_s)
        out["slo_attainment"] = float(met.mean())
        out["goodput_rps"] = float(met.sum()) / span
    return out


def meets_slo(df: pd.DataFrame, slo_ttft_s: float | None, slo_tpot_s: float | None) -> pd.Series:
    """Per request: completed, TTFT ≤ slo_ttft_s and TPOT ≤ slo_tpot_s (a missing SLO is met)."""
    met = df.error == ""
    if slo_ttft_s is not None:
        met &= df.ttft_s <= checks.positive("slo_ttft_s", slo_ttft_s)
    if slo_tpot_s is not None:
        met &= df.tpot_s.fillna(0) <= checks.positive("slo_tpot_s", slo_tpot_s)
    return met


def distserve_goodput(rates, attainments, target: float = 0.9) -> float:
    """DistServe's goodput (Zhong et al., OSDI '24): the highest offered rate of a sweep whose SLO
    attainment is at least `target` (90 % in the paper), every lower rate meeting it too; 0 if
    none does."""
    best = 0.0
    for rate, share in sorted(zip(rates, attainments, strict=True)):
        if share < target:
            break
        best = float(rate)
    return best
