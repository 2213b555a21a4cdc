"""Notebook 04's exercises on known answers worked out by hand: each fails with None and with a
wrong answer, never prints its expected value, and passes with the right one."""

import pytest

from helpers import exercises, planner, shapes, workbook

TESTED = {"04.tpot-between", "04.step-time", "04.knee", "04.h100-tpot"}


def test_a_prediction_is_checked_against_the_measurement():
    key = "04.tpot-between"
    assert not workbook.predict(key, None, measured=40.0)
    assert not workbook.predict(key, 80.0, measured=40.0)
    assert workbook.predict(key, 48.0, measured=40.0)  # inside ±25 %
    assert workbook.predict(key, 56.0, measured=40.0, spread=0.5)  # inside the run's spread


# (inputs, seconds) worked out by hand: max(bytes ÷ bandwidth, FLOPs ÷ peak) + overhead
STEP_CASES = [
    # 7e9 × 2 B ÷ 3.35e12 B/s = 4.179 ms > 2 × 7e9 ÷ 989e12 = 0.014 ms; + 2 ms
    (dict(params=7e9, bytes_per_param=2, batch=1, bandwidth=3.35e12, peak_flops=989e12,
          overhead_s=2e-3), 6.1791e-3),
    # 2 × 7e9 × 512 ÷ 989e12 = 7.248 ms > 4.179 ms; + 2 ms
    (dict(params=7e9, bytes_per_param=2, batch=512, bandwidth=3.35e12, peak_flops=989e12,
          overhead_s=2e-3), 9.2477e-3),
    # 135e6 × 4 ÷ 20e9 = 27 ms > 2 × 135e6 × 8 ÷ 250e9 = 8.64 ms; + 5 ms
    (dict(params=135e6, bytes_per_param=4, batch=8, bandwidth=20e9, peak_flops=250e9,
          overhead_s=5e-3), 32e-3),
]  # fmt: skip


def right_step(params, bytes_per_param, batch, bandwidth, peak_flops, overhead_s):
    return max(params * bytes_per_param / bandwidth, 2 * params * batch / peak_flops) + overhead_s


def summed_step(params, bytes_per_param, batch, bandwidth, peak_flops, overhead_s):
    return params * bytes_per_param / bandwidth + 2 * params * batch / peak_flops + overhead_s


@pytest.mark.parametrize("case, seconds", STEP_CASES)
def test_the_step_time_reference_on_hand_worked_cases(case, seconds):
    assert exercises.BANK["04.step-time"].expected(**case) == pytest.approx(seconds, rel=1e-4)


def test_the_step_time_derivation(capsys):
    key = "04.step-time"
    assert not workbook.derive(key, None)
    assert not workbook.derive(key, summed_step)  # no overlap: wrong past the first case
    out = capsys.readouterr().out
    assert "Hint:" in out and "9.248" not in out
    assert workbook.derive(key, right_step)


NOTEBOOK = dict(
    notebook_dtype="fp32",
    notebook_batches=[1, 2, 4, 8, 16, 32],
    notebook_tpot_s={1: 0.1, 2: 0.1, 4: 0.12, 8: 0.2},
)
# TPOT passes 1.5 × 0.10 s first at batch 12 (0.20 s); batch 6 (0.14 s) does not
MINE = {
    "dtype": "fp32",
    "batches": [1, 3, 6, 12, 24],
    "tpot_s": [0.1, 0.11, 0.14, 0.2, 0.35],
    "knee": 12,
}


def test_the_knee_investigation():
    key = "04.knee"
    assert not workbook.investigate(key, None, **NOTEBOOK)
    assert not workbook.investigate(key, {**MINE, "knee": 6}, **NOTEBOOK)  # not by the rule
    assert not workbook.investigate(
        key, {**MINE, "batches": [1, 3, 6], "tpot_s": [1, 1, 1]}, **NOTEBOOK
    )
    own = {**MINE, "batches": [1, 2, 4, 8, 16], "tpot_s": [0.1, 0.1, 0.12, 0.2, 0.3], "knee": 8}
    assert workbook.investigate(key, own, **NOTEBOOK)  # another grid of the same precision
    assert not workbook.investigate(
        key,
        {**own, "batches": [1, 2, 4, 8, 16, 32], "tpot_s": [0.1, 0.1, 0.12, 0.2, 0.3, 0.5]},
        **NOTEBOOK,
    )  # (the notebook's own sweep)
    slow = {**MINE, "tpot_s": [0.5, 0.5, 0.6, 0.8, 1.0], "knee": 12}  # 5× the notebook's
    assert not workbook.investigate(key, slow, **NOTEBOOK)
    assert workbook.investigate(key, {**slow, "dtype": "bf16"}, **NOTEBOOK)  # another precision
    assert workbook.investigate(key, MINE, **NOTEBOOK)
    flat = {**MINE, "tpot_s": [0.1] * 5, "knee": None}
    assert workbook.investigate(key, flat, **NOTEBOOK)


def hand_tpot_ms():
    """The planner's decode step written out (its compiled engine on an H100, fp16, batch 16,
    prompt 512, 128 new tokens: the KV cache at the average context 512 + 64)."""
    shape, h100 = shapes.Shape.of("llama-3-8b"), planner.gpu("h100-sxm")
    linear = shape.params - shape.vocab * shape.hidden  # the input embedding is read by row
    bandwidth = h100.bandwidth * h100.engine.memory_efficiency
    kv_read = shapes.kv_cache_bytes(shape, 16, 512 + 64, 2)
    attention_flops = 4 * shape.layers * 16 * (512 + 64) * shape.heads * shape.head_dim
    seconds = (linear * 2 + kv_read) / bandwidth + (2 * linear * 16 + attention_flops) / h100.flops
    return (seconds + h100.engine.overhead_s(shape.layers)) * 1e3


def test_the_h100_tpot_computation(capsys):
    key = "04.h100-tpot"
    given = dict(
        model="llama-3-8b",
        gpu="h100-sxm",
        dtype="fp16",
        batch=16,
        prompt_tokens=512,
        new_tokens=128,
    )
    known = hand_tpot_ms()
    assert not workbook.answer(key, None, **given)
    assert not workbook.answer(key, known * 1.5, **given)
    out = capsys.readouterr().out
    assert f"{known:.4g}" not in out and "Hint:" in out
    assert workbook.answer(key, known, **given)
