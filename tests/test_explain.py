"""The text generators on the stored measurements of every CPU the course has run on."""

import re

import pandas as pd
import pytest

from helpers import DATA_DIR, explain, profile

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
