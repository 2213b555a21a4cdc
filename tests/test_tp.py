import multiprocessing
import time

import pytest
import torch
import torch.nn.functional as F

from helpers import tp, tp_workers

torch.manual_seed(0)


def weights(hidden=32, intermediate=64):
    return (torch.randn(intermediate, hidden) / hidden**0.5,
            torch.randn(intermediate, hidden) / hidden**0.5,
            torch.randn(hidden, intermediate) / intermediate**0.5)  # fmt: skip


def mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_column_split_concatenates_and_row_split_sums(world):
    x, w = torch.randn(5, 32), torch.randn(48, 32)
    cols = [F.linear(x, tp.column_shard(w, r, world)) for r in range(world)]
    torch.testing.assert_close(torch.cat(cols, dim=-1), F.linear(x, w))
    x_parts = x.chunk(world, dim=-1)
    rows = [F.linear(x_parts[r], tp.row_shard(w, r, world)) for r in range(world)]
    torch.testing.assert_close(sum(rows), F.linear(x, w))


@pytest.mark.parametrize("world", [2, 4])
def test_megatron_mlp_partials_sum_to_the_full_layer(world):
    gate, up, down = weights()
    x = torch.randn(3, 32)
    partials = [
        mlp(x, tp.column_shard(gate, r, world), tp.column_shard(up, r, world),
            tp.row_shard(down, r, world))
        for r in range(world)
    ]  # fmt: skip
    torch.testing.assert_close(sum(partials), mlp(x, gate, up, down))


def test_attention_split_by_heads_equals_full():
    heads, head_dim, hidden, world = 4, 8, 32, 2
    wq, wk, wv, wo = (torch.randn(hidden, hidden) / hidden**0.5 for _ in range(4))
    x = torch.randn(1, 6, hidden)

    def attention(x, wq, wk, wv, wo):
        b, t, _ = x.shape
        q, k, v = (F.linear(x, w).view(b, t, -1, head_dim).transpose(1, 2) for w in (wq, wk, wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(b, t, -1), wo)

    full = attention(x, wq, wk, wv, wo)
    split = sum(
        attention(x, *(tp.column_shard(w, r, world) for w in (wq, wk, wv)),
                  tp.row_shard(wo, r, world))
        for r in range(world)
    )  # fmt: skip
    torch.testing.assert_close(split, full)
    assert heads % world == 0


def test_two_gloo_processes_equal_one():
    gate, up, down = weights()
    x = torch.randn(3, 32)
    outs = tp.launch(tp_workers.megatron_mlp, 2, gate, up, down, x, backend="gloo")
    for out in outs:
        torch.testing.assert_close(out, mlp(x, gate, up, down))


def fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("planted failure")
    time.sleep(30)  # rank 0 would wait: the launcher must stop it


def sleeps(rank, world):
    time.sleep(60)


def test_failing_worker_surfaces_and_nothing_outlives_it():
    start = time.perf_counter()
    with pytest.raises(tp.WorkerError, match=r"rank 1 of 2 failed(.|\n)*planted failure"):
        tp.launch(fails_on_rank_1, 2, backend="gloo")
    assert time.perf_counter() - start < 25
    assert multiprocessing.active_children() == []


def test_timeout_stops_every_rank():
    with pytest.raises(TimeoutError, match="did not finish"):
        tp.launch(sleeps, 2, backend="gloo", timeout=8)
    assert multiprocessing.active_children() == []


def test_bad_degrees_are_refused_before_launch():
    with pytest.raises(
        ValueError, match=r"does not divide the 9 attention heads; use one of \[1, 3\]"
    ):
        tp.check_tp_degree(2, heads=9, kv_heads=3, intermediate=1536)
    with pytest.raises(ValueError, match="KV heads"):
        tp.check_tp_degree(4, heads=32, kv_heads=2, intermediate=1024)
    with pytest.raises(ValueError, match="backend='gloo'"):
        tp.check_world(torch.cuda.device_count() + 1, "nccl")


def test_alpha_beta_fit_recovers_known_parameters():
    alpha, beta = 25e-6, 1 / 50e9
    sizes = [2**k for k in range(10, 28, 2)]
    times = [alpha + beta * n for n in sizes]
    a, b = tp.fit_alpha_beta(sizes, times)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    assert tp.allreduce_bus_bytes(1000, 2) == 1000 and tp.allreduce_bus_bytes(1000, 4) == 1500
