"""Notebook 03 writes the column split, the row split and the Megatron MLP itself; they must give
the unsplit answer and equal the helpers' shards (which the multi-process workers use)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import tp
from tests.notebook_defs import definitions

nb = definitions("03_tensor_parallelism")
torch.manual_seed(0)


def reference_mlp(x, gate, up, down):
    """SwiGLU, written out: down · (silu(gate · x) ⊙ (up · x))."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def weights(hidden=32, intermediate=96):
    return (torch.randn(intermediate, hidden) / hidden**0.5,
            torch.randn(intermediate, hidden) / hidden**0.5,
            torch.randn(hidden, intermediate) / intermediate**0.5)  # fmt: skip


def test_shards_are_the_known_blocks():
    w = torch.arange(24.0).reshape(4, 6)  # (out, in)
    torch.testing.assert_close(nb.column_shard(w, 1, 2), w[2:])  # rank 1: outputs 2, 3
    torch.testing.assert_close(nb.row_shard(w, 0, 3), w[:, :2])  # rank 0: inputs 0, 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(12, 8), (10, 7)])  # (10, 7) does not split evenly
def test_shards_equal_the_helpers(world, shape):
    w = torch.randn(*shape)
    for rank in range(min(world, len(w.chunk(world, dim=0)))):
        assert torch.equal(nb.column_shard(w, rank, world), tp.column_shard(w, rank, world))
    for rank in range(min(world, len(w.chunk(world, dim=1)))):
        assert torch.equal(nb.row_shard(w, rank, world), tp.row_shard(w, rank, world))


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
    with_helpers = [
        nb.mlp(x, tp.column_shard(gate, r, world), tp.column_shard(up, r, world),
               tp.row_shard(down, r, world))
        for r in range(world)
    ]  # fmt: skip
    for ours, theirs in zip(partials, with_helpers, strict=True):
        assert torch.equal(ours, theirs)


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
