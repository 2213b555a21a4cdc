"""The text generators on the stored measurements of every CPU the course has run on."""

import re

import pandas as pd
import pytest

from helpers import DATA_DIR, explain, profile, verdicts

MACHINES = pd.read_csv(DATA_DIR / "measured" / "cpu_decode_gap.csv")
CLAIMS = re.compile(r"as predicted|confirms the prediction|as the roofline predicts")


def test_the_stored_measurements_cover_two_kinds_of_cpu_at_least():
    assert MACHINES.machine.nunique() >= 2
    assert MACHINES.source.str.len().min() > 20  # every row says where it comes from


@pytest.mark.parametrize("machine", MACHINES.machine, ids=str)
def test_decode_text_follows_the_rule_on_each_machine(machine):
    m = MACHINES.set_index("machine").loc[machine]
    text = explain.decode_gap(m)
    ratio = m.loop_s / m.floor_s
    assert f"{ratio:.2f}× the floor" in text
    if ratio > explain.BOUND_BY_BYTES:
        assert "do **not** set its time" in text and not CLAIMS.search(text)
    else:
        assert "its bytes set its time" in text
    kernel, around = m.matmul_s - m.floor_s, m.loop_s - m.matmul_s
    named = "matrix-vector kernel" if kernel > around else "work around the products"
    assert named in text
    if m.generate_s == m.generate_s:
        slower = m.generate_s / m.loop_s > 1 + explain.SAME
        faster = m.generate_s / m.loop_s < 1 - explain.SAME
        assert ("slower" in text) == slower and ("faster" in text) == faster
    else:
        assert "not timed" in text


@pytest.mark.parametrize("machine", MACHINES.machine, ids=str)
def test_floor_text_says_which_rate_bounds_each_machine(machine):
    m = MACHINES.set_index("machine").loc[machine]
    cache = 0 if m.llc_bytes != m.llc_bytes else int(m.llc_bytes)
    text = explain.floor_bandwidth(
        m.read_bandwidth, m.working_set_bandwidth, int(m.weight_bytes), cache
    )
    assert f"{m.weight_bytes / 1e6:,.0f} MB" in text
    if cache and m.weight_bytes < 2 * cache:
        assert "part of it can stay in cache" in text
    elif cache:
        assert "streams from memory" in text
    else:
        assert "does not report its cache sizes" in text


def test_the_xeon_keeps_part_of_the_weights_in_its_l3():
    text = explain.floor_bandwidth(21e9, 30e9, 538_000_000, 300 * 2**20)
    assert "1.7× the 300 MiB" in text and "1.43×" in text


def test_generate_wording_within_noise():
    assert "same time" in explain.versus_generate(0.050, 0.051)
    assert "slower" in explain.versus_generate(0.050, 0.060)
    assert "faster" in explain.versus_generate(0.060, 0.050)


def test_biggest_miss_names_the_category_that_overran_most():
    parts = pd.DataFrame(
        {"category": list(profile.CATEGORIES), "predicted_ms": [12, 0.2, 1, 0.3, 2, 8],
         "measured_ms": [50, 2.0, 4, 0.5, 3, 9]}
    )  # fmt: skip
    text = explain.biggest_miss(parts)
    assert "**weight matmuls**" in text and "38.0 ms of the step" in text


# --- Notebook 04's sentences, each on both outcomes ---------------------------------------


def test_a_knee_found_or_not_found_in_the_sweep():
    assert explain.knee_in_sweep(8, 1) == "TPOT first exceeds 1.5× its batch-1 value at batch **8**"
    assert "stayed within 1.5× of batch 1" in explain.knee_in_sweep(None, 1)
    assert explain.batch_or_past(8, 32) == "8" and explain.batch_or_past(None, 32) == "> 32"


def test_the_closer_knee_prediction_is_named_with_its_factor():
    skinny = explain.knee_predictor({"ridge point": 3.0, "skinny roof": 0.5})
    assert "**skinny roof**" in skinny and "factor 1.4" in skinny and "against 8.0" in skinny
    assert "measured rate, not the peak" in skinny
    ridge = explain.knee_predictor({"ridge point": 0.0, "skinny roof": 2.0})
    assert "**ridge point**" in ridge and "the ridge point decides" in ridge


def test_the_other_precision_emulated_paid_off_or_not():
    emulated = explain.precision_outcome("bf16", "fp32", "emulated (AVX2)", 3.0, 4.0, "bf16")
    assert "bf16 is emulated" in emulated and "up to 4.0× more compute" in emulated
    faster = explain.precision_outcome("bf16", "fp32", "native", 0.6, 0.5, "bf16")
    assert "median 0.60× fp32's" in faster and "bf16's fewer bytes paid off" in faster
    slower = explain.precision_outcome("bf16", "fp32", "native", 1.2, 0.5, "bf16")
    assert "did not pay off" in slower
    # from bf16 to fp32: the larger format was the slower one, so the smaller paid off
    assert "paid off." in explain.precision_outcome("fp32", "bf16", "native", 1.2, 2.0, "bf16")
    assert explain.slower_of("fp32", "bf16", 0.6) == "fp32"
    assert explain.slower_of("fp32", "bf16", 1.2) == "bf16"


def test_the_frontier_knobs_and_fp8():
    assert "a knob other than batch moves it" in explain.frontier_knobs(2)
    assert "batch alone picks" in explain.frontier_knobs(1)
    assert "has fp8 tensor cores" in explain.fp8_here(True)
    assert "compute capability 8.9+" in explain.fp8_here(False)


def test_a_calibration_is_physical_or_says_which_bound_it_broke():
    assert explain.calibration_physical(0.8, 0.002, 0.010) == "The fit is physical."
    too_efficient = explain.calibration_physical(1.3, 0.002, 0.010)
    assert "not physical" in too_efficient and "1.30× the measured bandwidth" in too_efficient
    too_slow = explain.calibration_physical(0.8, 0.012, 0.010)
    assert "12.0 ms, above the shortest measured step (10.0 ms)" in too_slow
    assert "bandwidth" not in too_slow


def test_the_planner_misses_in_words():
    assert explain.planner_direction(-0.1) == "too fast"
    assert explain.planner_direction(0.1) == "too slow"
    assert explain.published_misses([]) == "No row is missed by more than 25%."
    assert explain.published_misses(["a (+30%)", "b (-40%)"]) == "Misses: a (+30%); b (-40%)."
    none_missed = explain.check_rows_missed([], "h100 fp8", 0.4)
    assert none_missed == "No check row is missed by more than 25%."
    text = explain.check_rows_missed(["h100 fp8-w8a8"], "h100-sxm fp8-w8a8", 0.42)
    assert "The misses are h100 fp8-w8a8" in text and "h100-sxm fp8-w8a8's 42%" in text


def test_latency_knees_as_shares_of_capacity_or_none_found():
    # capacity 2 req/s: a knee at 1.6 req/s is 80 % of it; None: no knee up to the last load
    text = explain.latency_knees({"static": 1.6, "continuous": None}, 2.0, 1.2)
    assert text == (
        "Knee (median latency > 2× its light-load value): static at 80% of capacity, "
        "continuous: none up to 120%."
    )


def test_int8_cache_says_the_verdicts_sentence_and_the_quality():
    peak, predicted = {None: 2, "int8": 6}, {None: 2, "int8": 7}
    held = explain.int8_cache((verdicts.HOLDS, "rule"), peak, predicted, 0.875, 5, 8, "float32")
    assert held.startswith(
        "With int8 keys and values **3.0×** as many requests ran at once in the same memory "
        "(6 against 2; predicted 7 and 2). **Quality:** 87.5% of the generated tokens equal "
        "the float32 cache's, position by position, and 5 of 8 answers are identical"
    )
    failed = explain.int8_cache(
        (verdicts.FAILS, "rule"), {None: 4, "int8": 5}, predicted, 1.0, 8, 8, "bfloat16"
    )
    assert failed.startswith(
        "int8 ran only 1.2× as many at once (5 against 4; predicted 7 and 2): "
        "section 11 diagnoses it. **Quality:** 100.0%"
    )
    # the verdict decides, not the numbers: at_least's own decision on the same ratio
    decided = verdicts.at_least("peak running, int8 ÷ model dtype", 5 / 4, 1.5)
    assert explain.int8_cache(decided, {None: 4, "int8": 5}, predicted, 1.0, 8, 8, "x") == (
        failed.replace("bfloat16", "x")
    )
