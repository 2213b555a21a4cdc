import numpy as np
import pytest
import torch

from helpers import device, overhead, roofline


def test_fit_line_recovers_planted_constants():
    layers = np.array([1, 8, 16, 30])
    noise = np.array([1, -1, 1, -1]) * 1e-6
    fit = overhead.fit_line(layers, 1.5e-3 + 3e-4 * layers + noise)
    assert fit.intercept == pytest.approx(1.5e-3, rel=0.01)
    assert fit.slope == pytest.approx(3e-4, rel=0.01)
    with pytest.raises(ValueError, match="two or more"):
        overhead.fit_line([4, 4], [1.0, 2.0])


def test_op_overhead_is_per_operation():
    df = overhead.op_overhead("cpu", repeats=3, ops=50)
    row = df.iloc[0]
    assert row.seconds_per_op == pytest.approx(row.median_s / 50)
    assert 0 < row.seconds_per_op < 1e-3  # a tiny op costs microseconds, not milliseconds


def test_step_overhead_grows_with_layers():
    # 24 layers dispatch ~24x the operations of one: the deeper model's lower quartile must clear
    # the shallow one's upper quartile. Another program on the same cores can stretch one run's
    # steps, so the comparison gets three tries; a step time that ignored the layers fails all.
    for _ in range(3):
        df = overhead.step_overhead("cpu", layer_counts=(1, 24))
        assert list(df.layers) == [1, 24]
        shallow, deep = df.iloc[0], df.iloc[1]
        if deep.q1_s > shallow.q3_s:
            return
    pytest.fail(
        f"24 layers' step (q1 {deep.q1_s:.2e} s) not above 1 layer's (q3 {shallow.q3_s:.2e} s)"
    )


def test_linear_rates_count_the_flops_over_weights_beyond_the_cache(monkeypatch):
    monkeypatch.setattr(device, "last_level_cache", lambda device: 2**20)  # a 1 MiB cache
    df = overhead.linear_rates("cpu", batches=(1, 4), width=128, total_bytes=1e5, repeats=2)
    count = int(2 * 2**20 // (128 * 128 * 4))  # grown to 2× the cache: 32 weights
    assert list(df.flops) == [2 * b * 128 * 128 * count for b in (1, 4)]
    assert (df.weight_bytes >= 2 * 2**20).all()
    assert (df.flops_per_s == df.flops / df.median_s).all()


def test_ceilings_are_keyed_by_machine(tmp_path, monkeypatch):
    path = roofline.saved_path("cpu")
    assert roofline.machine_key(torch.device("cpu")) in path.name
    monkeypatch.setattr(roofline.torch, "__version__", "0.0.0-another")
    assert roofline.saved_path("cpu") != path  # another torch never reads these ceilings


def test_ceilings_round_trip_with_overhead(tmp_path):
    c = roofline.Ceilings("cpu", {"fp32": 1e11}, 2e10, 1e10, op_overhead_s=5e-6,
                          step_overhead_s=1e-3, layer_overhead_s=3e-4,
                          linear_flops={1: 5e9, 64: 1e11})  # fmt: skip
    back = roofline.Ceilings.load(c.save(tmp_path / "c.json"))
    assert back == c and back.linear_flops[64] == 1e11
