"""The serving engine on known answers: tokens equal to decoding alone, block accounting, the paged
cache against the contiguous one, a schedule worked out by hand, Little's law, bad input."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import planner, serving, shapes
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


PLANTED = serving.StepModel(0.02, 0.001, (0.004, 0.001, 0.0005, 0.0002), 2e-6, (0, 8, 32, 128))


def planted_log(truth, n=80, seed=0):
    """Decode steps of batch 1-32 and prefill chunks of up to 256 tokens, priced by `truth`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        seqs = int(rng.integers(1, 33))
        tokens = seqs if i % 2 else seqs - 1 + int(rng.integers(2, 257))  # decode / + a chunk
        s = serving.Step(seqs, tokens, int(rng.integers(10 * seqs, 200 * seqs)))
        rows.append({"seqs": s.seqs, "tokens": s.tokens, "context": s.context, "step_s": truth(s)})
    return pd.DataFrame(rows)


def test_fit_step_time_recovers_a_batch_dependent_rate():
    """The planted per-token cost falls from 4 ms (tokens 1-8) to 0.2 ms (past 128): the fit
    finds every segment's rate, and a single-rate model (knots (0,)) cannot."""
    log = planted_log(PLANTED)
    fit = serving.fit_step_time(log)
    assert fit.knots == PLANTED.knots
    for name in ("fixed", "per_seq", "per_context"):
        assert getattr(fit, name) == pytest.approx(getattr(PLANTED, name), rel=1e-6, abs=1e-12)
    assert fit.per_token == pytest.approx(PLANTED.per_token, rel=1e-6)
    linear = serving.fit_step_time(log, knots=(0,))
    misses = [linear(s) / PLANTED(s) - 1 for s in (serving.Step(b, b, 100 * b) for b in (1, 32))]
    assert max(map(abs, misses)) > 0.1  # one rate misprices decode at one end or the other
    decode8 = serving.Step(8, 8, 800)
    log.loc[[3, 17], "step_s"] *= 20  # two steps slowed by another program: left out
    log["step_s"] *= np.random.default_rng(1).normal(1, 0.02, len(log))
    fit = serving.fit_step_time(log)
    assert fit(decode8) == pytest.approx(PLANTED(decode8), rel=0.05)
    assert fit.per_token[0] == pytest.approx(PLANTED.per_token[0], rel=0.2)


def test_a_linear_truth_is_recovered_by_the_segmented_fit():
    truth = serving.StepModel(0.05, 0.004, 0.002, 1e-5)  # one rate: every segment gets it
    fit = serving.fit_step_time(planted_log(truth))
    assert fit.per_token == pytest.approx((0.002,) * 4, rel=1e-6)
    assert fit.fixed == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("batch, chunk", [(2, None), (8, None), (8, 64), (32, None)])
def test_capacity_matches_the_simulators_saturation_throughput(batch, chunk):
    requests = serving.poisson_trace(rate=1e4, n=1500, seed=3, scale=1 / 16, max_prompt=192,
                                     max_output=24)  # fmt: skip
    df = serving.run(None, requests, max_batch=batch, kv_blocks=10**5, prefill_chunk=chunk,
                     clock=PLANTED)  # fmt: skip
    served = serving.summary(df)["requests_per_s"]
    predicted = serving.capacity(PLANTED, [r.prompt_ids.numel() for r in requests],
                                 [r.length for r in requests], batch, chunk)  # fmt: skip
    assert predicted == pytest.approx(served, rel=0.08)


def test_request_metrics_on_a_hand_worked_request():
    """Arrives at 0.2 s; tokens at 1.0, 1.5, 3.5 s. TTFT 0.8; TPOT excludes the first token:
    (3.5 − 1.0) / 2 = 1.25; gaps 0.5 and 2.0, so the worst is 2.0; E2E 3.3."""
    m = serving.request_metrics([1.0, 1.5, 3.5], 0.2)
    assert m == pytest.approx({"ttft_s": 0.8, "tpot_s": 1.25, "max_itl_s": 2.0, "latency_s": 3.3})
    one = serving.request_metrics([1.0], 0.0)
    assert one["ttft_s"] == 1.0 and math.isnan(one["tpot_s"]) and math.isnan(one["max_itl_s"])


def test_itl_and_worst_gap_on_a_stalled_stream():
    """A (prompt 2, 4 tokens) decodes; B's 8-token prompt arrives at 1.5. Steps cost 1 s plus
    0.5 s per prompt token beyond 2. Unchunked, B's prefill step costs 1 + 0.5·6 = 4 s, and A's
    gap across it is 4 s; in chunks of 2 every step costs 1 s and A's gaps stay 1 s."""

    def clock(step):
        return 1.0 + 0.5 * max(0, step.prefill_tokens - 2)

    worst = {}
    for chunk in (None, 2):
        df = serving.run(None, make_requests([(2, 4, 0.0), (8, 2, 1.5)]), max_batch=2,
                         block_size=2, kv_blocks=16, prefill_chunk=chunk, clock=clock)  # fmt: skip
        worst[chunk] = df.max_itl_s[0]
        gaps = serving.inter_token_latencies(df)
        assert len(gaps) == (4 - 1) + (2 - 1)
        assert df.tpot_s[0] == pytest.approx((df.finish_s[0] - df.first_token_s[0]) / 3)
    assert worst == {None: 4.0, 2: 1.0}


def test_requests_stop_at_their_sampled_length_with_the_tokens_of_decoding_alone(tiny_llama):
    spec = [(5, 6, 0.0), (12, 3, 0.0), (3, 8, 0.01), (9, 7, 0.03)]
    stop = [2, 3, 5, 1]  # true answer lengths under the caps
    requests = [serving.Request(r.prompt_ids, r.max_new_tokens, r.arrival_s, n)
                for r, n in zip(make_requests(spec), stop, strict=True)]  # fmt: skip
    df = serving.run(tiny_llama, requests, max_batch=3, block_size=4, kv_blocks=16,
                     prefill_chunk=4, clock=linear_steps)  # fmt: skip
    assert df.output_tokens.tolist() == stop
    for row, r in zip(df.itertuples(), requests, strict=True):
        solo = greedy_decode(tiny_llama, r.prompt_ids.unsqueeze(0), r.output_tokens).tokens[0]
        assert row.tokens == solo.tolist()
    steps = df.attrs["steps"]  # the reservation baseline still counts the caps it was sent
    assert (steps.reserved_tokens > steps.kv_tokens).any()


def test_poisson_trace_caps_lengths_without_revealing_them():
    requests = serving.poisson_trace(rate=5.0, n=500, seed=1, scale=1 / 16, max_output=24)
    assert {r.max_new_tokens for r in requests} == {24}
    lengths = [r.length for r in requests]
    assert max(lengths) == 24 and min(lengths) >= 1 and np.median(lengths) < 24


def test_queue_time_counts_until_a_request_first_runs():
    """Blocks of 1 slot, 4 in all. A (prompt 2, 3 new) starts at 0 and grows to 4 blocks by
    step 3; B (prompt 2) arrives at 0.5. At t = 1 two blocks are free, but A grows first and
    takes one, so B cannot start: it waits until A leaves at 3 (queue 2.5 s). Admitting B
    before planning A would have stamped it admitted at 1 and preempted it in that step."""
    df = serving.run(None, make_requests([(2, 3, 0.0), (2, 2, 0.5)]), max_batch=2,
                     block_size=1, kv_blocks=4, clock=unit_steps)  # fmt: skip
    assert df.admitted_s.tolist() == [0.0, 3.0]
    assert df.queue_s[1] == 2.5 and df.preemptions.sum() == 0
    assert df.attrs["steps"].preempted.sum() == 0


def test_the_step_never_admits_in_a_step_that_preempted():
    requests = make_requests(MIXED)
    df = serving.run(None, requests, max_batch=4, block_size=2, kv_blocks=12, clock=linear_steps)
    steps = df.attrs["steps"]
    assert steps.preempted.sum() > 0 and df.preemptions.sum() > 0
    first_run = {}  # request → the start of the first step it was admitted in
    for r in df.itertuples():
        assert r.admitted_s in set(steps.start_s), "admitted at a time no step started"
        first_run[r.request] = r.admitted_s
    admitted_at = pd.Series(first_run).value_counts()
    preempting = set(steps.start_s[steps.preempted > 0])
    assert not preempting & set(admitted_at.index)


def test_roofline_clock_lets_a_chunk_ride_on_a_memory_bound_decode():
    """Llama-3-8B on an H100: a batch-64 decode reads 16 GB of weights (memory-bound), so a
    256-token chunk adds only its KV bytes; a 4,096-token chunk turns the step compute-bound at
    2 FLOPs per weight per token ÷ the peak."""
    clock = serving.roofline_step_time("llama-3-8b", "h100-sxm", "bf16")
    spec = planner.gpu("h100-sxm")
    shape = shapes.Shape.of("llama-3-8b")
    decode = clock(serving.Step(64, 64, 64 * 512))
    ride = clock(serving.Step(65, 64 + 256, 64 * 512 + 256))
    kv_256 = shapes.kv_cache_bytes(shape, 1, 256, 2) / (
        spec.bandwidth * spec.engine.memory_efficiency
    )
    assert ride - decode == pytest.approx(kv_256, rel=1e-6)
    big = clock(serving.Step(65, 64 + 4096, 64 * 512 + 4096))
    flops = 2 * shape.linear_params * (64 + 4096)
    assert big > decode + 0.5 * flops / spec.flops
    summed = serving.planner_step_time("llama-3-8b", "h100-sxm", "bf16")
    assert summed(serving.Step(65, 64 + 256, 64 * 512 + 256)) > ride  # no overlap: the sum


def test_goodput_in_both_definitions():
    df = serving.run(None, make_requests(HAND), max_batch=2, block_size=2, kv_blocks=16,
                     clock=unit_steps)  # fmt: skip
    # TTFTs 1, 1, 1.5; TPOTs 1, 1, 1: a 1.2 s TTFT target is met by A and B, over 4 s of run.
    assert serving.goodput(df, ttft_s=1.2, tpot_s=1.0) == pytest.approx(2 / 4)
    assert serving.met_targets(df, 2.0, 1.0).all()
    rates, attainment = [1, 2, 4, 8], [1.0, 0.95, 0.85, 0.97]
    assert serving.max_rate_meeting(rates, attainment, target=0.9) == 2  # stops at the first miss
    assert serving.max_rate_meeting(rates, [0.5] * 4, target=0.9) == 0


class Float64Cache(serving.PagedKVCache):
    """A cache with its own storage (as a quantized one would have): float64, one tensor."""

    def allocate(self, slots, dtype, device):
        self.writes = 0
        return torch.zeros(2, slots, self.kv_heads, self.head_dim, dtype=torch.float64)

    def write(self, layer, slots, k, v):
        self.writes += 1
        self.storage[layer][0].index_copy_(0, slots, k.double())
        self.storage[layer][1].index_copy_(0, slots, v.double())

    def read(self, layer, slots):
        kv = self.storage[layer][:, slots]
        return kv[0].float(), kv[1].float()


def test_a_cache_subclass_replaces_only_the_storage(tiny_llama):
    request = make_requests([(9, 1, 0.0)])[0]
    cache = Float64Cache(tiny_llama.config, kv_blocks=8, block_size=4, dtype=torch.float32,
                         device="cpu")  # fmt: skip
    table, ids = [3, 0, 5], request.prompt_ids.tolist()
    token = serving.paged.forward(tiny_llama, cache, [serving.Feed(ids, 0, table, last=True)])
    assert token == alone(tiny_llama, request).tolist()
    assert cache.writes == tiny_llama.config.num_hidden_layers


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


# --- An 8-bit paged cache (issue 21): bytes by formula, more blocks per budget, same tokens ----


def test_an_int8_block_takes_the_bytes_its_formula_predicts(tiny_llama):
    """2 layers × 2 KV heads × head_dim 16, blocks of 4 slots. fp32: 2 (k, v) × 2 × 2 × 16 × 4 B
    = 512 B per slot; int8: 2 × 2 × 2 × 16 × 1 B + 2 × 2 × 2 scales × 4 B = 160 B per slot."""
    fp32 = serving.block_bytes(tiny_llama.config, 4, element_size=4)
    int8 = serving.block_bytes(tiny_llama.config, 4, element_size=4, kv_dtype="int8")
    assert (fp32, int8) == (4 * 512, 4 * 160)
    assert int8 <= fp32 / 2  # halved or better, scales included
    cache = serving.QuantizedPagedKVCache(tiny_llama.config, 8, 4, torch.float32, "cpu")
    stored = sum(t.numel() * t.element_size() for layer in cache.storage for t in layer.values())
    assert stored == 8 * int8  # what it allocates is what the formula says
    assert cache.storage[0]["k"].dtype == torch.int8


def test_the_same_budget_holds_more_blocks_and_runs_more_requests_at_once(tiny_llama):
    budget = 4 * serving.block_bytes(tiny_llama.config, 4, element_size=4)  # 4 fp32 blocks
    fp32 = serving.blocks_in(budget, tiny_llama.config, 4, element_size=4)
    int8 = serving.blocks_in(budget, tiny_llama.config, 4, element_size=4, kv_dtype="int8")
    assert (fp32, int8) == (4, 12)  # 8192 B ÷ 640 B = 12.8 blocks
    requests = make_requests([(4, 1, 0.0)] * 12)  # one block each, all at once
    peaks = {}
    for kv_dtype, blocks in ((None, fp32), ("int8", int8)):
        df = serving.run(tiny_llama, requests, max_batch=64, block_size=4, kv_blocks=blocks,
                         clock=unit_steps, kv_dtype=kv_dtype)  # fmt: skip
        peaks[kv_dtype] = df.attrs["steps"].running.max()
    assert peaks == {None: 4, "int8": 12}


@pytest.fixture(scope="module")
def representable(tiny_llama):
    from tests.test_kvquant import exactly_representable

    return exactly_representable(tiny_llama)


@pytest.mark.parametrize("policy", ["continuous", "static"])
@pytest.mark.parametrize("prefill_chunk", [None, 4])
@pytest.mark.parametrize("kv_blocks", [64, 8])  # 8 blocks of 4: requests preempt each other
def test_int8_paged_serving_equals_decoding_alone_where_values_are_representable(
    representable, policy, prefill_chunk, kv_blocks
):
    requests = make_requests(MIXED)
    df = serving.run(
        representable, requests, policy=policy, max_batch=3, block_size=4, kv_blocks=kv_blocks,
        prefill_chunk=prefill_chunk, clock=linear_steps, kv_dtype="int8",
    )  # fmt: skip
    for row, request in zip(df.itertuples(), requests, strict=True):
        assert row.tokens == alone(representable, request).tolist(), f"request {row.request}"
    assert df.attrs["blocks"]["kv_dtype"] == "int8"


def test_an_int8_cache_changes_tokens_where_values_are_not_representable(tiny_llama):
    """The random model's values are not multiples of their scale: the int8 cache reads them back
    changed (within its step), so the equality above is a property of the planted model."""
    ids = make_requests([(9, 1, 0.0)])[0].prompt_ids.tolist()
    feeds = [serving.Feed(ids, 0, [3, 0, 5], last=True)]
    values = {}
    for kv_dtype in (None, "int8"):
        cache = serving.paged.make_cache(tiny_llama.config, 8, 4, torch.float32, "cpu", kv_dtype)
        serving.paged.forward(tiny_llama, cache, feeds)
        values[kv_dtype] = cache.read(0, torch.tensor([12, 13, 0]))[1]  # as read back
    assert not torch.equal(values[None], values["int8"])
    torch.testing.assert_close(values[None], values["int8"], atol=0.05, rtol=0.05)


def test_a_bad_kv_dtype_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="Unknown kv_dtype"):
        serving.run(tiny_llama, make_requests([(4, 2, 0.0)]), kv_dtype="int4")
