import pytest

from helpers import planner
from helpers.memory import Shape, kv_cache_bytes

LLAMA_2_7B_PARAMS = 6_738_415_616


def a100():
    return planner.published_gpus()["a100-80gb-sxm"]


def test_memory_is_weights_plus_cache_plus_activations():
    p = planner.predict("llama-2-7b", "a100-80gb-sxm", "fp16", batch=1, prompt_tokens=100,
                        new_tokens=28)  # fmt: skip
    shape = Shape.of("llama-2-7b")
    kv = kv_cache_bytes(shape, 1, 128, 2)
    activations = 100 * (2 * 4096 + 3 * 11008) * 2
    weights = p.memory_per_gpu_bytes - kv - activations - planner.RUNTIME_RESERVE_BYTES
    assert weights == pytest.approx(LLAMA_2_7B_PARAMS * 2)  # 13.48 GB in fp16
    assert kv == 2 * 32 * 128 * 4096 * 2


def test_batch_1_decode_is_weight_bytes_over_bandwidth():
    p = planner.predict("llama-2-7b", "a100-80gb-sxm", "fp16", batch=1, prompt_tokens=1,
                        new_tokens=2)  # fmt: skip
    assert p.bound == "memory"
    floor = LLAMA_2_7B_PARAMS * 2 / a100().bandwidth
    assert p.tpot_s == pytest.approx(floor, rel=1e-3)  # the KV cache of 2 tokens is negligible


def test_compute_bound_at_large_batch():
    p = planner.predict("llama-2-7b", "a100-80gb-sxm", "fp16", batch=4096, prompt_tokens=1,
                        new_tokens=2)  # fmt: skip
    assert p.bound == "compute"
    assert p.tpot_s == pytest.approx(2 * LLAMA_2_7B_PARAMS * 4096 / a100().flops, rel=0.01)


def test_monotonic_in_batch_and_tp():
    tpot = [planner.predict(batch=b).tpot_s for b in (1, 2, 8, 32, 128)]
    rate = [planner.predict(batch=b).tokens_per_s for b in (1, 2, 8, 32, 128)]
    assert tpot == sorted(tpot) and rate == sorted(rate)
    by_tp = [planner.predict(gpu="h100-sxm", tp=t).tpot_s for t in (1, 2, 4, 8)]
    assert by_tp == sorted(by_tp, reverse=True)
    per_gpu = [planner.predict(gpu="h100-sxm", tp=t, batch=64).tokens_per_s / t for t in (1, 2, 4)]
    assert per_gpu == sorted(per_gpu, reverse=True)  # smaller TP: more throughput per GPU


def test_bad_input():
    with pytest.raises(ValueError, match="known:"):
        planner.predict(model="gpt-9")
    with pytest.raises(ValueError, match="Unknown GPU"):
        planner.predict(gpu="tpu-v5")
    with pytest.raises(ValueError, match="does not divide"):
        planner.predict(model="llama-3-8b", tp=3)
    with pytest.raises(ValueError, match="Unknown dtype"):
        planner.predict(dtype="fp8")
    p = planner.predict(model="llama-3-70b", gpu="t4", dtype="fp16")
    assert not p.fits and "raise tp" in p.reason


def test_best_config_respects_the_budget_and_maximises_throughput():
    table = planner.candidates("llama-2-7b", "h100-sxm", gpus=8)
    best = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=20)
    ok = table[table.fits & (table.tpot_ms <= 20)]
    assert best.tpot_ms <= 20 and best.fits
    assert best.tokens_per_s == ok.tokens_per_s.max()
    tight = planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=3)
    assert tight.batch < best.batch  # a tighter latency budget forces a smaller batch
    assert planner.best_config("llama-2-7b", "h100-sxm", gpus=8, tpot_budget_ms=0.01) is None
