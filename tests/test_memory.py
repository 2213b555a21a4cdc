import torch

from helpers import memory


def test_weight_bytes_of_a_linear_layer():
    layer = torch.nn.Linear(3, 4)  # 12 weights + 4 biases
    assert memory.weight_bytes(layer) == 16 * 4
    assert memory.weight_bytes(layer.to(torch.bfloat16)) == 16 * 2
    assert memory.param_count(layer) == 16


def test_tied_weights_count_once():
    emb = torch.nn.Embedding(10, 6)
    head = torch.nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert memory.weight_bytes(model) == 10 * 6 * 4


def test_buffers_only_when_asked():
    norm = torch.nn.BatchNorm1d(8)  # 16 parameters; running mean/var (16) + counter (1 int64)
    assert memory.weight_bytes(norm) == 16 * 4
    assert memory.weight_bytes(norm, include_buffers=True) == 16 * 4 + 16 * 4 + 8


def test_peak_memory_sees_a_temporary_allocation():
    size = 200 * 2**20
    with memory.PeakMemory("cpu") as peak:
        block = torch.ones(size // 4)  # touched, so resident
        del block
    assert peak.resettable  # Linux lets a process reset its own peak mark
    assert peak.increase_bytes >= 0.9 * size
    assert memory.rss_bytes() < peak.peak_bytes


def test_format_bytes():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(1536) == "1.5 KiB"
    assert memory.format_bytes(3 * 2**30) == "3.0 GiB"
