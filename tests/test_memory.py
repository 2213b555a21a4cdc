import pytest
import torch

from helpers import memory, shapes


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
    assert shapes.format_bytes(512) == "512 B"
    assert shapes.format_bytes(1536) == "1.5 KiB"
    assert shapes.format_bytes(3 * 2**30) == "3.0 GiB"


def test_shapes_match_published_parameter_counts():
    from tests.test_models import EXPECTED_PARAMS

    for name, params in EXPECTED_PARAMS.items():
        assert shapes.Shape.of(name).params == params


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_kv_formula_equals_real_cache_tensors(kv_heads):
    from helpers.decode import KVCache
    from helpers.models import llama_from_config

    model = llama_from_config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=50,
    )  # fmt: skip
    shape = shapes.Shape.of(model.config)
    cache = KVCache(model.config, batch=5, max_len=17, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes == shapes.kv_cache_bytes(shape, batch=5, context=17, bytes_per_value=2)
    assert cache.nbytes == 2 * 3 * 5 * 17 * kv_heads * 16 * 2


def test_llama_2_7b_serving_memory():
    shape = shapes.Shape.of("llama-2-7b")
    parts = shapes.serving_memory(shape, batch=1, context=4096, weight_bytes_per_param=2,
                                  value_bytes=2)  # fmt: skip
    assert parts["weights"] == 6_738_415_616 * 2  # 13.48 GB in fp16
    assert parts["kv_cache"] == 2 * 32 * 4096 * 4096 * 2  # 2 GiB: 0.5 MiB per token
    assert parts["logits"] == 32000 * 2  # only the last position's scores, in fp16
    split = shapes.serving_memory(shape, 1, 4096, 2, 2, tp=4)
    assert split["weights"] * 4 == parts["weights"] and split["kv_cache"] * 4 == parts["kv_cache"]
    with pytest.raises(ValueError, match="divide"):
        shapes.serving_memory(shapes.Shape.of("llama-3-8b"), 1, 128, 2, 2, tp=3)


class FakeDevice:
    """An allocator with a hard capacity: blocks are freed when garbage-collected, like tensors."""

    def __init__(self, capacity):
        self.capacity, self.held = capacity, 0

    def allocate(self, n):
        if self.held + n > self.capacity:
            raise torch.OutOfMemoryError(f"tried {n}, {self.capacity - self.held} free")
        self.held += n
        return Block(self, n)


class Block:
    def __init__(self, device, n):
        self.device, self.n = device, n

    def __del__(self):
        self.device.held -= self.n


@pytest.mark.parametrize("capacity", [1, 37, 1000, 4096])
def test_search_finds_the_exact_boundary_and_frees_everything(capacity):
    device = FakeDevice(capacity)

    def trial(batch):  # like a real trial: an allocation per sequence, held until it returns
        blocks = [device.allocate(1) for _ in range(batch)]
        blocks.append(device.allocate(0))

    result = memory.largest_fitting(trial, limit=10_000)
    assert result.largest == capacity
    assert device.held == 0  # nothing kept alive by the caught exceptions' frames
    assert (capacity, True) in result.tried and (capacity + 1, False) in result.tried


def test_search_reports_nothing_fits_and_respects_the_limit():
    assert memory.largest_fitting(lambda n: FakeDevice(0).allocate(n)).largest == 0
    assert memory.largest_fitting(lambda n: None, limit=100).largest == 100


def test_budget_exceeded_counts_as_out_of_memory():
    def trial(n):
        if n > 5:
            raise memory.BudgetExceeded("over budget")

    assert memory.largest_fitting(trial).largest == 5
