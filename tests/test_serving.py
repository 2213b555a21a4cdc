"""The serving engine on known answers: tokens equal to decoding alone, block accounting, the paged
cache against the contiguous one, a schedule worked out by hand, Little's law, bad input."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import serving
from helpers.decode import KVCache, forward, greedy_decode


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are small: one thread is as fast, and immune to a busy machine's other
    processes (two threads that wait on each other slow down tenfold when a core is taken)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_requests(spec, vocab=97, seed=0):
    """spec: (prompt length, new tokens, arrival s) per request."""
    gen = torch.Generator().manual_seed(seed)
    return [serving.Request(torch.randint(0, vocab, (p,), generator=gen), n, a) for p, n, a in spec]


MIXED = [(5, 6, 0.0), (12, 3, 0.0), (3, 8, 0.01), (20, 5, 0.02), (7, 1, 0.03), (9, 7, 0.03)]


def alone(model, request):
    return greedy_decode(model, request.prompt_ids.unsqueeze(0), request.max_new_tokens).tokens[0]


def unit_steps(step):
    return 1.0


def linear_steps(step):
    return 0.01 + 0.001 * step.tokens + 0.002 * step.seqs


@pytest.mark.parametrize("policy", ["continuous", "static"])
@pytest.mark.parametrize("prefill_chunk", [None, 4])
@pytest.mark.parametrize("kv_blocks", [64, 8])  # 8 blocks of 4: requests preempt each other
def test_every_request_gets_the_tokens_it_gets_alone(tiny_llama, policy, prefill_chunk, kv_blocks):
    requests = make_requests(MIXED)
    df = serving.run(
        tiny_llama, requests, policy=policy, max_batch=3, block_size=4, kv_blocks=kv_blocks,
        prefill_chunk=prefill_chunk, clock=linear_steps,
    )  # fmt: skip
    for row, request in zip(df.itertuples(), requests, strict=True):
        assert row.tokens == alone(tiny_llama, request).tolist(), f"request {row.request}"
    assert (df.error == "").all()


def test_preemption_happens_and_changes_nothing(tiny_llama):
    requests = make_requests(MIXED)
    df = serving.run(tiny_llama, requests, max_batch=4, block_size=2, kv_blocks=12,
                     clock=linear_steps)  # fmt: skip
    assert df.preemptions.sum() > 0, "this budget is meant to force a preemption"
    for row, request in zip(df.itertuples(), requests, strict=True):
        assert row.tokens == alone(tiny_llama, request).tolist()


def test_wall_clock_run_matches_too(tiny_llama):
    requests = make_requests(MIXED[:3])
    df = serving.run(tiny_llama, requests, max_batch=2, block_size=4, kv_blocks=32)
    for row, request in zip(df.itertuples(), requests, strict=True):
        assert row.tokens == alone(tiny_llama, request).tolist()
    assert (df.first_token_s >= df.arrival_s).all() and (df.finish_s >= df.first_token_s).all()


def test_smollm2_requests_equal_their_solo_greedy_decode(smollm2):
    model = smollm2.model
    requests = make_requests([(6, 4, 0.0), (11, 3, 0.0), (3, 5, 0.0)], vocab=49152, seed=1)
    df = serving.run(model, requests, max_batch=3, block_size=4, kv_blocks=16, prefill_chunk=5,
                     clock=unit_steps)  # fmt: skip
    assert df.tokens.tolist() == [alone(model, r).tolist() for r in requests]


def test_blocks_are_all_returned(tiny_llama):
    df = serving.run(tiny_llama, make_requests(MIXED), max_batch=3, block_size=4, kv_blocks=10,
                     clock=linear_steps)  # fmt: skip
    blocks = df.attrs["blocks"]
    assert blocks["allocated"] == blocks["freed"] > 0
    assert blocks["peak_in_use"] <= blocks["total"] == 10
    assert df.attrs["steps"].blocks_in_use.max() <= 10


def test_a_request_larger_than_the_cache_is_rejected_and_the_others_finish(tiny_llama):
    spec = [(5, 4, 0.0), (40, 10, 0.0), (6, 3, 0.1)]  # the second needs 49 slots = 13 blocks
    requests = make_requests(spec)
    with pytest.warns(UserWarning, match="1 request"):
        df = serving.run(tiny_llama, requests, block_size=4, kv_blocks=12, clock=unit_steps)
    err = df.error[1]
    assert "13 KV blocks" in err and "kv_blocks=12" in err and "48 positions" in err
    assert math.isnan(df.finish_s[1]) and df.tokens[1] == []
    for i in (0, 2):
        assert df.error[i] == "" and df.tokens[i] == alone(tiny_llama, requests[i]).tolist()
    assert serving.summary(df)["rejected"] == 1


def test_paged_gather_equals_the_contiguous_cache(tiny_llama):
    """The same prompt run through decode.forward (contiguous cache) and through the engine's
    forward pass (paged cache, blocks scattered): keys and values gathered by block table match."""
    prompt = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(3))
    contiguous = KVCache(tiny_llama.config, 1, 11, torch.float32, "cpu")
    with torch.inference_mode():
        forward(tiny_llama, prompt.unsqueeze(0), contiguous, 0)
    paged = serving.PagedKVCache(tiny_llama.config, kv_blocks=8, block_size=4,
                                 dtype=torch.float32, device="cpu")  # fmt: skip
    table = [6, 1, 4]
    serving.paged.forward(tiny_llama, paged, [serving.Feed(prompt.tolist(), 0, table, last=True)])
    slots = paged.slots(table, range(11))
    assert slots.tolist()[:5] == [24, 25, 26, 27, 4]  # block 6 holds positions 0-3, block 1 4-7
    for layer in range(tiny_llama.config.num_hidden_layers):
        keys, values = paged.read(layer, slots)  # (positions, kv_heads, head_dim)
        torch.testing.assert_close(keys.transpose(0, 1), contiguous.keys[layer][0])
        torch.testing.assert_close(values.transpose(0, 1), contiguous.values[layer][0])


HAND = [(4, 3, 0.0), (2, 2, 0.0), (3, 2, 1.5)]  # A, B, C: prompt, new tokens, arrival


def test_continuous_schedule_worked_by_hand():
    """Every step costs 1 s, max_batch 2. Step 1 [0,1): prefill A and B → first tokens at 1.
    Step 2 [1,2): decode A, B → B is done at 2. C arrived at 1.5, so step 3 [2,3) carries A's last
    decode and C's prefill → A done at 3, C's first token at 3. Step 4 [3,4): C done at 4."""
    df = serving.run(None, make_requests(HAND), max_batch=2, block_size=2, kv_blocks=16,
                     clock=unit_steps)  # fmt: skip
    assert df.first_token_s.tolist() == [1, 1, 3]
    assert df.finish_s.tolist() == [3, 2, 4]
    assert df.ttft_s.tolist() == [1, 1, 1.5]
    steps = df.attrs["steps"]
    assert steps.seqs.tolist() == [2, 2, 2, 1]
    assert steps.tokens.tolist() == [6, 2, 1 + 3, 1]
    # Blocks of 2 positions: step 1 A 4 → 2 blocks, B 2 → 1; step 2 A 5 → 3, B 3 → 2;
    # step 3 A 6 → 3, B returned its 2, C 3 → 2; step 4 A returned its 3, C 4 → 2.
    assert steps.blocks_in_use.tolist() == [3, 5, 5, 2]
    assert steps.start_s.tolist() == [0, 1, 2, 3]


def test_static_schedule_worked_by_hand():
    """Static: C arrives at 1.5 but waits for the batch (A, B) to end at 3; its prefill runs in
    step 4 [3,4) and its last token in step 5 [4,5)."""
    df = serving.run(None, make_requests(HAND), policy="static", max_batch=2, block_size=2,
                     kv_blocks=16, clock=unit_steps)  # fmt: skip
    assert df.first_token_s.tolist() == [1, 1, 4]
    assert df.finish_s.tolist() == [3, 2, 5]
    assert df.attrs["steps"].seqs.tolist() == [2, 2, 1, 1, 1]


def test_chunked_prefill_splits_a_prompt_across_steps():
    df = serving.run(None, make_requests([(10, 2, 0.0)]), prefill_chunk=4, block_size=4,
                     kv_blocks=16, clock=unit_steps)  # fmt: skip
    steps = df.attrs["steps"]
    assert steps.prefill_tokens.tolist() == [4, 4, 2, 0]
    assert df.first_token_s[0] == 3 and df.finish_s[0] == 4


def test_littles_law_holds_on_the_virtual_clock():
    requests = serving.poisson_trace(rate=6.0, n=400, seed=0, scale=1 / 16)
    df = serving.run(None, requests, max_batch=8, block_size=16, kv_blocks=512,
                     clock=serving.StepModel(0.02, 0.002, 0.0005, 0.0))  # fmt: skip
    law = serving.littles_law(df)
    assert law["L"] > 2, "the load should keep several requests in the system"
    # The log samples the count at step starts: a request arriving mid-step is missed until the
    # next one, so L runs a few percent low.
    assert law["L"] == pytest.approx(law["lambda_W"], rel=0.08)


def test_continuous_batching_beats_static_under_load():
    requests = serving.poisson_trace(rate=4.0, n=200, seed=1, scale=1 / 16)
    clock = serving.StepModel(0.02, 0.002, 0.0005, 0.0)
    p50 = {
        policy: serving.summary(serving.run(None, requests, policy=policy, max_batch=8,
                                            kv_blocks=512, clock=clock))["latency_p50_s"]
        for policy in ("static", "continuous")
    }  # fmt: skip
    assert p50["continuous"] < p50["static"]


def test_kv_usage_paged_wastes_less_than_contiguous():
    requests = serving.poisson_trace(rate=2.0, n=100, seed=2, scale=1 / 16)
    df = serving.run(None, requests, block_size=16, kv_blocks=1024, clock=linear_steps)
    usage = serving.kv_usage(df, max_len=2048)
    assert 0 <= usage["paged"]["waste"] < usage["contiguous, prompt + max_new"]["waste"]
    assert usage["contiguous, max length 2048"]["waste"] > 0.9


def test_poisson_trace_is_seeded_and_follows_the_published_lengths():
    a = serving.poisson_trace(rate=5.0, n=2000, seed=7)
    b = serving.poisson_trace(rate=5.0, n=2000, seed=7)
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]
    assert all(torch.equal(x.prompt_ids, y.prompt_ids) for x, y in zip(a, b, strict=True))
    gaps = np.diff([0.0] + [r.arrival_s for r in a])
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.1)
    q = serving.published_lengths()
    median_prompt = float(q[q.percentile == 50].prompt_tokens.iloc[0])
    measured = np.median([r.prompt_ids.numel() for r in a])
    assert measured == pytest.approx(median_prompt, rel=0.1)


def test_fit_step_time_recovers_a_known_model():
    truth = serving.StepModel(0.05, 0.004, 0.002, 1e-5)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        s = serving.Step(int(rng.integers(1, 16)), int(rng.integers(1, 300)),
                         int(rng.integers(10, 3000)))  # fmt: skip
        rows.append({"seqs": s.seqs, "tokens": s.tokens, "context": s.context, "step_s": truth(s)})
    log = pd.DataFrame(rows)
    fit = serving.fit_step_time(log)
    for name in ("fixed", "per_seq", "per_token", "per_context"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    log.loc[[3, 17], "step_s"] *= 20  # two steps slowed by another program: left out of the fit
    noisy = rng.normal(1, 0.02, len(log))
    log["step_s"] *= noisy
    fit = serving.fit_step_time(log)
    assert fit.fixed == pytest.approx(truth.fixed, rel=0.2)
    assert fit.per_token == pytest.approx(truth.per_token, rel=0.1)


def test_planner_clock_grows_with_the_work():
    clock = serving.planner_step_time("llama-3-8b", "h100-sxm", "bf16")
    one = clock(serving.Step(seqs=1, tokens=1, context=512))
    many = clock(serving.Step(seqs=64, tokens=64, context=64 * 512))
    prefill = clock(serving.Step(seqs=1, tokens=2048, context=2048))
    assert 0 < one < many and one < prefill


@pytest.mark.parametrize(
    "spec, kwargs, error, match",
    [
        ([(0, 3, 0.0)], {}, ValueError, "empty prompt"),
        ([(4, 0, 0.0)], {}, ValueError, "max_new_tokens must be at least 1"),
        ([(4, 2, 1.0), (4, 2, 0.5)], {}, ValueError, "sort the requests by arrival_s"),
        ([(4, 2, -1.0)], {}, ValueError, "arrival_s"),
        ([(2040, 20, 0.0)], {}, ValueError, "model's context is 2048"),
        ([(4, 2, 0.0)], {"policy": "fifo"}, ValueError, "Unknown policy"),
        ([(4, 2, 0.0)], {"max_batch": 0}, ValueError, "max_batch must be at least 1"),
        ([(4, 2, 0.0)], {"prefill_chunk": 0}, ValueError, "prefill_chunk must be at least 1"),
        ([(4, 2, 0.0)], {"clock": 3.0}, TypeError, "clock must be"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(tiny_llama, spec, kwargs, error, match):
    with pytest.raises(error, match=match):
        serving.run(tiny_llama, make_requests(spec), **kwargs)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="requests is empty"):
        serving.run(None, [], clock=unit_steps)
    with pytest.raises(TypeError, match="serving.Request"):
        serving.run(None, [(torch.tensor([1, 2]), 3, 0.0)], clock=unit_steps)
    with pytest.raises(TypeError, match="1-D tensor"):
        serving.run(None, [serving.Request(torch.tensor([[1, 2]]), 3)], clock=unit_steps)
    with pytest.raises(ValueError, match="model=None simulates"):
        serving.run(None, make_requests([(4, 2, 0.0)]))
