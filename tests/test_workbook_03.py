"""Notebook 03's exercises (issue 19) on known answers worked out by hand: each fails with None
and with a wrong answer, never prints its expected value, and passes with the right one."""

import dataclasses

import pytest

from helpers import planner, shapes, workbook

TESTED = {"03.bytes-per-token", "03.comm-per-token", "03.allreduce-new-size", "03.tpot-stops"}

# 2 all-reduces × layers × 2(p − 1)/p × batch × hidden × bytes, by hand
KNOWN_BYTES = {
    ("llama-2-13b", 4): 1_228_800,  # 80 × 1.5 × 1 × 5120 × 2
    ("llama-3-70b", 8): 73_400_320,  # 160 × 1.75 × 16 × 8192 × 2
    ("llama-2-7b", 1): 0,  # one device sends nothing
    ("smollm2-135m", 3): 737_280,  # 60 × 4/3 × 4 × 576 × 4
}


def right_bytes(model, tp, batch, bytes_per_value):
    return KNOWN_BYTES[(model, tp)]


def one_all_reduce_per_layer(model, tp, batch, bytes_per_value):
    return right_bytes(model, tp, batch, bytes_per_value) / 2


def test_bytes_per_token_on_hidden_cases(capsys):
    assert not workbook.derive("03.bytes-per-token", None)
    assert not workbook.derive("03.bytes-per-token", one_all_reduce_per_layer)
    assert "factor of 2" in capsys.readouterr().out
    assert not workbook.derive("03.bytes-per-token", lambda **kw: 1 / 0)
    assert workbook.derive("03.bytes-per-token", right_bytes)


def test_comm_per_token(capsys):
    # α = 1 ms, β = 1 ns/byte: 80 × (1 ms + 81,920 B × 1 ns) = 80 × 1.08192 ms = 86.5536 ms
    fit = dict(alpha=1e-3, beta=1e-9)
    assert not workbook.answer("03.comm-per-token", None, **fit)
    assert not workbook.answer("03.comm-per-token", 80.0, **fit)  # α only: 8 % short
    assert not workbook.answer("03.comm-per-token", 0.0865536, **fit)  # in seconds
    out = capsys.readouterr().out
    assert "86.55" not in out and "unit prefix" in out
    assert workbook.answer("03.comm-per-token", 86.5536, **fit)
    assert workbook.answer("03.comm-per-token", 86.55, unit="ms", **fit)


def test_allreduce_prediction():
    key = "03.allreduce-new-size"
    assert not workbook.predict(key, None, measured=2.0)
    assert not workbook.predict(key, 1.0, measured=2.0)  # α alone, bytes left out
    assert workbook.predict(key, 2.4, measured=2.0)  # +20 %
    assert workbook.predict(key, 3.0, measured=2.0, spread=0.6)  # the fit's larger miss


H100 = planner.gpu("h100-sxm")
WORKLOAD = {"model": "llama-2-7b", "dtype": "fp16", "prompt_tokens": 512}
W = 13.5e9
DEGREES = [1, 2, 4, 8, 16, 32]


def table(alpha_s, per_rank_s):
    engine = dataclasses.replace(H100.engine, allreduce_s=alpha_s, allreduce_per_rank_s=per_rank_s)
    spec = dataclasses.replace(H100, engine=engine)
    return {t: planner.predict(**WORKLOAD, gpu=spec, tp=t, batch=1).tpot_s * 1e3 for t in DEGREES}


def result(alpha_s=20e-6, per_rank_s=2e-6, stops_at=None, t_star=None):
    tpot = table(alpha_s, per_rank_s)
    if stops_at is None:
        rises = [t for t, u in zip(DEGREES, DEGREES[1:], strict=False) if tpot[u] >= tpot[t]]
        stops_at = rises[0] if rises else DEGREES[-1]
    bw = H100.bandwidth * H100.engine.memory_efficiency
    layers = shapes.Shape.of("llama-2-7b").layers
    star = (W / (4 * layers * per_rank_s * bw)) ** 0.5 if per_rank_s else float("inf")
    return {
        "alpha_s": alpha_s,
        "per_rank_s": per_rank_s,
        "tpot_ms": tpot,
        "stops_at": stops_at,
        "t_star": star if t_star is None else t_star,
    }


GIVEN = dict(gpu=H100, workload=WORKLOAD, weight_bytes=W)


def test_the_planted_growth_stops_tpot_inside_the_grid():
    # s = 2 µs a rank: t* = √(13.5e9 ÷ (4 · 32 · 2e-6 · BW)) ≈ 4.3 at an H100's ~2.8 TB/s
    r = result()
    assert 2 < r["t_star"] < 8 and r["stops_at"] in (4, 8)
    assert workbook.investigate("03.tpot-stops", r, **GIVEN)


@pytest.mark.parametrize(
    "bad, why",
    [
        (None, "not done"),
        (dict(stops_at=16), "first degree"),
        (dict(t_star=1.0), "t_star"),
        (dict(per_rank_s=0.0, alpha_s=20e-6), "stop"),  # falls on: no stop inside the grid
        ("notebook", "notebook's engine"),
        ("not planner", "not the planner's"),
    ],
)
def test_tpot_stops_fails_for_the_reason_it_names(bad, why, capsys):
    if bad is None:
        r = None
    elif bad == "notebook":
        r = result(H100.engine.allreduce_s, H100.engine.allreduce_per_rank_s)
    elif bad == "not planner":
        r = result()
        r["tpot_ms"] = {t: v * 1.1 for t, v in r["tpot_ms"].items()}
    else:
        kw = {k: v for k, v in bad.items() if k in ("alpha_s", "per_rank_s")}
        base = result(**kw) if kw else result()
        r = {**base, **{k: v for k, v in bad.items() if k not in kw}}
    assert not workbook.investigate("03.tpot-stops", r, **GIVEN)
    assert why in capsys.readouterr().out
