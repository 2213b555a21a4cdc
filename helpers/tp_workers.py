"""What runs on every rank under `helpers.launch`, and the launches that gather it into tables.

The rank functions take (rank, world_size, ...) and return what rank 0 (or every rank) reports;
they live in a module so that the ranks can import them by name. `llama_tp_check` and
`mlp_sweep` launch them and return one DataFrame each (the plumbing behind notebook 03).
"""

from __future__ import annotations

import shutil
import tempfile

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import bench, checks, memory
from helpers.launch import launch
from helpers.tp import COLWISE, ROWWISE, llama_plan, slowest, timed_parts


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


# --- A whole Llama, sharded two ways ----------------------------------------------------------


def held_bytes(model) -> dict[str, int]:
    """Weight bytes this process holds: of the linears TP splits, and of the whole model.
    A DTensor parameter counts its local shard (what this rank really stores); tied weights once."""
    split = tuple(f".{name}" for name in COLWISE + ROWWISE)
    in_split = {
        id(p): p for n, m in model.named_modules() if n.endswith(split) for p in m.parameters()
    }
    return {
        "linears": sum(memory.tensor_bytes(p) for p in in_split.values()),
        "all": memory.weight_bytes(model),
    }


def _local_rows(model) -> tuple[int, int]:
    """(rows this rank holds, rows in the full matrix) of the first MLP's gate projection."""
    weight = model.model.layers[0].mlp.gate_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0], model.config.intermediate_size


def greedy_tokens(model, ids, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens after `ids` (transformers' generate), on the CPU."""
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :].cpu()


def _report(model, ids, new_tokens):
    return (
        model(ids).logits.cpu(),
        greedy_tokens(model, ids, new_tokens),
        _local_rows(model),
        held_bytes(model),
    )


@torch.inference_mode()
def dtensor_llama(rank: int, world: int, model_dir: str, ids, new_tokens: int):
    """Load a saved Llama on every rank and shard it with DTensor's colwise/rowwise plan."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import AutoModelForCausalLM

    dev = _device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    mesh = init_device_mesh(dev.type, (world,))
    parallelize_module(model, mesh, llama_plan(model.config.num_hidden_layers))
    return _report(model, ids.to(dev), new_tokens)


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
    return _report(model.eval(), ids.to(dev), new_tokens)


@torch.inference_mode()
def llama_tp_check(model, ids, new_tokens: int, world: int, backend: str) -> pd.DataFrame:
    """Shard `model` over `world` ranks with DTensor and with transformers' tp_plan, and compare
    each rank's logits and greedy tokens with the unsharded model's: one row per method × rank,
    with the weight bytes each rank holds next to the unsharded model's ÷ world."""
    new_tokens = checks.whole("new_tokens", new_tokens)
    ref_logits, ref_tokens = model(ids).logits, greedy_tokens(model, ids, new_tokens)
    full = held_bytes(model)
    checkpoint = tempfile.mkdtemp(prefix="tp_llama_")
    rows = []
    try:
        model.save_pretrained(checkpoint)
        methods = {
            "DTensor parallelize_module": dtensor_llama,
            "transformers tp_plan='auto'": transformers_tp_llama,
        }
        for method, worker in methods.items():
            results = launch(worker, world, checkpoint, ids, new_tokens, backend=backend)
            for rank, (logits, tokens, (rows_held, rows_total), held) in enumerate(results):
                rows.append(
                    {
                        "method": method,
                        "rank": rank,
                        "max |logit difference|": float((logits - ref_logits).abs().max()),
                        "greedy tokens identical": torch.equal(tokens, ref_tokens),
                        "gate rows held": f"{rows_held} of {rows_total}",
                        "split linears held (bytes)": held["linears"],
                        "split linears unsharded ÷ tp (bytes)": full["linears"] / world,
                        "all weights held (bytes)": held["all"],
                        "all weights unsharded ÷ tp (bytes)": full["all"] / world,
                        "peak RSS of the rank (bytes)": results.peak_rss_bytes[rank],
                    }
                )
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return pd.DataFrame(rows)


# --- Timing collectives --------------------------------------------------------------------


def _spread(name: str, samples: list[float]) -> dict[str, float]:
    q1, median, q3 = bench.quartiles(samples)
    return {f"{name}_s": median, f"{name}_q1_s": q1, f"{name}_q3_s": q3}


def allreduce_times(rank: int, world: int, sizes_bytes, repeats: int = 20, warmup: int = 3):
    """An all-reduce (sum, fp32) of each message size: median and quartiles of the slowest rank."""
    dev = _device()
    rows = []
    for nbytes in sizes_bytes:
        buf = torch.zeros(max(1, int(nbytes) // 4), device=dev)
        t = bench.measure(
            lambda b=buf: dist.all_reduce(b),
            warmup=warmup,
            repeats=repeats,
            device=dev,
            before_each=dist.barrier,
        )
        q1, median, q3 = bench.quartiles(slowest(t.samples, dev))
        rows.append(
            {"world": world, "bytes": buf.numel() * 4, "seconds": median, "q1_s": q1, "q3_s": q3}
        )
    return rows


def mlp_times(
    rank: int,
    world: int,
    layer_sizes,
    batches,
    repeats: int = 10,
    warmup: int = 3,
    threads: int | None = None,
) -> list[dict]:
    """One Megatron MLP forward for every (hidden, intermediate) in `layer_sizes` and every batch,
    timed by `tp.timed_parts`: the whole layer, the matmuls (compute), the skew (from the first
    rank reaching the all-reduce to the last), and the all-reduce timed alone (comm), each a
    median and quartiles over the timed runs. `threads`: CPU threads for this rank (default:
    the launcher's share of the cores)."""
    if threads is not None:
        torch.set_num_threads(checks.whole("threads", threads))
    dev = _device()
    torch.manual_seed(rank)  # timing only: each rank makes just its own shard, at its shape
    rows = []
    for hidden, intermediate in layer_sizes:
        shard = intermediate // world
        g = torch.randn(shard, hidden, device=dev).div_(hidden**0.5)  # in place: no second copy
        u = torch.randn(shard, hidden, device=dev).div_(hidden**0.5)
        d = torch.randn(hidden, shard, device=dev).div_(intermediate**0.5)
        for batch in batches:
            x = torch.randn(batch, hidden, device=dev)

            def layer(x=x, g=g, u=u, d=d):
                return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

            times = timed_parts(layer, dist.all_reduce, dev, repeats=repeats, warmup=warmup)
            point = {"tp": world, "hidden": hidden, "intermediate": intermediate, "batch": batch}
            point |= {
                "weight_bytes": 3 * hidden * intermediate * 4,
                "message_bytes": batch * hidden * 4,
            }
            for part, samples in times.items():  # total, compute, skew, comm
                point |= _spread(part, samples)
            rows.append(point)
        del g, u, d
    return rows


def mlp_sweep(
    layer_sizes,
    batches,
    worlds,
    backend: str,
    repeats: int = 10,
    threads_per_rank: int | None = None,
) -> pd.DataFrame:
    """`mlp_times` for every (hidden, intermediate) in `layer_sizes` and TP degree in `worlds`
    (a one-rank launch is the TP 1 baseline: the same code path), one launch per degree: one row
    per point, times in seconds (median, q1, q3) of the total, compute, skew and all-reduce.
    `threads_per_rank=1` makes each CPU rank one core, as each GPU rank is one GPU: TP 1 then
    does not run threads that, on a busy machine, wait for each other at every matmul."""
    rows = []
    for world in worlds:
        rows += launch(
            mlp_times,
            world,
            [tuple(s) for s in layer_sizes],
            list(batches),
            repeats,
            3,
            threads_per_rank,
            backend=backend,
        )[0]
    return pd.DataFrame(rows)
