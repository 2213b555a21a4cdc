"""Functions that run on every rank under `helpers.tp.launch` (importable, hence here).

Each takes (rank, world_size, ...) and returns what rank 0 (or every rank) should report.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers.tp import column_shard, row_shard


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def megatron_mlp(rank: int, world: int, gate, up, down, x) -> torch.Tensor:
    """SwiGLU MLP split Megatron-style: gate/up by output columns, down by input rows.

    Each rank computes a partial output from its slice of the intermediate features; one
    all-reduce (sum) of the output makes every rank hold the full result.
    """
    dev = _device()
    g, u = column_shard(gate, rank, world).to(dev), column_shard(up, rank, world).to(dev)
    d = row_shard(down, rank, world).to(dev)
    x = x.to(dev)
    partial = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    dist.all_reduce(partial)  # the only communication of the layer
    return partial.cpu()


def _llama_plan(num_layers: int) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):  # fmt: skip
            plan[f"{prefix}.{name}"] = ColwiseParallel()
        plan[f"{prefix}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"{prefix}.mlp.down_proj"] = RowwiseParallel()
    return plan


def _local_rows(model) -> tuple[int, int]:
    """(rows this rank holds, rows in the full matrix) of the first MLP's gate projection."""
    weight = model.model.layers[0].mlp.gate_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0], model.config.intermediate_size


def _greedy(model, ids, new_tokens):
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, attention_mask=torch.ones_like(ids),
                         pad_token_id=0)  # fmt: skip
    return out[:, ids.shape[1] :].cpu()


@torch.inference_mode()
def dtensor_llama(rank: int, world: int, model_dir: str, ids, new_tokens: int):
    """Load a saved Llama on every rank and shard it with DTensor's colwise/rowwise plan."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import AutoModelForCausalLM

    dev = _device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    mesh = init_device_mesh(dev.type, (world,))
    parallelize_module(model, mesh, _llama_plan(model.config.num_hidden_layers))
    ids = ids.to(dev)
    return model(ids).logits.cpu(), _greedy(model, ids, new_tokens), _local_rows(model)


@torch.inference_mode()
def transformers_tp_llama(rank: int, world: int, model_dir: str, ids, new_tokens: int):
    """The same model through transformers' own tensor-parallel loading (tp_plan='auto')."""
    from transformers import AutoModelForCausalLM

    try:  # newer transformers take the plan through a DistributedConfig
        from transformers import DistributedConfig

        tp_args = {"distributed_config": DistributedConfig(tp_size=world, tp_plan="auto")}
    except (ImportError, TypeError):
        tp_args = {"tp_plan": "auto"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **tp_args)
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    return model(ids).logits.cpu(), _greedy(model.eval(), ids, new_tokens), _local_rows(model)


def _median_time(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    # every rank waits for the slowest, so report the slowest rank's median
    t = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def allreduce_times(rank: int, world: int, sizes_bytes, repeats: int = 20) -> list[dict]:
    """Median time of an all-reduce (sum, fp32) for each message size."""
    dev = _device()
    rows = []
    for nbytes in sizes_bytes:
        buf = torch.ones(max(1, nbytes // 4), device=dev)
        t = _median_time(lambda b=buf: dist.all_reduce(b), dev, repeats)
        rows.append({"world": world, "bytes": buf.numel() * 4, "seconds": t})
    return rows


def mlp_times(rank: int, world: int, hidden: int, intermediate: int, batches, repeats: int = 10):
    """Time of one Megatron MLP forward at each batch, and of its all-reduce alone."""
    dev = _device()
    torch.manual_seed(rank)  # timing only: each rank makes just its own shard, at its shape
    shard = intermediate // world
    g = torch.randn(shard, hidden, device=dev) / hidden**0.5
    u = torch.randn(shard, hidden, device=dev) / hidden**0.5
    d = torch.randn(hidden, shard, device=dev) / intermediate**0.5
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, device=dev)

        def compute(x=x):
            return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

        out = compute()
        total = _median_time(lambda: dist.all_reduce(compute()), dev, repeats)
        comm = _median_time(lambda o=out: dist.all_reduce(o), dev, repeats) if world > 1 else 0.0
        rows.append({"tp": world, "hidden": hidden, "intermediate": intermediate,
                     "batch": batch, "total_s": total, "comm_s": comm})  # fmt: skip
    return rows
