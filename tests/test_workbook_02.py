"""Notebook 02's exercises (issue 19) on known answers worked out by hand: each fails with None
and with a wrong answer, never prints its expected value, and passes with the right one."""

import pandas as pd
import pytest

from helpers import workbook

TESTED = {"02.llama3-kv", "02.max-batch", "02.request-peak", "02.int8-fits"}

# 2 · 32 layers · 4 · 8192 · 8 KV heads · 128 · 2 bytes = 4,294,967,296 bytes = 4 GiB = 4.295 GB
LLAMA3 = dict(model="llama-3-8b", batch=4, context=8192, bytes_per_value=2)


def test_the_kv_cache_in_either_unit(capsys):
    assert not workbook.answer("02.llama3-kv", None, **LLAMA3)
    assert not workbook.answer("02.llama3-kv", 8.0, **LLAMA3)  # 8 KV heads counted twice
    out = capsys.readouterr().out
    assert "4.295" not in out and "Hint:" in out
    assert workbook.answer("02.llama3-kv", 4.0, unit="GiB", **LLAMA3)
    assert workbook.answer("02.llama3-kv", 4.295, unit="GB", **LLAMA3)  # units accepted
    assert not workbook.answer("02.llama3-kv", 4.0, unit="GB", **LLAMA3)  # GiB's number as GB
    assert "GB against GiB" in capsys.readouterr().out


# the largest batch by hand: (budget − parameters × bytes) ÷ one sequence's KV cache, rounded down
KNOWN_BATCH = {
    # 6,738,415,616 × 2 = 13,476,831,232; 2·32·4096·32·128·2 = 2,147,483,648 a sequence
    ("llama-2-7b", 80e9): 30,  # 66,523,168,768 ÷ 2,147,483,648 = 30.98
    ("llama-2-7b", 80 * 2**30): 33,  # 72,422,514,688 ÷ 2,147,483,648 = 33.72
    # 8,030,261,248 × 2 = 16,060,522,496; 2·32·8192·8·128·1 = 536,870,912 (an fp8 cache)
    ("llama-3-8b", 80e9): 119,  # 63,939,477,504 ÷ 536,870,912 = 119.1
    ("llama-2-13b", 24e9): 0,  # 13,015,864,320 × 2 = 26.0 GB: the weights alone do not fit
    # 134,515,008 × 4 = 538,060,032; 2·30·2048·3·64·4 = 94,371,840
    ("smollm2-135m", 2**30): 5,  # 535,681,792 ÷ 94,371,840 = 5.68
}


def right_max_batch(model, context, budget_bytes, weight_bytes, value_bytes):
    return KNOWN_BATCH[(model, budget_bytes)]


def forgets_the_weights(model, context, budget_bytes, weight_bytes, value_bytes):
    return right_max_batch(model, context, budget_bytes, weight_bytes, value_bytes) + 7


def test_max_batch_on_hidden_cases(capsys):
    assert not workbook.derive("02.max-batch", None)
    assert not workbook.derive("02.max-batch", forgets_the_weights)
    assert not workbook.derive("02.max-batch", lambda **kw: 1 / 0)
    assert "raised" in capsys.readouterr().out
    assert workbook.derive("02.max-batch", right_max_batch)
    # one sequence too many is wrong: the tolerance is exact
    assert not workbook.derive("02.max-batch", lambda **c: right_max_batch(**c) + 1)


def test_request_peak_prediction():
    key = "02.request-peak"
    assert not workbook.predict(key, None, measured=120.0)
    assert not workbook.predict(key, 60.0, measured=120.0)  # the KV cache alone
    assert workbook.predict(key, 90.0, measured=120.0)  # −25 %, inside ±30 %
    assert not workbook.predict(key, 170.0, measured=120.0)  # +42 %
    assert workbook.predict(key, 170.0, measured=120.0, spread=0.45)  # inside the run's spread


def frame(context, found, formula):
    return pd.DataFrame({"context": [context], "found": [found], "predicted": [formula]})


def fits(context=128, found_float=4, found_int8=10, predicted=2.3, formula=(6, 14)):
    return {
        "context": context,
        "float": frame(context, found_float, formula[0]),
        "int8": frame(context, found_int8, formula[1]),
        "predicted_ratio": predicted,
    }


@pytest.mark.parametrize(
    "result, why",
    [
        (None, "not done"),
        (fits(context=512), "another context"),  # section 4's own context
        (fits(found_int8=3), "swapped"),
        (fits(predicted=4.0), "too high"),  # 4 bytes → 1, the cache alone: 4 ÷ (14/6) − 1 = 71 %
        (fits(predicted=2.0), "too low"),  # 14 % under the formulas' 14 ÷ 6
        (fits(predicted=None), "predicted ratio"),
        ({**fits(), "int8": frame(256, 10, 14)}, "your 'context'"),
        (fits(found_float=0, found_int8=0, formula=(0, 1)), "shorter"),
    ],
)
def test_int8_fits_fails_for_the_reason_it_names(result, why, capsys):
    assert not workbook.investigate("02.int8-fits", result, notebook_context=512)
    assert why in capsys.readouterr().out


def test_int8_fits_passes_with_the_formulas_ratio():
    # the formulas fit 14 ÷ 6 = 2.33; predicted 2.3 is 1.4 % low, inside 10 %
    assert workbook.investigate("02.int8-fits", fits(), notebook_context=512)
