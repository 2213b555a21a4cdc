"""The benchmark client against a loop-back fake server whose delays are planted."""

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import loadgen

TTFT, ITL = 0.25, 0.04  # planted: first token 250 ms after the request, then one every 40 ms


def jobs(n=4, tokens=6, gap=0.05):
    return [loadgen.Job((1, 2, 3), tokens, gap * i) for i in range(n)]


def test_planted_delays_are_recovered():
    with loadgen.FakeServer(ttft_s=TTFT, itl_s=ITL) as fake:
        df = loadgen.run(jobs(), fake.url, progress=False)
    assert (df.error == "").all()
    # Measured times can only be longer than planted ones (the client adds, never removes);
    # the margin is generous for a busy machine, and a wrong definition misses by a whole ITL.
    assert (df.ttft_s >= TTFT).all() and (df.ttft_s < TTFT + ITL).all()
    gaps = np.concatenate(df.itl_s.to_list())
    assert np.median(gaps) == pytest.approx(ITL, abs=ITL / 2)
    assert df.tpot_s.median() == pytest.approx(ITL, abs=ITL / 2)
    # TPOT excludes the first token: latency = TTFT + (tokens - 1) * TPOT exactly.
    assert np.allclose(df.latency_s, df.ttft_s + (df.tokens - 1) * df.tpot_s)
    assert (df.itl_s.map(len) == df.tokens - 1).all()
    assert (df.tokens == df.completion_tokens).all() and (df.tokens == 6).all()


def test_open_loop_sends_at_the_arrival_times_and_closed_loop_keeps_n_in_flight():
    with loadgen.FakeServer(ttft_s=0.1, itl_s=0.02) as fake:
        open_ = loadgen.run(jobs(n=4, gap=0.2), fake.url, progress=False, warmup=0)
        closed = loadgen.run(jobs(n=6), fake.url, progress=False, concurrency=2)
    assert np.all(open_.sent_s.to_numpy() >= open_.arrival_s.to_numpy())
    assert np.all(np.diff(open_.sent_s) > 0.1)  # arrivals 0.2 s apart stay apart
    # Closed loop, 2 in flight: requests start in pairs, each pair after the previous one ends.
    starts = np.sort(closed.sent_s.to_numpy())
    ends = np.sort(closed.finish_s.to_numpy())
    assert starts[2] >= ends[0] - 1e-3 and starts[4] >= ends[2] - 1e-3


def test_chat_endpoint_streams_text_prompts():
    with loadgen.FakeServer(itl_s=0.01) as fake:
        df = loadgen.run([loadgen.Job("hello", 4)], fake.url, endpoint="chat", progress=False)
        assert df.text[0] == "xxxx" and df.tokens[0] == 4
        with pytest.raises(loadgen.ClientError, match="text prompts"):
            loadgen.run([loadgen.Job((1, 2), 4)], fake.url, endpoint="chat", progress=False)


def test_summary_percentiles_throughput_and_goodput():
    with loadgen.FakeServer(ttft_s=0.05, itl_s=0.01) as fake:
        df = loadgen.run(jobs(n=5), fake.url, progress=False)
    s = loadgen.summary(df, slo_ttft_s=10, slo_tpot_s=10)
    assert s["completed"] == 5 and s["failed"] == 0 and s["slo_attainment"] == 1
    assert s["ttft_p50_s"] == pytest.approx(df.ttft_s.median())
    assert s["output_tokens_per_s"] == pytest.approx(30 / s["duration_s"])
    assert s["goodput_rps"] == pytest.approx(s["requests_per_s"])
    assert loadgen.summary(df, slo_ttft_s=1e-6)["slo_attainment"] == 0  # nobody meets 1 µs


def test_distserve_goodput_is_the_highest_rate_meeting_the_target():
    assert loadgen.distserve_goodput([1, 2, 4, 8], [1.0, 0.95, 0.7, 0.95]) == 2
    assert loadgen.distserve_goodput([1, 2], [0.5, 0.4]) == 0


def test_unreachable_url_is_one_line_within_5_s():
    t0 = time.monotonic()
    with pytest.raises(loadgen.ClientError, match="no OpenAI-compatible server") as err:
        loadgen.run(jobs(), "http://127.0.0.1:9", progress=False)
    assert time.monotonic() - t0 < 5 and "\n" not in str(err.value)


def test_a_server_that_dies_mid_run_leaves_errors_counted_in_the_summary():
    with loadgen.FakeServer(itl_s=0.01, die_after_tokens=10) as fake:
        df = loadgen.run(jobs(n=6), fake.url, progress=False, warmup=0, concurrency=3)
    assert (df.error != "").all()  # 3 cut mid-stream, 3 refused: none completed
    assert loadgen.summary(df) == {"requests": 6, "completed": 0, "failed": 6}


def test_bad_inputs_are_one_line_each():
    with loadgen.FakeServer(streaming=False) as fake:
        with pytest.raises(loadgen.ClientError, match="not streamed"):
            loadgen.run(jobs(), fake.url, progress=False)
        with pytest.raises(loadgen.ClientError, match="does not serve model 'wrong'"):
            loadgen.run(jobs(), fake.url, "wrong", progress=False)
    with pytest.raises(ValueError, match="rate"):
        loadgen.at_rate(jobs(), 0)
    with pytest.raises(TypeError, match="list of loadgen.Job"):
        loadgen.run([], "http://127.0.0.1:9")
    with pytest.raises(loadgen.ClientError, match="http"):
        loadgen.run(jobs(), "127.0.0.1:8000")


def test_time_limit_bounds_the_run():
    with loadgen.FakeServer(itl_s=0.2) as fake:
        t0 = time.monotonic()
        df = loadgen.run(jobs(n=3, tokens=50), fake.url, progress=False, warmup=0, time_limit_s=0.5)
    assert time.monotonic() - t0 < 5
    assert df.error.str.contains("time limit").all()


def test_jobs_from_the_course_trace_keep_prompts_lengths_and_arrivals():
    from helpers import serving  # the engine layer: imported here so the client tests stand alone

    trace = serving.poisson_trace(2.0, 5, seed=0, scale=1 / 16)
    js = loadgen.jobs_from(trace)
    assert [len(j.prompt) for j in js] == [r.prompt_ids.numel() for r in trace]
    assert [j.arrival_s for j in js] == [r.arrival_s for r in trace]
    assert js[0].prompt == tuple(trace[0].prompt_ids.tolist())
    # each job asks for its answer's sampled length, never the cap every request carries
    assert [j.max_tokens for j in js] == [r.output_tokens for r in trace]
    assert len({r.max_new_tokens for r in trace}) == 1
    assert len({j.max_tokens for j in js}) > 1
    again = loadgen.at_rate(js, 4.0, seed=1)
    assert [j.prompt for j in again] == [j.prompt for j in js]
    assert np.mean(np.diff([0] + [j.arrival_s for j in again])) == pytest.approx(0.25, rel=1)
    assert all(j.arrival_s == 0 for j in loadgen.at_rate(js, math.inf))
    assert isinstance(torch.tensor(js[0].prompt), torch.Tensor)


def test_client_overhead_against_loopback_is_small():
    # With nothing planted, what the client measures is its own cost plus the loop-back's.
    with loadgen.FakeServer() as fake:
        df = loadgen.run(jobs(n=8, tokens=20, gap=0), fake.url, progress=False, concurrency=8)
    assert isinstance(df, pd.DataFrame) and (df.error == "").all()
    assert np.median(np.concatenate(df.itl_s.to_list())) < ITL  # far below a real server's gap
