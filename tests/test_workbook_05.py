"""Notebook 05's exercises on known answers worked out by hand: each fails with None and with a
wrong answer, never prints its expected value, and passes with the right one."""

import pytest
import torch

from helpers import exercises, serving, workbook

TESTED = {"05.blocks-held", "05.throughput-below-capacity", "05.goodput", "05.chunk-size"}

# (prompt, new tokens, block size) → blocks: slots = prompt + new − 1, rounded up to blocks
BLOCKS = [((100, 20, 16), 8), ((16, 1, 16), 1), ((16, 2, 16), 2), ((500, 300, 64), 13)]


@pytest.mark.parametrize("args, blocks", BLOCKS)
def test_blocks_held_reference_on_hand_worked_cases(args, blocks):
    prompt, new, size = args
    assert exercises.BANK["05.blocks-held"].expected(prompt, new, size) == blocks


def test_blocks_held_derivation():
    key = "05.blocks-held"
    assert not workbook.derive(key, None)
    assert not workbook.derive(
        key, lambda prompt, new_tokens, block_size: -(-(prompt + new_tokens) // block_size)
    )  # (+1 slot)
    assert workbook.derive(
        key, lambda prompt, new_tokens, block_size: (prompt + new_tokens - 2) // block_size + 1
    )


def test_a_throughput_prediction_is_checked_against_the_measurement():
    key = "05.throughput-below-capacity"
    assert not workbook.predict(key, None, measured=30.0)
    assert not workbook.predict(key, 45.0, measured=30.0)
    assert workbook.predict(key, 32.0, measured=30.0)  # inside ±10 %


def right_goodput(ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, duration_s):
    met = [a <= ttft_slo_s and b <= tpot_slo_s for a, b in zip(ttft_s, tpot_s, strict=True)]
    return sum(met) / duration_s


def share_met(ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, duration_s):
    return (
        right_goodput(ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, duration_s) * duration_s / len(ttft_s)
    )


def strict_goodput(ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, duration_s):
    met = [a < ttft_slo_s and b < tpot_slo_s for a, b in zip(ttft_s, tpot_s, strict=True)]
    return sum(met) / duration_s


def test_goodput_reference_on_a_hand_worked_case():
    # 2 of 3 requests meet TTFT ≤ 1 s and TPOT ≤ 50 ms over 4 s: 0.5 requests/s
    case = dict(
        ttft_s=[0.1, 0.5, 2.0],
        tpot_s=[0.02, 0.02, 0.02],
        ttft_slo_s=1.0,
        tpot_slo_s=0.05,
        duration_s=4.0,
    )
    assert exercises.BANK["05.goodput"].expected(**case) == pytest.approx(0.5)


def test_goodput_derivation():
    key = "05.goodput"
    assert not workbook.derive(key, None)
    assert not workbook.derive(key, share_met)  # a share, not a rate
    assert not workbook.derive(key, strict_goodput)  # a request exactly at a target met it
    assert workbook.derive(key, right_goodput)


def linear_steps(step):
    return 0.01 + 0.001 * step.tokens + 0.002 * step.seqs


def long_among_short():
    gen = torch.Generator().manual_seed(0)
    short = [serving.Request(torch.randint(0, 97, (4,), generator=gen), 12, 0.0) for _ in range(3)]
    return short + [serving.Request(torch.randint(0, 97, (32,), generator=gen), 2, 0.05)]


def my_result(chunks, requests):
    gaps, ttfts = [], []
    for chunk in chunks:
        df = serving.run(None, requests, max_batch=4, prefill_chunk=chunk, clock=linear_steps)
        gaps.append(df.max_itl_s.iloc[:3].max())
        ttfts.append(df.ttft_s.iloc[3])
    return {
        "chunks": chunks,
        "worst_gap_s": gaps,
        "long_ttft_s": ttfts,
        "gap_grows_with_chunk": True,
        "ttft_falls_with_chunk": True,
    }


def test_the_chunk_size_investigation():
    """On this clock a step carrying c prompt tokens costs 0.001 s more per token, and every
    step 0.018 s more than its tokens: the worst gap grows with the chunk (the step carrying it
    is longer), the long prompt's TTFT falls (fewer steps to pay the fixed cost of)."""
    key, requests = "05.chunk-size", long_among_short()
    given = dict(requests=requests, clock=linear_steps, max_batch=4)
    result = my_result([4, 8, 16], requests)
    assert result["worst_gap_s"] == sorted(result["worst_gap_s"])  # as worked out above
    assert result["long_ttft_s"] == sorted(result["long_ttft_s"], reverse=True)
    assert not workbook.investigate(key, None, **given)
    assert not workbook.investigate(key, my_result([4, 8], requests), **given)  # two sizes
    assert not workbook.investigate(key, {**result, "gap_grows_with_chunk": False}, **given)
    assert not workbook.investigate(key, {**result, "ttft_falls_with_chunk": False}, **given)
    off = {**result, "worst_gap_s": [g * 1.5 for g in result["worst_gap_s"]]}
    assert not workbook.investigate(key, off, **given)  # not what the engine gives
    assert workbook.investigate(key, result, **given)
