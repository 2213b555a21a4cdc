import time
from types import SimpleNamespace

import pytest
import torch

from helpers import overhead, profile
from helpers.shapes import Shape


def test_categories_of_known_operations():
    assert profile.category("aten::mm") == profile.MATMULS
    assert profile.category("aten::_weight_int4pack_mm_for_cpu") == profile.MATMULS
    assert profile.category("aten::_scaled_dot_product_flash_attention_for_cpu") == (
        profile.ATTENTION
    )
    assert profile.category("aten::scaled_dot_product_attention") == profile.FRAMEWORK
    assert profile.category("aten::index_copy_") == profile.MOVEMENT
    assert profile.category("aten::transpose") == profile.FRAMEWORK
    assert profile.category("aten::rsqrt") == profile.ELEMENTWISE


def test_the_categories_add_up_to_the_profiled_step():
    x = torch.randn(64, 64)
    ops = profile.op_table(lambda: (x @ x).relu().sum(), repeats=3)
    parts = profile.breakdown(ops)
    assert list(parts.category) == list(profile.CATEGORIES)
    assert parts.measured_s.sum() == pytest.approx(ops.attrs["profiled_s"], rel=1e-9)
    assert parts.share.sum() == pytest.approx(1.0)
    assert ops.calls[ops.op == "aten::mm"].item() == 1  # per call of the function


def _spin(seconds) -> float:
    start = time.perf_counter()
    while time.perf_counter() < start + seconds:
        pass
    return time.perf_counter() - start  # ≥ seconds: longer if the process was preempted


def test_the_time_between_ops_recovers_a_planted_per_op_cost():
    x, planted, n, spun = torch.zeros(1), 300e-6, 40, []

    def loop():  # n tiny ops, each after `planted` seconds (at least) of Python
        for _ in range(n):
            spun.append(_spin(planted))
            x.add_(1.0)

    ops = profile.op_table(loop, repeats=3, warmup=0)
    parts = profile.breakdown(ops).set_index("category")
    per_op = parts.measured_s[profile.PYTHON] / parts.calls[profile.PYTHON]
    profiled_spin = sum(spun[-3 * n :]) / (3 * n)  # what was really planted in the profiled runs
    base = profile.per_op_costs()["python_s"]
    assert parts.calls[profile.PYTHON] == n
    assert per_op - base == pytest.approx(profiled_spin, rel=0.2)
    assert profiled_spin >= planted


def test_decode_prediction_counts_bytes_rates_and_ops():
    model = overhead.tiny_llama(2, "cpu")
    ops = profile.decode_step_ops(model, batch=1, context=16, repeats=2)
    shape = Shape.of(model.config)
    ceilings = SimpleNamespace(read_bandwidth=1e9, linear_flops={1: 1e15}, peak=lambda dt: 1e15)
    costs = {"aten_s": 1e-6, "python_s": 2e-6}
    predicted = profile.predict_decode_step(model, ops, ceilings, costs, batch=1, context=16)
    matmul_calls = ops[ops.category == profile.MATMULS].calls.sum()
    weights = profile.decode_read_bytes(model)
    assert predicted[profile.MATMULS] == pytest.approx(weights / 1e9 + matmul_calls * 1e-6)
    kv = 2 * shape.layers * 16 * shape.kv_heads * shape.head_dim * 4
    attention_calls = ops[ops.category == profile.ATTENTION].calls.sum()
    assert predicted[profile.ATTENTION] == pytest.approx(kv / 1e9 + attention_calls * 1e-6)
    assert predicted[profile.PYTHON] == pytest.approx(ops.top_calls.sum() * 2e-6)
    slow = SimpleNamespace(read_bandwidth=1e12, linear_flops={1: 1e6}, peak=lambda dt: 1e6)
    by_flops = profile.predict_decode_step(model, ops, slow, costs, batch=1, context=16)
    flops = 2 * shape.linear_params
    assert by_flops[profile.MATMULS] == pytest.approx(flops / 1e6 + matmul_calls * 1e-6)


def test_decode_reads_one_embedding_row_unless_the_table_is_the_output_layer():
    model = overhead.tiny_llama(1, "cpu")
    table = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is table
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    all_bytes = sum(t.numel() * t.element_size() for t in tensors)
    expected = all_bytes if tied else all_bytes - table.numel() * 4
    assert profile.decode_read_bytes(model) == expected


def test_op_table_refuses_what_it_cannot_call():
    with pytest.raises(TypeError, match="function"):
        profile.op_table(42)
    with pytest.raises(ValueError, match="op_table"):
        profile.breakdown(__import__("pandas").DataFrame())
