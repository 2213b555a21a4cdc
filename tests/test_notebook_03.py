"""Notebook 03 writes the column split, the row split, the Megatron MLP, the prediction of a TP
step and the TPOT-vs-TP model itself: they must give the unsplit answer, run on real ranks as
the notebook runs them, and agree with known answers and with the planner."""

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import launch, planner, shapes
from tests.notebook_defs import definitions, idea_cells

nb = definitions("03_tensor_parallelism")
torch.manual_seed(0)


def reference_mlp(x, gate, up, down):
    """SwiGLU, written out: down · (silu(gate · x) ⊙ (up · x))."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def weights(hidden=32, intermediate=96):
    return (
        torch.randn(intermediate, hidden) / hidden**0.5,
        torch.randn(intermediate, hidden) / hidden**0.5,
        torch.randn(hidden, intermediate) / intermediate**0.5,
    )


def test_shards_are_the_known_blocks():
    w = torch.arange(24.0).reshape(4, 6)  # (out, in)
    torch.testing.assert_close(nb.column_shard(w, 1, 2), w[2:])  # rank 1: outputs 2, 3
    torch.testing.assert_close(nb.row_shard(w, 0, 3), w[:, :2])  # rank 0: inputs 0, 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(12, 8), (10, 7)])  # (10, 7) does not split evenly
def test_shards_tile_the_weight(world, shape):
    w = torch.randn(*shape)
    columns = [nb.column_shard(w, r, world) for r in range(len(w.chunk(world, dim=0)))]
    rows = [nb.row_shard(w, r, world) for r in range(len(w.chunk(world, dim=1)))]
    assert torch.equal(torch.cat(columns, dim=0), w) and torch.equal(torch.cat(rows, dim=1), w)


def test_column_split_concatenates_and_row_split_sums():
    x, w, world = torch.randn(5, 32), torch.randn(48, 32), 4
    cols = [F.linear(x, nb.column_shard(w, r, world)) for r in range(world)]
    torch.testing.assert_close(torch.cat(cols, dim=-1), x @ w.T)
    x_parts = x.chunk(world, dim=-1)
    rows = [F.linear(x_parts[r], nb.row_shard(w, r, world)) for r in range(world)]
    torch.testing.assert_close(sum(rows), x @ w.T)


def test_the_notebooks_mlp_is_swiglu():
    gate, up, down = weights()
    x = torch.randn(3, 32)
    torch.testing.assert_close(nb.mlp(x, gate, up, down), reference_mlp(x, gate, up, down))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_summed_partials_equal_the_unsharded_mlp(world):
    """Simulated ranks: the all-reduce is the sum of the row-split partial outputs."""
    gate, up, down = weights()
    x = torch.randn(3, 32)  # (tokens, hidden)
    partials = [nb.megatron_partial(x, gate, up, down, r, world) for r in range(world)]
    assert all(p.shape == (3, 32) for p in partials)
    torch.testing.assert_close(sum(partials), reference_mlp(x, gate, up, down))


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_rank_function_all_reduces_to_the_full_output(one_rank_group):
    gate, up, down = weights()
    x = torch.randn(3, 32)
    out = nb.megatron_mlp(0, 1, gate, up, down, x)
    torch.testing.assert_close(out, reference_mlp(x, gate, up, down))


def test_attention_split_by_heads_equals_full():
    head_dim, hidden, world = 8, 32, 2  # 4 heads, 2 per shard
    wq, wk, wv, wo = (torch.randn(hidden, hidden) / hidden**0.5 for _ in range(4))
    x = torch.randn(1, 6, hidden)

    def attention(x, wq, wk, wv, wo):
        b, t, _ = x.shape
        q, k, v = (F.linear(x, w).view(b, t, -1, head_dim).transpose(1, 2) for w in (wq, wk, wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(b, t, -1), wo)

    columns = [[nb.column_shard(w, r, world) for w in (wq, wk, wv)] for r in range(world)]
    split = sum(attention(x, *columns[r], nb.row_shard(wo, r, world)) for r in range(world))
    torch.testing.assert_close(split, attention(x, wq, wk, wv, wo))


def notebook_namespace(tmp_path):
    """The idea cells run as a notebook runs them: module __main__, source in a file, so that
    `launch` sends the notebook's functions to the ranks as their source."""
    cells = tmp_path / "notebook_03_ideas.py"
    cells.write_text("\n\n".join(idea_cells("03_tensor_parallelism")))
    namespace = {"__name__": "__main__"}
    exec(compile(cells.read_text(), str(cells), "exec"), namespace)
    return namespace


def test_two_gloo_processes_running_the_notebooks_mlp_equal_one(tmp_path):
    megatron_mlp = notebook_namespace(tmp_path)["megatron_mlp"]
    gate, up, down = weights()
    x = torch.randn(3, 32)
    outs = launch.launch(megatron_mlp, 2, gate, up, down, x, backend="gloo")
    assert len(outs) == 2
    for out in outs:
        torch.testing.assert_close(out, reference_mlp(x, gate, up, down))


def test_the_predicted_tp_time_splits_the_work_and_adds_one_all_reduce():
    # 8 ms of matmuls on 2 devices: 4 ms each, + α 1 ms + 1 MB at 1 GB/s (1 ms)
    assert nb.predicted_tp_time(8e-3, 2, 1e-3, 1e-9, 1e6) == pytest.approx(6e-3)
    assert nb.predicted_tp_time(8e-3, 1, 1e-3, 1e-9, 1e6) == 8e-3  # TP 1 has no all-reduce


LLAMA = {"model": "llama-2-7b", "dtype": "fp16", "prompt_tokens": 512, "new_tokens": 128}
DEGREES = [1, 2, 4, 8, 16, 32]  # Llama-2-7B's 32 heads and 32 KV heads split up to 32 ways


def h100_with(alpha_s, per_rank_s):
    spec = planner.gpu("h100-sxm", "production")
    engine = dataclasses.replace(spec.engine, allreduce_s=alpha_s, allreduce_per_rank_s=per_rank_s)
    return dataclasses.replace(spec, engine=engine)


def formula_terms(spec):
    """The notebook's TPOT(t) ≈ W ÷ (t·BW) + L·c + 2L·α(t) for Llama-2-7B on `spec`, W the weights
    plus the KV cache a decode step reads at the planner's context (prompt + half the answer)."""
    shape = shapes.Shape.of("llama-2-7b")
    context = LLAMA["prompt_tokens"] + LLAMA["new_tokens"] // 2
    w = shape.linear_params * 2 + shapes.kv_cache_bytes(shape, 1, context, 2)
    bandwidth = spec.bandwidth * spec.engine.memory_efficiency
    engine = spec.engine
    return dict(
        weight_bytes=w,
        bandwidth=bandwidth,
        layers=shape.layers,
        layer_s=engine.layer_s,
        alpha=engine.alpha_s,
    )


def planner_tpot(spec, t):
    return planner.predict(**LLAMA, gpu=spec, tp=t, batch=1).tpot_s


@pytest.mark.parametrize(
    ("alpha_s", "per_rank_s", "stops_at"),
    [
        (50e-6, 0.0, 1),  # 2L·α(2) = 3.2 ms > W ÷ (2·BW) ≈ 2.9 ms: TP 2 is already slower
        (20e-6, 2e-6, 8),  # t* = √(W ÷ (4·L·s·BW)) ≈ 4.3: 4 → 8 still pays, 8 → 16 does not
        (4e-6, 0.0, 32),  # a flat α: TPOT falls all the way (by ever less)
    ],
)
def test_the_tpot_formula_stops_falling_where_the_planner_does(alpha_s, per_rank_s, stops_at):
    spec = h100_with(alpha_s, per_rank_s)
    terms = formula_terms(spec)
    planned = [planner_tpot(spec, t) for t in DEGREES]
    for t, p in zip(DEGREES, planned, strict=True):
        assert nb.tpot_model(t, **terms) == pytest.approx(p, rel=0.02)  # the planner adds FLOPs
    rises = [
        t for t, now, after in zip(DEGREES, planned, planned[1:], strict=False) if after >= now
    ]
    assert nb.tp_where_tpot_stops_falling(DEGREES, **terms) == (rises or DEGREES[-1:])[0]
    assert nb.tp_where_tpot_stops_falling(DEGREES, **terms) == stops_at


def test_tp_star_is_where_a_doubling_stops_paying():
    w, bw, layers, s = 13.5e9, 2.8e12, 32, 2e-6
    t_star = nb.tp_star(w, bw, layers, s)
    saved, cost = w / (2 * t_star * bw), 2 * layers * s * t_star  # doubling from t*: a tie
    assert saved == pytest.approx(cost)
    assert nb.tp_star(w, bw, layers, 0.0) == float("inf")


def test_the_tpot_formula_is_the_planners_step_time_at_batch_1():
    spec = h100_with(20e-6, 1e-7)
    terms = formula_terms(spec)
    context = LLAMA["prompt_tokens"] + LLAMA["new_tokens"] // 2
    for t in DEGREES:
        step = planner.step_seconds(
            model="llama-2-7b", gpu=spec, dtype="fp16", tp=t, batch=1, tokens=1, context=context
        )
        assert nb.tpot_model(t, **terms) == pytest.approx(step, rel=0.02)
