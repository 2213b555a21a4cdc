"""CUDA paths of the helpers, checked against known answers. Skipped on machines without CUDA."""

import statistics
import time

import pytest
import torch

from helpers import bench, decode, device, memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MiB = 2**20


def test_event_timing_agrees_with_synchronised_wall_clock():
    a = torch.randn(4096, 4096, device="cuda")
    events = bench.measure(lambda: a @ a, repeats=10, device="cuda")
    walls = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    assert 0.5 < events.median / statistics.median(walls) < 1.5


def test_allocator_counts_exact_bytes_and_caches_them():
    torch.cuda.empty_cache()
    before = memory.gpu_memory()
    block = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    during = memory.gpu_memory()
    assert during["allocated"] - before["allocated"] == 256 * MiB
    assert during["reserved"] >= during["allocated"]
    assert during["peak_allocated"] >= during["allocated"]
    del block
    after = memory.gpu_memory()
    assert after["allocated"] == before["allocated"]
    assert after["reserved"] == during["reserved"]  # freed to the cache, not to the driver


def test_device_wide_view_includes_the_allocator():
    view = memory.device_memory(torch.cuda.current_device())
    assert view is not None, "nvidia-ml-py could not read the GPU"
    assert view["used"] >= torch.cuda.memory_reserved()
    props = torch.cuda.get_device_properties(0)
    assert abs(view["total"] - props.total_memory) / view["total"] < 0.05


def test_peak_memory_on_gpu():
    with memory.PeakMemory("cuda") as peak:
        block = torch.ones(64 * MiB // 4, device="cuda")
        del block
    assert peak.increase_bytes == 64 * MiB


def test_decode_on_gpu_equals_generate(tiny_llama):
    model = tiny_llama.to("cuda")
    ids = torch.randint(0, 97, (2, 5), device="cuda")
    ours = decode.greedy_decode(model, ids, 10)
    ref = model.generate(
        ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0
    )
    assert torch.equal(ours.tokens, ref[:, 5:])
    tiny_llama.to("cpu")


def test_describe_and_dtypes_on_gpu():
    cuda = torch.device("cuda")
    assert "gpu" in device.describe(cuda)
    assert device.serving_dtype(cuda) in (torch.bfloat16, torch.float16)
    assert device.pick_device("auto").type == "cuda"


def test_cuda_graph_decode_equals_eager(tiny_llama):
    model = tiny_llama.to("cuda")
    ids = torch.randint(0, 97, (2, 5), device="cuda")
    eager = decode.greedy_decode(model, ids, 12)
    graph = decode.greedy_decode(model, ids, 12, compiled=True)
    assert graph.mode == "cuda graph"
    assert torch.equal(eager.tokens, graph.tokens)
    tiny_llama.to("cpu")


def test_overhead_measurements_on_gpu():
    from helpers import overhead

    ops = overhead.op_overhead("cuda", repeats=3, ops=50)
    assert list(ops.name) == ["tiny op, back to back", "launch + synchronize"]
    assert (ops.seconds_per_op > 0).all()
