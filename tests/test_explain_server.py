"""Notebook 06's sentences (helpers.explain_server): every branch on numbers chosen by hand."""

import pandas as pd

from helpers import explain_server, verdicts

HOLDS, FAILS = (verdicts.HOLDS, "rule"), (verdicts.FAILS, "rule")
NOISE, NOT_MEASURED = (verdicts.NOISE, "rule"), (verdicts.NOT_MEASURED, "rule")


def test_closed_loop_throughput_says_whether_the_step_grew_with_the_batch():
    one = {"itl_p50_s": 0.05}
    top = {
        "concurrency": 8.0,
        "output_tokens_per_s": 40.0,
        "measured_over_predicted": 0.25,
        "predicted_tokens_per_s": 160.0,
        "num_requests_running_mean": 4.0,
        "itl_p50_s": 0.06,  # 1.2× one stream's: within STEP_GREW
        "client_itl_mean": 0.10,
    }
    flat = explain_server.closed_loop_throughput(one, top)
    assert flat.startswith(
        "At concurrency 8 the server gave 40.0 tokens/s, 25% of the memory-bound prediction "
        "(160.0: 8 streams at one stream's gap). Two measured factors account for it"
    )
    assert flat.endswith(
        "The p50 step grew only 1.20× with the batch, so the steps themselves batched almost "
        "for free: the shortfall is the two factors above, not the step."
    )
    grew = explain_server.closed_loop_throughput(one, {**top, "itl_p50_s": 0.10})  # 2× one stream's
    assert grew.endswith("and vLLM-CPU runs its worker on one core.")
    assert "grew only" not in grew


def test_throughput_miss_multiplies_its_two_factors():
    # 4 of 8 held, mean gap twice one stream's: 50 % ÷ 2 = 25 % of the prediction
    text = explain_server.throughput_miss(8, 0.25, 4.0, 0.05, 0.06, 0.10)
    assert "50% of the 8 in flight" in text and "(2.00×" in text
    assert "= 25% of the prediction, within 25 % of the 25% measured." in text
    unexplained = explain_server.throughput_miss(8, 0.10, 4.0, 0.05, 0.06, 0.10)
    assert "a factor 0.40 these two do not explain" in unexplained


def test_client_path_tells_the_api_server_from_the_client_when_it_can():
    common = dict(client_alone_ms=1.0, sent=8, itl_path_ms=0.12, running=3.46, concurrency=8.0)
    server = explain_server.client_path(5.0, 0.2, **common)  # 5× the client's own cost
    assert server.startswith(
        "Client TTFT exceeds the server's by a median **5.0 ms** (20% of what the client saw); "
        "the client with a loop-back server takes 1.00 ms, so almost all of the rest is the API "
        "server"
    )
    assert "Inter-token gaps agree to 0.12 ms" in server
    assert "held 3.5 requests running on average at concurrency 8" in server
    visible = explain_server.client_path(2.0, 0.1, **common)  # between 1× and 3×
    assert "so the client's own cost is a visible part of it. Inter-token" in visible
    apart = explain_server.client_path(0.5, 0.05, **common)  # below the client's own cost
    assert "its loop-back figure sends 8 requests at once" in apart
    assert "cannot be told apart from the client's" in apart


def error_table(p50, p99, tpot, ttft):
    """% errors at 0.5×, 1× and 2× capacity; the given values at 2×, zeros elsewhere."""
    rows = {"latency_p50_s": p50, "latency_p99_s": p99, "tpot_p50_s": tpot, "ttft_p50_s": ttft}
    return pd.DataFrame({k: [0.0, 0.0, v] for k, v in rows.items()}, index=[0.5, 1.0, 2.0])


def test_the_simulated_load_sentence_names_what_missed():
    held = explain_server.simulated_load(HOLDS, error_table(-12.0, -40.0, 3.0, 5.0), 2.0, 4, 10)
    assert held == (
        "The simulator, fitted on section 2's 4 closed-loop points, predicted every rate's median "
        "latency within 25 % (worst -12 % at 2.0×); p99, the slowest of 10 requests, is off by "
        "up to 40 %."
    )
    step = explain_server.simulated_load(FAILS, error_table(40.0, 50.0, 30.0, -10.0), 2.0, 4, 10)
    assert step.startswith(
        "Not within 25 %: at 2.0× the median latency is off by +40 %, its TPOT by +30 % and its "
        "TTFT by -10 %. The step's price is what misses"
    )
    queue = explain_server.simulated_load(FAILS, error_table(40.0, 50.0, 5.0, 60.0), 2.0, 4, 10)
    assert "+5 % and its TTFT by +60 %. The queue is what misses" in queue


def test_overload_shows_as_slower_steps_or_as_a_queue():
    light = {"ttft_p99_s": 0.5, "tpot_p50_s": 0.05}
    heavy = {
        "rate": 2.5,
        "num_requests_running_max": 10.0,
        "num_requests_waiting_max": 0.0,
        "ttft_p99_s": 0.8,
        "tpot_p50_s": 0.09,
    }
    nobody = explain_server.overload(light, heavy, 10)
    assert nobody.startswith(
        "At 2.50 requests/s the server ran up to **10** requests at once and kept none waiting; "
        "p99 TTFT went from 0.50 s to 0.80 s and p50 TPOT from 50 to 90 ms. Nobody waited"
    )
    assert nobody.endswith(
        "10 requests per point last seconds, so a queue has little time to build."
    )
    queued = explain_server.overload(light, {**heavy, "num_requests_waiting_max": 3.0}, 10)
    assert "kept up to 3 waiting" in queued
    assert "Requests waited for a batch slot: the overload shows as queueing, in TTFT." in queued


def test_prefix_cache_as_predicted_or_in_the_servers_blocks():
    shared = {
        "server_cached_prompt_tokens": 800.0,
        "ttft_p50_s": 0.05,
        "server_prefill_s_mean": 0.04,
    }
    distinct = {
        "server_cached_prompt_tokens": 0.0,
        "ttft_p50_s": 0.1,
        "server_prefill_s_mean": 0.09,
    }
    hit = explain_server.prefix_cache(shared, distinct, 800, 160, 16.0, 5)
    assert hit == (
        "The server served **800** prompt tokens from its cache for the shared prompts "
        "(predicted 800) and 0 for the distinct ones; median TTFT 100 → 50 ms, prefill 90 → 40 "
        "ms. As predicted."
    )
    # 128-token blocks: a 160-token prefix holds one whole block, so 5 prompts share 5 × 128
    other = explain_server.prefix_cache(
        {**shared, "server_cached_prompt_tokens": 640.0}, distinct, 800, 160, 128.0, 5
    )
    assert other.endswith(
        "Not the prediction: this server's blocks are **128** tokens (its `/metrics` "
        "cache_config_info; vLLM's CPU build sets 128), so a prompt shares only 1 whole "
        "block(s) of the prefix: 5 × 128 = 640 tokens. A prefix is shared a block at a time; "
        "the rest is recomputed."
    )


def test_the_batch_cap_sentences_follow_their_verdicts():
    assert explain_server.capped_itl(HOLDS, 50.0, 30.0, 35.0) == (
        "Capped at 2, each step decodes fewer sequences: ITL p50 fell from 50 to 30 ms."
    )
    assert explain_server.capped_itl(FAILS, 50.0, 60.0, 35.0).startswith(
        "Capped at 2, ITL p50 did not fall (50 → 60 ms; the simulator said 35): each finished"
    )
    noise = verdicts.compare("ITL p50, cap 2", 50.0, None, "default", 51.0, None, claim="lower")
    assert explain_server.capped_itl(noise, 51.0, 50.0, 35.0) == (
        "Capped at 2, ITL p50 moved 51 → 50 ms: within 5 %, too close to tell apart."
    )
    assert explain_server.capped_ttft(HOLDS, 300.0, 900.0, 8, 400, 2048) == (
        "TTFT p50 rose to 900 ms: requests waited for a seat."
    )
    assert explain_server.capped_ttft(FAILS, 900.0, 300.0, 8, 400, 2048).startswith(
        "TTFT p50 did not rise (900 → 300 ms): uncapped, all 8 prompts (400 tokens, within the "
        "2048-token budget) were prefilled in one step"
    )
    assert explain_server.capped_ttft(NOISE, 300.0, 310.0, 8, 400, 2048) == (
        "TTFT p50 moved 300 → 310 ms: within 5 %, too close to tell apart."
    )


def test_the_prefill_budget_sentence_follows_its_verdict():
    assert explain_server.prefill_budget(HOLDS, 32, 400.0, 150.0, 12.0) == (
        "With a 32-token budget the streams' worst gaps shrank (ITL p99 400 → 150 ms), paid for "
        "in TTFT and in more steps."
    )
    assert explain_server.prefill_budget(FAILS, 32, 400.0, 420.0, 12.0).startswith(
        "With a 32-token budget the worst gaps did not shrink (400 → 420 ms): each 32-token "
        "chunk is a step that pays the fixed 12 ms again (section 4's fit)"
    )
    assert explain_server.prefill_budget(NOISE, 32, 400.0, 405.0, 12.0) == (
        "With a 32-token budget the worst gaps moved 400 → 405 ms: within 5 %, too close to "
        "tell apart."
    )


def test_the_fp8_start_and_its_verdict():
    refused = {"refused": "needs AVX-512", "kv_tokens": float("nan"), "itl_p50_s": float("nan")}
    assert explain_server.fp8_measured(refused, 93_184, "this run", None) == (
        "--kv-cache-dtype fp8 (this run): the server refused: needs AVX-512"
    )
    started = {"refused": "", "kv_tokens": 93_184.0, "itl_p50_s": 0.05}
    assert explain_server.fp8_measured(started, 93_184, "stored: a Xeon", None) == (
        "--kv-cache-dtype fp8 (stored: a Xeon): 93,184 tokens (predicted 93,184), ITL p50 50 ms "
        "at concurrency 4"
    )
    assert explain_server.fp8_measured(started, 93_184, "this run", 60.0).endswith(
        "at concurrency 4 (fp32 in the same run: 60 ms)"
    )
    assert explain_server.fp8_formula(HOLDS, "this run", "") == (
        "The fp8 cache (this run) held the tokens notebook 02's formula predicts."
    )
    assert "not the formula's" in explain_server.fp8_formula(FAILS, "this run", "")
    none = verdicts.close_to("fp8 KV tokens", None, 93_184.0, rel_tol=0.01)  # refused: no value
    assert explain_server.fp8_formula(none, "this run", "needs AVX-512") == (
        "The CPU build refused the fp8 KV cache here: needs AVX-512"
    )


def test_engine_versus_vllm_never_calls_a_faster_engine_slower():
    faster = explain_server.engine_versus_vllm(0.6, 0.6, None, 2)
    assert "0.60× vLLM's (1.7× faster)" in faster and "Not the prediction" in faster
    assert "slower" not in faster
    slower = explain_server.engine_versus_vllm(1.8, 1.2, 0.5, 2)
    assert (
        "1.8× vLLM's" in slower
        and "compiled graph" in slower
        and "waited a median 0.50 s" in slower
    )
    assert "within 10 %" in explain_server.engine_versus_vllm(1.05, 0.95, None, 1)
