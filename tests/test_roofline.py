import pandas as pd
import pytest
import torch

from helpers import roofline


def test_roofline_arithmetic():
    peak, bw = 100e12, 2e12  # ridge at 50 FLOP/byte
    assert roofline.ridge_point(peak, bw) == 50
    assert roofline.attainable_flops(10, peak, bw) == 20e12  # memory-bound
    assert roofline.attainable_flops(50, peak, bw) == peak
    assert roofline.attainable_flops(1000, peak, bw) == peak  # compute-bound


def test_matmul_flops_and_intensity():
    assert roofline.matmul_flops(2, 3, 4) == 48
    # square fp32 n×n: 2n³ FLOPs over 3n² elements of 4 bytes = n/6 FLOP/byte
    assert roofline.matmul_intensity(600, 600, 600, 4) == pytest.approx(100)
    # a matrix-vector product in fp32 does ~0.5 FLOP per byte of matrix
    assert roofline.matmul_intensity(1, 4096, 4096, 4) == pytest.approx(0.5, rel=1e-3)


def test_ceilings_take_the_best_measurement(tmp_path):
    df = pd.DataFrame(
        [
            ("matmul", "fp32", 1e11, ""),
            ("matmul", "fp32", 3e11, ""),
            ("matmul", "bf16", 9e11, "emulated"),
            ("read", "bytes", 2e10, ""),
            ("copy", "bytes", 1e10, ""),
        ],
        columns=["ceiling", "dtype", "value", "note"],
    )
    c = roofline.Ceilings.from_frame(df, "cpu")
    assert c.matmul_flops == {"bf16": 9e11, "fp32": 3e11}
    assert (c.read_bandwidth, c.copy_bandwidth, c.host_to_device) == (2e10, 1e10, None)
    assert c.notes == {"bf16": "emulated"}
    assert roofline.Ceilings.load(c.save(tmp_path / "c.json")) == c


def test_measured_rows_are_consistent():
    cpu = torch.device("cpu")
    read = roofline.measure_read(cpu, 8 * 2**20, repeats=3)
    assert read["low"] <= read["value"] <= read["high"]
    assert read["value"] == pytest.approx(8 * 2**20 / read["median_s"])
    mm = roofline.measure_matmul(cpu, torch.float32, 64, repeats=3)
    assert mm["value"] == pytest.approx(2 * 64**3 / mm["median_s"])
