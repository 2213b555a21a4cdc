"""A planner configuration as vLLM's flags and the `vllm serve` command that realises it: precision,
tensor parallel within a node, pipeline parallel across nodes (with Ray), data-parallel copies,
the batch cap, the prefill budget, the context and the KV format (vLLM ≥ 0.10 flag names).

    from helpers import vllm_flags
    vllm_flags.serve_command("meta-llama/Meta-Llama-3-8B-Instruct", best, 2048)

`server.serve_flags` and `server.serve_command` are these functions (the names notebooks use).
"""

from __future__ import annotations

from helpers import checks

VLLM_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Quantized weights: vLLM quantizes a 16-bit checkpoint to fp8 itself (`--quantization fp8`: W8A8
# on Ada/Hopper, weight-only Marlin kernels on Ampere); int8 and int4 come from a checkpoint made
# for them, whose config tells vLLM the method (no flag needed; `--quantization awq` / `gptq`
# names it).
VLLM_QUANTIZATION = {"fp8": "fp8", "fp8-w8a8": "fp8"}
VLLM_CHECKPOINTS = {
    "int8": "an int8 checkpoint of the model (W8A8 or GPTQ 8-bit; vLLM reads its method)",
    "int4": "an AWQ or GPTQ 4-bit checkpoint of the model (e.g. --quantization awq)",
}
VLLM_KV_DTYPES = {"fp8": "fp8", "fp16": "auto", "bf16": "auto", "fp32": "auto"}
GPUS_PER_NODE = 8


def layout(tp: int, gpus_per_node: int) -> tuple[int, int]:
    """(tensor parallel, pipeline parallel): TP within a node, PP across nodes (vLLM's docs:
    tensor_parallel_size = GPUs per node, pipeline_parallel_size = nodes)."""
    if tp <= gpus_per_node:
        return tp, 1
    if tp % gpus_per_node:
        raise ValueError(
            f"{tp} GPUs per copy do not fill whole nodes of {gpus_per_node}: use a multiple of "
            f"{gpus_per_node} (or gpus_per_node= your node's GPU count)"
        )
    return gpus_per_node, tp // gpus_per_node


def serve_flags(
    config, max_model_len: int, max_num_batched_tokens=None, kv_dtype=None, gpus_per_node=8
) -> list[str]:
    """vLLM's flags (≥ 0.10 names) for one copy of a planner configuration (`dtype`, `tp` = GPUs
    per copy, `batch`): precision, TP (and PP past one node), the batch cap, the prefill budget,
    the context and the KV format. `server.start(args=...)` takes them."""
    dtype, batch = str(config["dtype"]), checks.whole("batch", int(config["batch"]))
    tp, pp = layout(checks.whole("tp", int(config["tp"])), gpus_per_node)
    if kv_dtype is not None and kv_dtype not in VLLM_KV_DTYPES:
        raise ValueError(
            f"vLLM has no {kv_dtype!r} KV cache (--kv-cache-dtype takes auto or fp8): use "
            "kv_dtype='fp8' or None"
        )
    flags = []
    if dtype in VLLM_DTYPES:
        flags += ["--dtype", VLLM_DTYPES[dtype]]
    if dtype in VLLM_QUANTIZATION:
        flags += ["--quantization", VLLM_QUANTIZATION[dtype]]
    flags += ["--tensor-parallel-size", str(tp)]
    if pp > 1:
        flags += ["--pipeline-parallel-size", str(pp), "--distributed-executor-backend", "ray"]
    flags += ["--max-num-seqs", str(batch)]
    if max_num_batched_tokens is not None:
        budget = checks.whole("max_num_batched_tokens", max_num_batched_tokens)
        flags += ["--max-num-batched-tokens", str(budget)]
    flags += ["--max-model-len", str(checks.whole("max_model_len", max_model_len))]
    if kv_dtype is not None and VLLM_KV_DTYPES[kv_dtype] != "auto":
        flags += ["--kv-cache-dtype", VLLM_KV_DTYPES[kv_dtype]]
    return flags


def serve_command(
    model_id: str,
    config,
    max_model_len: int,
    kv_dtype: str | None = None,
    max_num_batched_tokens: int | None = None,
    gpus_per_node: int = GPUS_PER_NODE,
) -> str:
    """The `vllm serve` command that realises a planner configuration (`planner.best_config`:
    dtype, tp, batch, replicas), with a comment per choice: TP within a node, PP across nodes
    with Ray, data-parallel copies within a node or separate servers behind a router."""
    flags = serve_flags(config, max_model_len, max_num_batched_tokens, kv_dtype, gpus_per_node)
    pairs = [f"  {flags[i]} {flags[i + 1]}" for i in range(0, len(flags), 2)]
    tp, pp = layout(int(config["tp"]), gpus_per_node)
    replicas, dtype = int(config.get("replicas", 1)), str(config["dtype"])
    in_node = replicas > 1 and replicas * tp * pp <= gpus_per_node
    if in_node:
        pairs.append(f"  --data-parallel-size {replicas}")
    notes = [f"# {dtype}: serve {VLLM_CHECKPOINTS[dtype]}"] if dtype in VLLM_CHECKPOINTS else []
    notes.append(f"# {tp} GPU(s) in tensor parallel within one node (NVLink)")
    if pp > 1:
        notes.append(
            f"# {pp} nodes in pipeline parallel: `ray start --head` on one node, `ray start "
            "--address=<head-ip>:6379` on the others, then this command on the head node"
        )
    if in_node:
        notes.append(f"# {replicas} copies in one server (data parallel; one API endpoint)")
    elif replicas > 1:
        notes.append(
            f"# {replicas} copies of {tp * pp} GPU(s): one server per copy (this command each), "
            "behind a router or load balancer"
        )
    return " \\\n".join([f"vllm serve {model_id}", *pairs]) + "\n" + "\n".join(notes)
