import dataclasses

import numpy as np
import pandas as pd
import pytest

from helpers import planner
from helpers.shapes import Shape, kv_cache_bytes

LLAMA_2_7B_PARAMS = 6_738_415_616
EMBEDDING_7B = 32000 * 4096  # read one row per token, so not streamed


def ideal(name="a100-80gb-sxm"):
    """A datasheet GPU with a zero-overhead engine: pure first principles."""
    return planner.gpu(name, planner.Engine("ideal"))


def test_memory_is_weights_plus_cache_plus_activations():
    p = planner.predict(
        model="llama-2-7b",
        gpu="a100-80gb-sxm",
        dtype="fp16",
        batch=1,
        prompt_tokens=100,
        new_tokens=28,
    )
    shape = Shape.of("llama-2-7b")
    kv = kv_cache_bytes(shape, 1, 128, 2)
    # the widest moment of one layer (shapes.activation_bytes, derived in notebook 02)
    activations = 100 * (5 * 4096 + 2 * 32 * 128 + 3 * 11008) * 2 + 100 * 3 * 128 * 2
    weights = p.memory_per_gpu_bytes - kv - activations - planner.RUNTIME_RESERVE_BYTES
    assert weights == pytest.approx(LLAMA_2_7B_PARAMS * 2)  # 13.48 GB in fp16
    assert kv == 2 * 32 * 128 * 4096 * 2


def test_batch_1_decode_is_streamed_weight_bytes_over_bandwidth():
    spec = ideal()
    p = planner.predict(
        model="llama-2-7b", gpu=spec, dtype="fp16", batch=1, prompt_tokens=1, new_tokens=2
    )
    assert p.bound == "memory"
    floor = (LLAMA_2_7B_PARAMS - EMBEDDING_7B) * 2 / spec.bandwidth
    flops = 2 * (LLAMA_2_7B_PARAMS - EMBEDDING_7B) / spec.flops  # no overlap assumed
    assert p.tpot_s == pytest.approx(floor + flops, rel=1e-3)


def test_overhead_adds_per_layer_and_per_step():
    engine = planner.Engine("planted", step_s=1e-3, layer_s=2e-5)
    with_overhead = planner.gpu("a100-80gb-sxm", engine)
    a = planner.predict(model="llama-2-7b", gpu=ideal(), dtype="fp16", batch=1, new_tokens=8)
    b = planner.predict(model="llama-2-7b", gpu=with_overhead, dtype="fp16", batch=1, new_tokens=8)
    assert b.tpot_s - a.tpot_s == pytest.approx(1e-3 + 32 * 2e-5)
    assert b.decode_parts_s["overhead"] == pytest.approx(1e-3 + 32 * 2e-5)


def test_small_model_on_a_fast_gpu_is_overhead_bound():
    p = planner.predict(
        model="smollm2-135m", gpu=planner.gpu("h200", "eager"), dtype="bf16", batch=1
    )
    assert p.bound == "overhead"


def test_compute_bound_at_large_batch():
    spec = ideal()
    p = planner.predict(
        model="llama-2-7b", gpu=spec, dtype="fp16", batch=4096, prompt_tokens=1, new_tokens=2
    )
    assert p.bound == "compute"
    linear = LLAMA_2_7B_PARAMS - EMBEDDING_7B
    assert p.decode_parts_s["compute"] == pytest.approx(2 * linear * 4096 / spec.flops, rel=0.01)


def test_nvlink_datasheet_figure_counts_both_directions():
    assert planner.gpu("h100-sxm").link_bandwidth == pytest.approx(450e9)
    assert planner.gpu("t4").link == "pcie" and planner.gpu("t4").link_bandwidth == 15.75e9


def test_kaggle_two_t4_plans_over_pcie():
    best = planner.best_config("llama-2-7b", "t4", gpus=2, tpot_budget_ms=200)
    assert best is not None
    tp2 = planner.predict(model="llama-2-7b", gpu="t4", dtype="fp16", tp=2, batch=1)
    nvlink_t4 = dataclasses.replace(planner.gpu("t4"), link_bandwidth=450e9)
    assert (
        tp2.tpot_s > planner.predict(model="llama-2-7b", gpu=nvlink_t4, dtype="fp16", tp=2).tpot_s
    )


def test_monotonic_in_batch_and_tp():
    tpot = [planner.predict(batch=b).tpot_s for b in (1, 2, 8, 32, 128)]
    rate = [planner.predict(batch=b).tokens_per_s for b in (1, 2, 8, 32, 128)]
    assert tpot == sorted(tpot) and rate == sorted(rate)
    by_tp = [planner.predict(gpu="h100-sxm", tp=t).tpot_s for t in (1, 2, 4, 8)]
    assert by_tp == sorted(by_tp, reverse=True)
    per_gpu = [planner.predict(gpu="h100-sxm", tp=t, batch=64).tokens_per_s / t for t in (1, 2, 4)]
    assert per_gpu == sorted(per_gpu, reverse=True)  # smaller TP: more throughput per GPU


def test_tp_gains_shrink_with_overhead():
    eager = [planner.predict(gpu=planner.gpu("h100-sxm", "eager"), tp=t).tpot_s for t in (1, 8)]
    ideal_ = [planner.predict(gpu=ideal("h100-sxm"), tp=t).tpot_s for t in (1, 8)]
    assert eager[0] / eager[1] < ideal_[0] / ideal_[1]  # fixed costs do not split over GPUs


VERSUS_PUBLISHED = planner.versus_published()


@pytest.mark.parametrize(
    "row",
    list(VERSUS_PUBLISHED.itertuples()),
    ids=lambda r: f"{r.source}-{r.model}-{r.dtype}-tp{r.tp}-b{r.batch}-{r.metric}",
)
def test_published_rows_within_25_percent(row):
    assert row.predicted == pytest.approx(row.published, rel=0.25)


def test_versus_published_puts_a_prediction_in_the_rows_unit():
    t = planner.published_results()
    r = t[(t.source == "gpt-fast") & (t.model == "llama-2-7b") & (t.dtype == "bf16") & (t.tp == 1)]
    r = r.iloc[0]
    assert r.metric == "tokens_per_s"  # gpt-fast reports one stream's tokens/s
    spec = planner.gpu(r.gpu, r.engine)
    p = planner.predict(model="llama-2-7b", gpu=spec, dtype="bf16", batch=int(r.batch),
                        prompt_tokens=int(r.prompt_tokens), new_tokens=200)  # fmt: skip
    v = VERSUS_PUBLISHED
    mine = v[
        (v.source == "gpt-fast") & (v.model == "llama-2-7b") & (v.dtype == "bf16") & (v.tp == 1)
    ]
    assert mine.published.item() == pytest.approx(1e3 / r.value)  # ms per token
    assert mine.predicted.item() == pytest.approx(p.tpot_s * 1e3)
    assert len(VERSUS_PUBLISHED) == t.role.isin(["check", "calibration"]).sum()


def test_engine_constants_come_from_the_derivation():
    derived = planner.derive_engines().set_index(["engine", "constant"]).value
    assert planner.engines()["compiled"].layer_s == derived["compiled", "layer_s"]
    assert planner.engines()["production"].allreduce_s == derived["production", "allreduce_s"]
    assert 1e-6 < derived["compiled", "allreduce_s"] < derived["production", "allreduce_s"]


def test_calibrate_recovers_planted_overhead_and_efficiency():
    spec = ideal("h100-sxm")
    overhead_s, slope = 2e-3, 1.25
    rows = []
    for batch in (1, 4, 16, 64, 256):
        x = planner.step_seconds(
            model="llama-2-7b", gpu=spec, dtype="fp16", batch=batch, tokens=1, context=128 + 8
        )
        rows.append(
            {"batch": batch, "prompt": 128, "new_tokens": 16, "tpot_s": overhead_s + slope * x}
        )
    fitted = planner.calibrate(rows, model="llama-2-7b", gpu=spec, dtype="fp16")
    assert fitted.engine.step_s == pytest.approx(overhead_s, rel=1e-6)
    for r in rows:
        p = planner.predict(
            model="llama-2-7b",
            gpu=fitted,
            dtype="fp16",
            batch=r["batch"],
            prompt_tokens=128,
            new_tokens=16,
        )
        assert p.tpot_s == pytest.approx(r["tpot_s"], rel=1e-6)


def test_measured_linear_rates_set_the_compute_time():
    spec = dataclasses.replace(ideal(), linear_flops={1: 1e12, 64: 64e12})
    x = planner.step_time(Shape.of("llama-2-7b"), spec, "fp16", 1, 8, 1, 16)
    rate_8 = np.exp(np.interp(np.log(8), np.log([1, 64]), np.log([1e12, 64e12])))
    assert x["compute"] == pytest.approx(
        2 * (LLAMA_2_7B_PARAMS - EMBEDDING_7B) * 8 / rate_8, rel=0.01
    )


def test_names_are_case_insensitive():
    a = planner.predict(model="Llama-2-7B", gpu="A100-80GB-SXM", dtype="FP16")
    b = planner.predict(model="llama-2-7b", gpu="a100-80gb-sxm", dtype="fp16")
    assert a == b


def test_bad_input():
    with pytest.raises(ValueError, match="known:|use one of"):
        planner.predict(model="gpt-9")
    with pytest.raises(ValueError, match="Unknown GPU"):
        planner.predict(gpu="tpu-v5")
    with pytest.raises(ValueError, match="does not divide"):
        planner.predict(model="llama-3-8b", tp=3)
    with pytest.raises(ValueError, match="Unknown dtype"):
        planner.predict(dtype="fp8")
    for tp in (0, -1):
        with pytest.raises(ValueError, match="tp must be at least 1"):
            planner.predict(tp=tp)
    with pytest.raises(TypeError, match="whole number"):
        planner.predict(batch=2.5)
    with pytest.raises(ValueError, match="gpus must be at least 1"):
        planner.best_config("llama-2-7b", "h100-sxm", gpus=0, tpot_budget_ms=20)
    with pytest.raises(TypeError, match="not a string"):
        planner.candidates("llama-2-7b", "h100-sxm", gpus=1, dtypes="fp16")
    with pytest.raises(ValueError, match="Unknown engine"):
        planner.gpu("h100-sxm", "turbo")
    p = planner.predict(model="llama-3-70b", gpu="t4", dtype="fp16")
    assert not p.fits and "raise tp" in p.reason


def test_best_config_respects_the_budget_and_maximises_throughput():
    table = planner.candidates("llama-2-7b", "h100-sxm", gpus=8)
    best = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=20)
    ok = table[table.fits & (table.tpot_ms <= 20)]
    assert best.tpot_ms <= 20 and best.fits
    assert best.tokens_per_s == ok.tokens_per_s.max()
    tight = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=5)
    assert tight.batch < best.batch  # a tighter latency budget forces a smaller batch
    assert planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=0.01) is None
    assert isinstance(table, pd.DataFrame)
