"""A server's own view of its work, from its Prometheus `/metrics` (vLLM's names): the text
parsed, gauges sampled in a thread while a benchmark runs, histogram means over a window.

    with server_metrics.MetricsSampler(srv.url) as sampler:
        loadgen.run(...)
    sampler.frame()   # one row per reading: t_s and each gauge

`server` re-exports these names (`server.parse_metrics`, `server.MetricsSampler`, ...).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time

import httpx
import pandas as pd

from helpers import checks


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {name: value summed over label sets}. Comments, histogram
    buckets and `_created` stamps are skipped: a histogram is read by its `_sum` and `_count`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and not line.startswith("#") and not m[1].endswith(("_bucket", "_created")):
            with contextlib.suppress(ValueError):
                out[m[1]] = out.get(m[1], 0.0) + float(m[3])
    return out


def info_labels(text: str, name: str) -> dict[str, str]:
    """The labels of Prometheus metric `name`'s first sample (an info gauge's settings)."""
    m = re.search(rf"^{re.escape(name)}\{{([^}}]*)\}}", text, re.MULTILINE)
    return dict(re.findall(r'(\w+)="([^"]*)"', m[1])) if m else {}


GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


class MetricsSampler:
    """Reads `/metrics` every `every_s` seconds in a thread while a benchmark runs:

    with server.MetricsSampler(srv.url) as sampler:
        loadgen.run(...)
    sampler.frame()   # one row per reading: t_s and each of `names`
    """

    def __init__(self, url: str, every_s: float = 0.5, names=GAUGES) -> None:
        self.url, self.every_s, self.names = url, checks.positive("every_s", every_s), names
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    def __enter__(self) -> MetricsSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    m = parse_metrics(client.get(f"{self.url}/metrics").text)
                    self.rows.append(
                        {
                            "t_s": time.perf_counter() - self._t0,
                            **{n: m.get(n, float("nan")) for n in self.names},
                        }
                    )
                self._stop.wait(self.every_s)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["t_s", *self.names])


# Server-side histograms (vLLM's names): their mean over a window is Δsum ÷ Δcount.
SERVER_TIMES = {
    "ttft_s": "vllm:time_to_first_token_seconds",
    "itl_s": "vllm:inter_token_latency_seconds",
    "latency_s": "vllm:e2e_request_latency_seconds",
    "queue_s": "vllm:request_queue_time_seconds",
    "prefill_s": "vllm:request_prefill_time_seconds",
}


def window(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The server's own means over the requests between two `metrics()` readings: each of
    SERVER_TIMES (`server_<name>_mean`), requests finished, preemptions, prompt tokens and
    those the prefix cache served."""
    out = {}
    for name, metric in SERVER_TIMES.items():
        n = after.get(f"{metric}_count", 0) - before.get(f"{metric}_count", 0)
        total = after.get(f"{metric}_sum", 0) - before.get(f"{metric}_sum", 0)
        out[f"server_{name}_mean"] = total / n if n > 0 else float("nan")
    for key, metric in (
        ("server_requests", "vllm:request_success_total"),
        ("server_preemptions", "vllm:num_preemptions_total"),
        ("server_prompt_tokens", "vllm:prompt_tokens_total"),
        ("server_cached_prompt_tokens", "vllm:prompt_tokens_cached_total"),
    ):
        out[key] = after.get(metric, 0) - before.get(metric, 0)
    return out
