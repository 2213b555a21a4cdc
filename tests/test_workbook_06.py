"""Notebook 06's exercises (issue 19) on known answers worked out by hand: each fails with None
and with a wrong answer, never prints its expected value, and passes with the right one."""

import functools

from helpers import deploy, serving, workbook

TESTED = {
    "06.max-concurrency",
    "06.client-path",
    "06.closed-loop-rps",
    "06.capped-tpot",
    "06.batch-cap",
}

# By hand: (prompt + output) rounded up to blocks, the cache's blocks rounded down, their ratio.
KNOWN_CONCURRENCY = {
    (23_296, 192, 24, 128): 91,  # 182 blocks ÷ 2 blocks (216 tokens)
    (23_296, 100, 20, 16): 182,  # 1,456 blocks ÷ 8 blocks (120 tokens)
    (643_232, 4000, 1000, 16): 128,  # 40,202 blocks ÷ 313 blocks (5,008 tokens)
    (1_000, 2_000, 10, 16): 0,  # 62 blocks ÷ 126: not even one fits
}


def right_concurrency(kv_tokens, prompt_tokens, output_tokens, block):
    return KNOWN_CONCURRENCY[(kv_tokens, prompt_tokens, output_tokens, block)]


def tokens_only(kv_tokens, prompt_tokens, output_tokens, block):
    return kv_tokens // (prompt_tokens + output_tokens)  # forgets whole blocks


def test_max_concurrency_on_hidden_cases(capsys):
    assert not workbook.derive("06.max-concurrency", None)
    assert not workbook.derive("06.max-concurrency", tokens_only)
    assert "91" not in capsys.readouterr().out
    assert workbook.derive("06.max-concurrency", right_concurrency)


def test_client_path(capsys):
    given = dict(client_ttft_s=0.2834, server_ttft_s=0.2591)  # 24.3 ms by hand
    assert not workbook.answer("06.client-path", None, **given)
    assert not workbook.answer("06.client-path", 0.0243, **given)  # seconds
    out = capsys.readouterr().out
    assert "24.3" not in out and "unit prefix" in out
    assert workbook.answer("06.client-path", 24.3, **given)


def test_closed_loop_rps(capsys):
    given = dict(concurrency=8, latency_s=2.5)  # 8 ÷ 2.5 = 3.2 requests/s
    assert not workbook.answer("06.closed-loop-rps", None, **given)
    assert not workbook.answer("06.closed-loop-rps", 20.0, **given)  # 8 × 2.5
    assert "3.2" not in capsys.readouterr().out
    assert workbook.answer("06.closed-loop-rps", 3.2, **given)


def test_capped_tpot_prediction(capsys):
    assert not workbook.predict("06.capped-tpot", None, 120.0)
    assert not workbook.predict("06.capped-tpot", 60.0, 120.0)  # half
    assert workbook.predict("06.capped-tpot", 100.0, 120.0)  # within 30 %
    assert workbook.predict("06.capped-tpot", 80.0, 120.0, spread=0.4)  # the spread widens it


def step_s(step, fixed_s=0.05, per_decode_s=0.01, per_prompt_token_s=0.001):
    return fixed_s + per_decode_s * step.decode_seqs + per_prompt_token_s * step.prefill_tokens


def test_batch_cap_checks_the_simulators_numbers():
    trace = serving.poisson_trace(5.0, 24, seed=3, scale=1 / 16, max_prompt=64, max_output=12)
    clock = functools.partial(step_s)
    given = dict(trace=trace, clock=clock, kv_blocks=512, budget=2048)

    def p99(cap):
        return float(deploy.simulate(trace, clock, 512, cap, 2048).ttft_p99_s)

    uncapped = p99(128)
    table = {cap: p99(cap) for cap in (1, 2, 4, 16)}
    within = [c for c in sorted(table) if table[c] <= 1.5 * uncapped]
    assert within and within[0] > 1  # the planted case has an answer inside the grid
    right = {"ttft_p99_s": table, "smallest": within[0]}
    assert not workbook.investigate("06.batch-cap", None, **given, uncapped=uncapped)
    assert not workbook.investigate("06.batch-cap", {**right, "smallest": 4}, **given,
                                    uncapped=uncapped)  # fmt: skip
    made_up = {**right, "ttft_p99_s": {**table, 2: table[2] * 1.1}}
    assert not workbook.investigate("06.batch-cap", made_up, **given, uncapped=uncapped)
    assert not workbook.investigate("06.batch-cap", {"ttft_p99_s": {16: 1.0, 32: 1.0, 64: 1.0},
                                    "smallest": 16}, **given, uncapped=uncapped)  # fmt: skip
    assert workbook.investigate("06.batch-cap", right, **given, uncapped=uncapped)
