import pytest
import torch

from helpers import device


def test_cpu_by_name_and_by_environment(monkeypatch):
    assert device.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    assert device.pick_device() == torch.device("cpu")


def test_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_known_good", lambda: False)
    assert device.pick_device() == torch.device("cpu")


def test_unknown_device_names_the_fix():
    with pytest.raises(ValueError, match="COURSE_DEVICE"):
        device.pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(RuntimeError, match="T4 GPU"):
        device.pick_device("cuda")


def test_dtypes():
    cpu = torch.device("cpu")
    assert device.resolve_dtype("bf16", cpu) is torch.bfloat16
    assert device.resolve_dtype(torch.float16, cpu) is torch.float16
    assert device.serving_dtype(cpu) is torch.float32
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        device.resolve_dtype("fp64", cpu)


def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    with pytest.raises(ValueError, match="fp16 instead of bf16"):
        device.resolve_dtype("bf16", torch.device("cuda"))


def test_presets(monkeypatch):
    monkeypatch.delenv(device.PRESET_ENV, raising=False)
    assert device.preset(torch.device("cpu")).kind == "cpu"
    assert device.preset(torch.device("cpu"), override="gpu").kind == "gpu"
    monkeypatch.setenv(device.PRESET_ENV, "multi-gpu")
    assert device.preset(torch.device("cpu")).kind == "multi-gpu"
    with pytest.raises(ValueError, match="Unknown preset"):
        device.preset(torch.device("cpu"), override="huge")


def test_describe_reports_versions():
    info = device.describe(torch.device("cpu"))
    assert info["torch"] == torch.__version__
    assert int(info["cpu cores (logical)"]) >= 1


def test_cache_sizes_read_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate(
        [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
         (3, "Unified", "300M")]
    ):  # fmt: skip
        index = tmp_path / f"index{i}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    sizes = device.cache_sizes("cpu", root=tmp_path)
    assert sizes == {"L1": 48 * 2**10, "L2": 2 * 2**20, "L3": 300 * 2**20}
    assert device.cache_sizes("cpu", root=tmp_path / "missing") == {}


def test_load_note_warns_only_when_the_cores_are_busy(monkeypatch):
    monkeypatch.setattr(device.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(device.os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    assert "busy (load average 3.5 on 2 cores)" in device.load_note()
    monkeypatch.setattr(device.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert device.load_note() == ""
