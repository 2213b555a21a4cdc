import pandas as pd
import pytest
import torch

from helpers import device, roofline


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
    assert read["size"] >= 8 * 2**20  # grown past the cache where this machine has one
    assert read["value"] == pytest.approx(read["size"] / read["median_s"])
    mm = roofline.measure_matmul(cpu, torch.float32, 64, repeats=3)
    assert mm["value"] == pytest.approx(2 * 64**3 / mm["median_s"])


def test_streamed_buffers_exceed_twice_the_last_level_cache(monkeypatch):
    llc = 100 * 2**20  # twice it fits within the cap
    monkeypatch.setattr(device, "last_level_cache", lambda device: llc)
    each, beyond = device.streamed_size("cpu", 256 * 2**20)
    assert each >= 2 * llc and beyond
    each, beyond = device.streamed_size("cpu", 256 * 2**20, buffers=2)  # a copy: src + dst
    assert 2 * each >= 2 * llc and beyond
    monkeypatch.setattr(device, "last_level_cache", lambda device: 2**30)  # beyond the cap
    each, beyond = device.streamed_size("cpu", 256 * 2**20)
    assert each == device.STREAM_CAP_BYTES and not beyond
    monkeypatch.setattr(device, "last_level_cache", lambda device: 0)  # unknown caches
    assert device.streamed_size("cpu", 8 * 2**20) == (8 * 2**20, True)


def test_native_means_faster_than_fp32_as_measured():
    df = pd.DataFrame(
        [("matmul", "fp32", 2e11), ("matmul", "bf16", 5e11), ("matmul", "fp16", 4e10),
         ("read", "bytes", 2e10)],
        columns=["ceiling", "dtype", "value"],
    )  # fmt: skip
    notes = roofline.native_notes(df)
    assert notes["bf16"].startswith("native: 2.5×")
    assert notes["fp16"].startswith("emulated: 0.20×")
    assert set(notes) == {"fp32", "bf16", "fp16"} and all(notes.values())


def test_read_sweep_gives_one_row_per_size_and_the_sizes_span_the_caches(monkeypatch):
    monkeypatch.setattr(roofline, "last_level_cache", lambda device: 32 * 2**20)
    sizes = roofline.read_sweep_sizes("cpu", working_set=100 * 2**20)
    assert sizes[0] == 256 * 2**10 and max(sizes) >= 2 * 32 * 2**20 and 100 * 2**20 in sizes
    monkeypatch.setattr(roofline, "last_level_cache", lambda device: 100 * 2**20)
    assert max(roofline.read_sweep_sizes("cpu")) == 256 * 2**20  # past its L3, at least 256 MiB
    monkeypatch.setattr(roofline, "last_level_cache", lambda device: 480 * 2**20)  # the Xeon's
    assert max(roofline.read_sweep_sizes("cpu")) == device.STREAM_CAP_BYTES  # Binder's memory
    df = roofline.read_sweep("cpu", [2**18, 2**20], repeats=3)
    assert list(df.bytes) == [2**18, 2**20]
    assert (df.bandwidth > 0).all() and (df.low <= df.high).all()
