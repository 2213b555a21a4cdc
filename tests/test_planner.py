import dataclasses

import numpy as np
import pandas as pd
import pytest

from helpers import planner
from helpers.shapes import Shape, kv_cache_bytes, kv_value_bytes

LLAMA_2_7B_PARAMS = 6_738_415_616
EMBEDDING_7B = 32000 * 4096  # read one row per token, so not streamed


def ideal(name="a100-80gb-sxm"):
    """A datasheet GPU with a zero-overhead engine: pure first principles."""
    return planner.gpu_spec(name, planner.OverheadPreset("ideal"))


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
    engine = planner.OverheadPreset("planted", step_s=1e-3, layer_s=2e-5)
    with_overhead = planner.gpu_spec("a100-80gb-sxm", engine)
    a = planner.predict(model="llama-2-7b", gpu=ideal(), dtype="fp16", batch=1, new_tokens=8)
    b = planner.predict(model="llama-2-7b", gpu=with_overhead, dtype="fp16", batch=1, new_tokens=8)
    assert b.tpot_s - a.tpot_s == pytest.approx(1e-3 + 32 * 2e-5)
    assert b.decode.parts["overhead"] == pytest.approx(1e-3 + 32 * 2e-5)


def test_small_model_on_a_fast_gpu_is_overhead_bound():
    p = planner.predict(
        model="smollm2-135m", gpu=planner.gpu_spec("h200", "eager"), dtype="bf16", batch=1
    )
    assert p.bound == "overhead"


def test_compute_bound_at_large_batch():
    spec = ideal()
    p = planner.predict(
        model="llama-2-7b", gpu=spec, dtype="fp16", batch=4096, prompt_tokens=1, new_tokens=2
    )
    assert p.bound == "compute"
    linear = LLAMA_2_7B_PARAMS - EMBEDDING_7B
    assert p.decode.limits["compute"] == pytest.approx(2 * linear * 4096 / spec.flops, rel=0.01)


def test_nvlink_datasheet_figure_counts_both_directions():
    assert planner.gpu_spec("h100-sxm").link_bandwidth == pytest.approx(450e9)
    assert (
        planner.gpu_spec("t4").link == "pcie" and planner.gpu_spec("t4").link_bandwidth == 15.75e9
    )


def test_kaggle_two_t4_plans_over_pcie():
    best = planner.best_config("llama-2-7b", "t4", gpus=2, tpot_budget_ms=200)
    assert best is not None
    tp2 = planner.predict(model="llama-2-7b", gpu="t4", dtype="fp16", tp=2, batch=1)
    nvlink_t4 = dataclasses.replace(planner.gpu_spec("t4"), link_bandwidth=450e9)
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
    eager = [
        planner.predict(gpu=planner.gpu_spec("h100-sxm", "eager"), tp=t).tpot_s for t in (1, 8)
    ]
    ideal_ = [planner.predict(gpu=ideal("h100-sxm"), tp=t).tpot_s for t in (1, 8)]
    assert eager[0] / eager[1] < ideal_[0] / ideal_[1]  # fixed costs do not split over GPUs


VERSUS_PUBLISHED = planner.versus_published()
# Published rows the planner misses by more than 25 %, each with what the miss shows. They stay
# check rows (never tuned away): the test fails if one starts to fit, so the note gets revisited.
KNOWN_MISSES = {
    ("tensorrt-llm", "h100-sxm", "fp8-w8a8"): (
        "fp8 W8A8 on H100 with TensorRT-LLM v0.5/0.6.1: the published times imply matmul rates "
        "near the bf16 peak, not the planner's fp8 datasheet × 0.8 (too fast by ~30 %); on the "
        "L40S the same tables sit within 25 %"
    ),
}


def _published_case(r):
    reason = KNOWN_MISSES.get((r.source, r.gpu, r.dtype))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    ident = f"{r.source}-{r.model}-{r.gpu}-{r.dtype}-tp{r.tp}-b{r.batch}-{r.metric}-{r.Index}"
    return pytest.param(r, marks=marks, id=ident)


@pytest.mark.parametrize("row", [_published_case(r) for r in VERSUS_PUBLISHED.itertuples()])
def test_published_rows_within_25_percent(row):
    assert row.predicted == pytest.approx(row.published, rel=0.25)


def test_known_misses_are_check_rows_only():
    """A miss may be noted only on check rows; every calibration row is within 25 %."""
    calibration = VERSUS_PUBLISHED[VERSUS_PUBLISHED.role == "calibration"]
    assert (calibration.error.abs() <= 0.25).all()


def test_versus_published_puts_a_prediction_in_the_rows_unit():
    t = planner.published_results()
    r = t[(t.source == "gpt-fast") & (t.model == "llama-2-7b") & (t.dtype == "bf16") & (t.tp == 1)]
    r = r.iloc[0]
    assert r.metric == "tokens_per_s"  # gpt-fast reports one stream's tokens/s
    spec = planner.gpu_spec(r.gpu, r.engine)
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
    assert x.parts["matmuls"] == pytest.approx(
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
        planner.predict(dtype="fp6")
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
        planner.gpu_spec("h100-sxm", "turbo")
    p = planner.predict(model="llama-3-70b", gpu="t4", dtype="fp16")
    assert not p.fits and "raise tp" in p.reason


def test_best_config_respects_the_budget_and_maximises_throughput():
    table = planner.candidates("llama-2-7b", "h100-sxm", gpus=8)
    best = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=20)
    ok = table[table.fits & (table.tpot_ms <= 20)]
    assert best.tpot_ms <= 20 and best.fits
    assert best.tokens_per_s >= ok.tokens_per_s.max()  # its batch is not limited to the grid
    # the best batch stops where the budget or memory does: one more breaks what it names
    one_more = planner.predict(model="llama-2-7b", gpu="h100-sxm", dtype=best["dtype"], tp=best.tp,
                               batch=best.batch + 1, prompt_tokens=512, new_tokens=128)  # fmt: skip
    if best.stopped_by == "memory":
        assert not one_more.fits
    else:
        assert best.stopped_by == "latency target" and one_more.tpot_s * 1e3 > 20
    on_grid = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=20,
                                  batches=tuple(2**k for k in range(11)))  # fmt: skip
    assert on_grid.tokens_per_s == ok[ok.batch <= 1024].tokens_per_s.max()
    assert on_grid.stopped_by == "the grid"
    tight = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=5)
    assert tight.batch < best.batch  # a tighter latency budget forces a smaller batch
    assert planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=0.01) is None
    assert isinstance(table, pd.DataFrame)


# --- fp8, the KV cache's format, the bound label, the batch that memory or a budget stops ------


def test_fp8_weights_take_one_byte_and_w8a8_needs_fp8_tensor_cores():
    shape = Shape.of("llama-2-7b")
    fp16 = planner.predict(model="llama-2-7b", gpu="h100-sxm", dtype="fp16", batch=1)
    for dtype in ("fp8", "fp8-w8a8"):  # the same e4m3 weights; W8A8 also multiplies in fp8
        p = planner.predict(model="llama-2-7b", gpu="h100-sxm", dtype=dtype, batch=1)
        assert fp16.memory_per_gpu_bytes - p.memory_per_gpu_bytes == pytest.approx(shape.params)
    spec = ideal("h100-sxm")
    w8a16 = planner.step_time(shape, spec, "fp8", 1, 256, 1, 8)
    w8a8 = planner.step_time(shape, spec, "fp8-w8a8", 1, 256, 1, 8)
    linear = LLAMA_2_7B_PARAMS - EMBEDDING_7B
    assert w8a16.limits["memory"] == pytest.approx(w8a8.limits["memory"])
    assert w8a16.limits["memory"] == pytest.approx(
        (linear + kv_cache_bytes(shape, 256, 8, 2)) / spec.bandwidth
    )
    matmul_w8a8 = w8a8.limits["compute"] - w8a16.limits["compute"] + 2 * linear * 256 / spec.flops
    assert matmul_w8a8 == pytest.approx(2 * linear * 256 / spec.fp8_flops, rel=1e-6)
    assert spec.fp8_flops == pytest.approx(1979e12 * 0.8)  # dense datasheet × efficiency
    compiled = planner.gpu_spec("h100-sxm")
    p16 = planner.step_time(shape, compiled, "fp8", 1, 1, 1, 8).parts["dequantize"]
    assert p16 > 0  # widening fp8 to 16 bits costs work per weight
    assert planner.step_time(shape, compiled, "fp8-w8a8", 1, 1, 1, 8).parts["dequantize"] == 0
    for gpu in ("a100-80gb-sxm", "t4"):
        with pytest.raises(ValueError, match="no fp8 tensor cores.*dtype='fp8'"):
            planner.predict(gpu=gpu, dtype="fp8-w8a8")
        assert planner.predict(gpu=gpu, dtype="fp8").tpot_s > 0  # W8A16 runs there
    for gpu in ("h100-sxm", "h200", "l4", "l40s", "rtx-4090", "h100-pcie"):
        assert planner.gpu_spec(gpu).fp8_flops > planner.gpu_spec(gpu).flops


def test_kv_dtype_sets_the_cache_bytes():
    shape = Shape.of("llama-3-8b")  # 8 KV heads of 128
    assert kv_value_bytes("fp16", 128) == 2 and kv_value_bytes("fp8", 128) == 1
    assert kv_value_bytes("int8", 128) == 1 + 2 / 128  # one 16-bit scale per head and token
    base = planner.predict(model="llama-3-8b", gpu="h100-sxm", batch=8, prompt_tokens=4000,
                           new_tokens=96)  # fmt: skip
    per_token = 2 * 32 * 8 * 128  # values cached per token
    for kv, value_bytes in (("fp8", 1), ("int8", 1 + 2 / 128), ("fp32", 4)):
        p = planner.predict(model="llama-3-8b", gpu="h100-sxm", batch=8, prompt_tokens=4000,
                            new_tokens=96, kv_dtype=kv)  # fmt: skip
        saved = base.memory_per_gpu_bytes - p.memory_per_gpu_bytes
        assert saved == pytest.approx(8 * 4096 * per_token * (2 - value_bytes), abs=2)
    long = dict(model="llama-3-8b", gpu=ideal("h100-sxm"), batch=64, prompt_tokens=8000)
    fp16 = planner.predict(**long, new_tokens=2)
    fp8 = planner.predict(**long, new_tokens=2, kv_dtype="fp8")
    kv_s = kv_cache_bytes(shape, 64, 8001, 2) / ideal("h100-sxm").bandwidth
    assert fp16.decode.limits["memory"] - fp8.decode.limits["memory"] == pytest.approx(kv_s / 2)
    with pytest.raises(ValueError, match="Unknown kv_dtype"):
        planner.predict(kv_dtype="int4")


def test_the_bound_label_rule_on_hand_cases():
    # a slow measured rate below the ridge is still bandwidth: its floors decide, not its time
    assert planner.kernel(1.0, 0.5, measured_s=3.0) == (3.0, "memory")
    assert planner.kernel(0.2, 1.0) == (pytest.approx(1.2), "compute")  # datasheet: the sum
    assert planner.kernel(2.0, 1.0, measured_s=1.5) == (2.0, "memory")
    parts = {
        "matmuls": (3.0, "memory"),
        "attention": (0.5, "compute"),
        "overhead": (2.0, "overhead"),
    }
    assert planner.bound_of(parts) == "memory"
    parts["dequantize"] = (2.6, "compute")
    assert planner.bound_of(parts) == "compute"  # 0.5 + 2.6 > 3.0
    # batch 1 on a machine whose measured skinny rate is far below its peak: bandwidth-bound
    slow = dataclasses.replace(ideal(), linear_flops={1: 1e11, 64: 64e11})
    step = planner.step_time(Shape.of("llama-2-7b"), slow, "fp16", 1, 1, 1, 16)
    matmul_flops = 2 * (LLAMA_2_7B_PARAMS - EMBEDDING_7B)
    assert step.parts["matmuls"] == pytest.approx(matmul_flops / 1e11)  # slower than streaming
    assert step.bound == "memory"
    big = planner.step_time(Shape.of("llama-2-7b"), ideal(), "fp16", 1, 4096, 1, 16)
    assert big.bound == "compute"  # past the ridge (A100: 271e12 / 2039e9 ≈ 133 FLOP/byte)
    assert step.total_s == pytest.approx(sum(step.parts.values()))


def test_largest_batch_stops_at_memory_or_the_budget():
    args = dict(model="llama-2-7b", gpu="h100-sxm", dtype="fp16", prompt_tokens=512,
                new_tokens=128)  # fmt: skip
    batch, stop = planner.largest_batch(**args)
    assert stop == "memory"
    assert planner.predict(**args, batch=batch).fits
    assert not planner.predict(**args, batch=batch + 1).fits
    budget, stop = planner.largest_batch(**args, tpot_budget_ms=10)
    assert stop == "latency target" and budget < batch
    assert planner.predict(**args, batch=budget).tpot_s * 1e3 <= 10
    assert planner.predict(**args, batch=budget + 1).tpot_s * 1e3 > 10
    assert planner.largest_batch(**args, tpot_budget_ms=0.01) == (0, "latency target")
    table = planner.candidates("llama-2-7b", "h100-sxm", gpus=1, dtypes=("fp16",))
    assert table.batch.max() == planner.largest_batch(**args)[0]  # ends where memory does
    with pytest.raises(ValueError, match="no memory size"):
        planner.largest_batch(**{**args, "gpu": dataclasses.replace(ideal(), memory=0.0)})


def test_the_engine_presets_are_built_from_their_derivation_rows():
    derived = planner.derive_engines().set_index(["engine", "constant"]).value
    for name, preset in planner.engines().items():
        assert preset.layer_s == derived[name, "layer_s"]
        assert preset.allreduce_s == derived[name, "allreduce_s"]
        assert preset.dequant_flops["fp8"] == derived["compiled", "dequant_flops[int8]"]
    alphas = [derived["compiled", f"alpha_s[tp={t}]"] for t in (2, 4, 8)]
    slope, at_2 = np.polyfit([0, 2, 6], alphas, 1)
    assert derived["compiled", "allreduce_s"] == pytest.approx(at_2)
    assert planner.gpu is planner.gpu_spec  # the old name notebooks call


def test_implied_matmul_rate_recovers_the_rate_a_ttft_was_predicted_with():
    t = planner.published_results()
    row = t[(t.metric == "ttft_ms") & (t.gpu == "h100-sxm")].iloc[0].copy()
    spec = planner.gpu_spec(row.gpu, row.engine)
    p = planner.predict(model=row.model, gpu=spec, dtype=row["dtype"], tp=int(row.tp), batch=1,
                        prompt_tokens=int(row.prompt_tokens), kv_dtype=row.kv_dtype)  # fmt: skip
    row["value"] = p.ttft_s * 1e3  # a "published" time at exactly the planner's prediction
    assert planner.implied_matmul_rate(row) == pytest.approx(spec.fp8_flops, rel=1e-9)
    row["value"] = 1e-6
    with pytest.raises(ValueError, match="below the predicted rest"):
        planner.implied_matmul_rate(row)
    with pytest.raises(ValueError, match="ttft_ms row"):
        planner.implied_matmul_rate(t[t.metric == "tokens_per_s"].iloc[0])
