import pytest
import torch

from helpers import memory, memory_timing, shapes
from helpers.device import last_level_cache, streamed_size


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
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=50,
    )
    shape = shapes.Shape.of(model.config)
    cache = KVCache(model.config, batch=5, max_len=17, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes == shapes.kv_cache_bytes(shape, batch=5, context=17, bytes_per_value=2)
    assert cache.nbytes == 2 * 3 * 5 * 17 * kv_heads * 16 * 2


def test_llama_2_7b_serving_memory():
    shape = shapes.Shape.of("llama-2-7b")
    parts = shapes.serving_memory(
        shape, batch=1, context=4096, weight_bytes_per_param=2, value_bytes=2
    )
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


@pytest.mark.parametrize("guess", [1, 36, 37, 38, 200, 10_000])
def test_search_from_a_guess_finds_the_same_boundary(guess):
    capacity = 37
    result = memory.largest_fitting(lambda n: FakeDevice(capacity).allocate(n), guess=guess)
    assert result.largest == capacity
    assert (capacity, True) in result.tried and (capacity + 1, False) in result.tried
    if guess == capacity:
        assert len(result.tried) == 2  # a right guess: it fits, one more does not
    assert memory.largest_fitting(lambda n: FakeDevice(0).allocate(n), guess=guess).largest == 0


def test_search_reports_nothing_fits_and_respects_the_limit():
    assert memory.largest_fitting(lambda n: FakeDevice(0).allocate(n)).largest == 0
    assert memory.largest_fitting(lambda n: None, limit=100).largest == 100


def test_budget_exceeded_counts_as_out_of_memory():
    def trial(n):
        if n > 5:
            raise memory.BudgetExceeded("over budget")

    assert memory.largest_fitting(trial).largest == 5


# --- The one-call readings notebook 02 uses (CPU here; the GPU branches run on a lent GPU) ----


def test_in_use_and_runtime_bytes_on_cpu():
    assert memory.in_use_bytes("cpu") > 0
    assert memory.runtime_bytes("cpu") > 0


def test_reconcile_computes_the_error_and_readable_formats_bytes():
    table = memory.reconcile({"runtime": (None, 10 * 2**20), "weights": (100, 125)})
    assert table.loc["weights", "error"] == pytest.approx(0.25)
    assert table.loc["runtime", "error"] != table.loc["runtime", "error"]  # NaN: no prediction
    shown = memory.readable(table)
    assert shown.loc["runtime", "predicted"] == "—"
    assert shown.loc["runtime", "measured"] == "10.0 MiB"
    assert shown.loc["weights", "error"] == "+25.0%" and shown.loc["runtime", "error"] == "—"


def test_peak_added_bytes_sees_live_tensors_not_freed_ones():
    size = 64 * 2**20

    def one_block():
        torch.ones(size // 4)  # touched, then freed at once

    def two_blocks_alive():
        a = torch.ones(size // 4)
        b = torch.ones(size // 4)
        del a, b

    one = memory.peak_added_bytes(one_block)
    two = memory.peak_added_bytes(two_blocks_alive)
    assert 0.9 * size <= one <= 1.2 * size
    assert 1.8 * size <= two <= 2.3 * size


def test_time_interleaved_runs_each_variant_every_round_and_restores_threads():
    order = []
    threads = torch.get_num_threads()
    table = memory.time_interleaved(
        {
            "a": lambda: order.append(("a", torch.get_num_threads())),
            "b": lambda: order.append(("b", 0)),
        },
        repeats=3,
        threads=1,
    )
    assert [name for name, _ in order] == ["a", "b"] * 4  # a warm-up of each, then 3 rounds
    assert {n for name, n in order if name == "a"} == {1}
    assert torch.get_num_threads() == threads
    assert list(table.index) == ["a", "b"] and (table.repeats == 3).all()


def test_first_touch_cost_sees_faults_on_fresh_pages():
    cost = memory.first_touch_cost(32 * 2**20, repeats=3)
    if cost is None:
        pytest.skip("no page-fault count on this platform")
    assert cost["faults"] >= 32 * 2**20 / (2 * 2**20)  # ≥ 1 per page, 4 KiB or 2 MiB
    assert cost["first_s"] > 0 and cost["per_fault_s"] >= 0


def test_peak_and_time_returns_both_per_run():
    table = memory.peak_and_time({"alloc": lambda: torch.ones(2**22)}, repeats=2)
    row = table.loc["alloc"]
    assert row.q1_s <= row.median_s <= row.q3_s
    assert row.timing.median == row.median_s
    assert row.peak_bytes >= 0.9 * 2**24


def test_search_frontier_finds_what_the_formula_predicts():
    per_token = 2**14  # a request holds batch × context × 16 KiB while it runs

    def request(batch, context):
        torch.ones(batch * context * per_token // 4)

    def need(batch, context):
        return batch * context * per_token

    frontier = memory.search_frontier(request, need, [64, 256], budget=48 * 2**20, limit=256)
    assert list(frontier.predicted) == [48, 12]
    assert (frontier.found - frontier.predicted).abs().max() <= 1  # the process' own noise
    assert (frontier.need_measured / frontier.need_predicted - 1).abs().max() < 0.1


def test_recorded_views_without_a_gpu():
    from helpers import DATA_DIR

    view = memory.allocator_view("cpu", DATA_DIR / "measured" / "h200_memory.csv")
    assert len(view) == 4 and view.source.iloc[0].startswith("recorded: NVIDIA H200")
    called = []
    timeline = memory.allocator_timeline(
        lambda: called.append(1), "cpu", DATA_DIR / "measured" / "h200_allocator_timeline.csv"
    )
    assert not called and timeline.live_bytes.max() > 0
    assert memory.copy_beside_compute("cpu") is None


def test_bandwidth_at_reads_one_ceiling_or_says_not_measured():
    import pandas as pd

    rows = pd.DataFrame([{"ceiling": "copy", "size": 1024, "value": 2e9, "low": 1e9, "high": 3e9}])
    assert memory.bandwidth_at(rows, "copy", 1024) == (2.0, (1.0, 3.0))
    value, spread = memory.bandwidth_at(rows, "host→device pinned", 1024)
    assert value != value and spread is None


def test_live_tensor_bytes_counts_what_lives_not_what_was_allocated():
    layer = torch.ones(4, 3, 96, 64)  # made before: not counted
    token = torch.ones(4, 3, 1, 64)
    one_layer = layer.nbytes

    def grow(rebuild):  # 10 layers grown by 2 tokens: dropping the old copy at once, or not
        cache = [layer.clone() for _ in range(10)]
        for _ in range(2):
            if rebuild:
                cache = [torch.cat([t, token], dim=2) for t in cache]
            else:
                for i in range(len(cache)):
                    cache[i] = torch.cat([cache[i], token], dim=2)

    final = 10 * (one_layer + 2 * token.nbytes)
    with memory.PeakMemory("cpu", tensors=True) as dropped:
        grow(rebuild=False)
    with memory.PeakMemory("cpu", tensors=True) as kept:
        grow(rebuild=True)
    assert dropped.increase_bytes == final + one_layer + token.nbytes  # + the one old copy
    assert kept.increase_bytes == final + 10 * (one_layer + token.nbytes)  # + every old copy
    with memory.LiveTensorBytes() as live:
        view = layer[:, :, :10]  # a view of a known storage adds nothing
        view.add_(1)
    assert live.peak_bytes == 0


def test_tensor_bytes_of_a_dtensor_is_its_local_shard(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = distribute_tensor(torch.ones(8, 4), mesh, [Shard(0)])
        assert memory.tensor_bytes(sharded) == 8 * 4 * 4  # one rank holds it all
    finally:
        dist.destroy_process_group()


def test_live_at_peak_sees_what_is_live_by_op():
    def run():
        keep = torch.ones(2**18)  # 1 MiB, live to the end
        temp = torch.zeros(2**19)  # 2 MiB, freed before the next allocation
        del temp
        other = torch.ones(2**17) * 2  # 0.5 MiB (ones) freed; the product (mul) stays
        return keep, other

    peak = memory.live_at_peak(run)
    assert peak.peak_bytes == 3 * 2**20  # keep + temp
    live = dict(zip(peak.by_op.op, peak.by_op.bytes, strict=True))
    assert live == {"aten::ones": 2**20, "aten::zeros": 2 * 2**20}
    assert "aten::mul" in peak.ops


def test_minor_faults_counts_fresh_pages():
    faults = memory.minor_faults(lambda: torch.ones(64 * 2**20 // 4))  # 64 MiB: a fresh mapping
    assert faults is None or faults >= 64 * 2**20 / (2 * 2**20)  # ≥ 1 per page, 4 KiB or 2 MiB


def test_search_frontier_says_what_it_searched_on_a_cpu():
    frame = memory.search_frontier(lambda b, c: None, lambda b, c: b * c, [4], 64)
    assert frame.attrs["limit"].startswith("a budget")


def test_check_accepts_a_stated_unit(capsys):
    from helpers.exercises import check

    assert check("q", 4.0, 4.0)  # backward compatible: no unit
    assert check("q", 4.294967296, 4.0, unit="GB", expected_unit="GiB")  # 4 GiB in GB
    assert check("q", 4.0, 4.0, unit="GiB", expected_unit="GiB")
    assert not check("q", 4.0, 4.0, unit="GB", expected_unit="GiB")  # the number in the wrong unit
    assert check("batch", 33, {"GB": 30, "GiB": 33}, rtol=0, unit="GiB")
    assert not check("batch", 33, {"GB": 30, "GiB": 33}, rtol=0, unit="GB")
    with pytest.raises(ValueError, match="state the unit"):
        check("batch", 30, {"GB": 30, "GiB": 33}, rtol=0)
    with pytest.raises(ValueError, match="unknown unit"):
        check("q", 1.0, 1.0, unit="gigs", expected_unit="GiB")
    assert "expected about 4.295 GB" in capsys.readouterr().out


def test_check_says_the_unit_belongs_to_the_budget(capsys):
    from helpers.exercises import check

    assert check("batch", 30, {"GB": 30, "GiB": 33}, rtol=0, unit="GB", unit_of="the budget")
    assert not check("batch", 30, {"GB": 30, "GiB": 33}, rtol=0, unit="GiB", unit_of="the budget")
    out = capsys.readouterr().out
    assert "you gave 30 (with the budget read as GB)" in out
    assert "expected about 33 (with the budget read as GiB)" in out
    assert "30 GB" not in out  # a batch has no unit


def test_copy_sweep_reaches_past_the_last_level_cache():
    sweep = memory.copy_sweep(repeats=2)
    assert sweep["size"].iloc[0] == 256 * 2**10 and sweep["size"].is_monotonic_increasing
    top = min(streamed_size("cpu", 64 * 2**20, buffers=2)[0], 128 * 2**20)  # most_bytes / 2
    assert sweep["size"].iloc[-1] == top and (sweep.value > 0).all()
    assert sweep.attrs["streamed"] == (2 * top >= 2 * last_level_cache("cpu"))
    assert set(sweep.ceiling) == {"copy"}


def test_copy_sweep_stays_within_its_memory_on_a_huge_cache(monkeypatch):
    huge = 480 * 2**20  # a 480 MiB L3: streaming past it would take ~1 GiB of buffers
    monkeypatch.setattr(memory_timing, "last_level_cache", lambda device=None: huge)
    monkeypatch.setattr(memory_timing, "streamed_size", lambda d, at_least, buffers: (huge, True))
    sweep = memory.copy_sweep(repeats=1, most_bytes=4 * 2**20)
    assert sweep["size"].max() == 2 * 2**20  # two buffers of 2 MiB: the cap, not the cache
    assert sweep.attrs["streamed"] is False
