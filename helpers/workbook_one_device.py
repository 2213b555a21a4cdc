"""Exercises of notebooks 00–02 (one device: the machine, quantization, memory), each with its
expected value computed from the notebook's numbers; `helpers.workbook` gathers them."""

from __future__ import annotations

from helpers import quant, shapes
from helpers.exercises import exercise

# --- 00 · your machine ---------------------------------------------------------------------


@exercise(
    "00.bf16-floor",
    "compute",
    "SmolLM2-135M's decode floor in bf16 at batch 1 (ms per token)",
    rtol=0.05,
    tolerance_why="arithmetic on the notebook's own numbers: only rounding differs",
    hint="the bytes one step reads in bf16 (how many bytes per parameter?) ÷ the read "
    "bandwidth, in milliseconds",
)
def _bf16_floor_ms(params, bandwidth):
    return params * 2 / bandwidth * 1e3


@exercise(
    "00.critical-batch",
    "derive",
    "critical_batch(peak_flops, bandwidth, bytes_per_weight): the batch at which decode reaches "
    "the ridge point",
    rtol=1e-6,
    tolerance_why="a formula: exact",
    hint="one decode step does 2 FLOPs per weight per sequence and reads each weight once; "
    "set its FLOP per byte equal to peak ÷ bandwidth and solve for the batch",
    cases=(
        dict(peak_flops=989e12, bandwidth=3.35e12, bytes_per_weight=2),  # H100 SXM, bf16
        dict(peak_flops=65e12, bandwidth=300e9, bytes_per_weight=2),  # T4, fp16
        dict(peak_flops=312e12, bandwidth=2.0e12, bytes_per_weight=1),  # A100, int8 weights
        dict(peak_flops=250e9, bandwidth=20e9, bytes_per_weight=4),  # a 2-core CPU, fp32
    ),
)
def _critical_batch(peak_flops, bandwidth, bytes_per_weight):
    return peak_flops / bandwidth * bytes_per_weight / 2


@exercise(
    "00.matmuls-batch-4",
    "predict",
    "every weight product of one decode step at batch 4 (ms)",
    rtol=0.25,
    tolerance_why="±25 %, the accuracy the course asks of its planner, or the run's spread",
    hint="four rows share each read of the weights: bandwidth-bound, the time stays near batch "
    "1's; section 6's skinny-product rates say what four rows cost in arithmetic",
    unit="ms",
)
def _matmuls_batch_4_ms(measured):
    return measured


@exercise(
    "00.per-layer-cost",
    "investigate",
    "the cost one layer adds to an eager decode step, from tiny models you built",
    hint="",
)
def _per_layer_cost(result, notebook_slope_s):
    """A result {"layers": [...], "step_s": [...], "per_layer_s": x} measured by the learner."""
    layers, steps = list(result.get("layers", [])), list(result.get("step_s", []))
    if len(set(layers)) < 3 or max(layers) - min(layers) < 10:
        return "measure at least three layer counts spanning 10 layers or more"
    if len(layers) != len(steps):
        return "give one step time per layer count"
    n = len(layers)
    mean_l, mean_s = sum(layers) / n, sum(steps) / n
    slope = sum((x - mean_l) * (y - mean_s) for x, y in zip(layers, steps, strict=True)) / sum(
        (x - mean_l) ** 2 for x in layers
    )
    stated = result.get("per_layer_s")
    if stated is None or abs(stated - slope) > 0.1 * abs(slope):
        return "per_layer_s should be the slope of your step times against the layer count"
    if not 0.5 <= slope / notebook_slope_s <= 2:
        return (
            f"your slope is {slope / notebook_slope_s:.1f}× the notebook's own fit: were the "
            "cores busy, or did one measurement include a warm-up?"
        )
    return ""


# --- 01 · quantization ----------------------------------------------------------------


@exercise(
    "01.int4-bytes",
    "derive",
    "int4_bytes(out_features, in_features, group_size): bytes of an int4 weight matrix with one "
    "bf16 scale and one bf16 zero point per group of group_size weights of a row",
    rtol=1e-9,
    tolerance_why="a count of bytes: exact",
    hint="half a byte per weight, plus per group (how many groups does a row hold?) two 16-bit "
    "numbers",
    cases=(
        dict(out_features=4096, in_features=4096, group_size=64),
        dict(out_features=576, in_features=1536, group_size=128),
        dict(out_features=1536, in_features=576, group_size=32),
        dict(out_features=8192, in_features=28672, group_size=128),  # Llama-3-70B down_proj
    ),
)
def _int4_bytes(out_features, in_features, group_size):
    return out_features * in_features / 2 + out_features * (in_features // group_size) * 2 * 2


@exercise(
    "01.int8-error",
    "predict",
    "‖ŵ − w‖ / ‖w‖ of int8 absmax per output channel on `weight`",
    rtol=0.1,
    tolerance_why="±10 %: the rounding model (each error uniform within ± half a step) is off "
    "only where a step is not small against the weights, which at 127 levels per row is rare",
    hint="each row's step is its max |w| ÷ 127 and a uniform error over one step has RMS step ÷ "
    "√12; add up the squared errors of every row and divide by ‖w‖",
)
def _int8_error(measured):
    return measured


@exercise(
    "01.group-128-error",
    "predict",
    "‖ŵ − w‖ / ‖w‖ of 4-bit zero-point groups of 128 on `weight`, from groups of 64's",
    rtol=0.1,
    tolerance_why="±10 %: the error scales with the RMS step (a group's range ÷ 15) as long as "
    "the errors stay uniform within a step, as they do at both group sizes",
    hint="the error is proportional to the RMS of the steps, range ÷ (2^bits − 1); compare the "
    "RMS group range at 128 columns with that at 64 and scale groups of 64's measured error",
)
def _group_128_error(measured):
    return measured


def _bits_per_weight(bits, group):
    return bits + 2 * 16 / group  # a 16-bit scale and a 16-bit zero point per group


@exercise(
    "01.bits-or-groups",
    "investigate",
    "the (bits, group size) with the lowest error on `weight` within a budget of bits per weight",
)
def _bits_or_groups(result, weight, budget_bits):
    """A result {"configs": [(bits, group), ...], "error": [...], "best": (bits, group)}."""
    configs = [tuple(c) for c in result.get("configs", [])]
    errors = list(result.get("error", []))
    if len(configs) < 4 or len({b for b, _ in configs}) < 2 or len({g for _, g in configs}) < 2:
        return "try at least four configurations, with two bit widths and two group sizes or more"
    if len(errors) != len(configs):
        return "give one error per configuration"
    fits = [_bits_per_weight(b, g) <= budget_bits for b, g in configs]
    if all(fits) or not any(fits):
        return "include configurations both within and over the budget (bits + 32 ÷ group)"
    for (bits, group), error in zip(configs, errors, strict=True):
        approx = quant.fake_quantize(weight, bits=bits, group_size=group, symmetric=False)
        if abs(error - quant.relative_error(approx, weight)) > 0.01 * error:
            return (
                f"the error of {bits} bits, groups of {group} is not ‖ŵ − w‖ / ‖w‖ of "
                "quant.fake_quantize(weight, bits=..., group_size=..., symmetric=False)"
            )
    within = [(e, c) for e, c, ok in zip(errors, configs, fits, strict=True) if ok]
    if tuple(result.get("best", ())) != min(within)[1]:
        return (
            "best should be the configuration with the lowest error among those whose bits "
            "per weight, scales and zero points included, fit the budget"
        )
    return ""


# --- 02 · memory and buffers ----------------------------------------------------------


@exercise(
    "02.llama3-kv",
    "compute",
    "Llama-3-8B's KV cache for 4 sequences of 8,192 tokens in bf16",
    rtol=0.02,
    tolerance_why="arithmetic on published shapes: only rounding differs",
    hint="2 tensors (keys, values) × layers × batch × context × KV heads × head dimension × "
    "bytes per value; GQA: count the KV heads, not the query heads. State your unit (unit='GB' "
    "or 'GiB')",
    unit="GiB",
)
def _llama3_kv_gib(model, batch, context, bytes_per_value):
    return shapes.kv_cache_bytes(shapes.Shape.of(model), batch, context, bytes_per_value) / 2**30


@exercise(
    "02.max-batch",
    "derive",
    "max_batch(model, context, budget_bytes, weight_bytes, value_bytes): the largest batch whose "
    "weights and KV cache fit in budget_bytes (activations and logits left out)",
    rtol=0.0,
    tolerance_why="a whole number of sequences: exact",
    hint="what is left after the weights (parameters × bytes per weight), divided by one "
    "sequence's KV cache at that context, rounded down; 0 when the weights alone do not fit",
    cases=(
        dict(model="llama-2-7b", context=4096, budget_bytes=80e9, weight_bytes=2, value_bytes=2),
        dict(
            model="llama-2-7b", context=4096, budget_bytes=80 * 2**30, weight_bytes=2, value_bytes=2
        ),
        dict(model="llama-3-8b", context=8192, budget_bytes=80e9, weight_bytes=2, value_bytes=1),
        dict(model="llama-2-13b", context=4096, budget_bytes=24e9, weight_bytes=2, value_bytes=2),
        dict(model="smollm2-135m", context=2048, budget_bytes=2**30, weight_bytes=4, value_bytes=4),
    ),
)
def _weights_and_kv_max_batch(model, context, budget_bytes, weight_bytes, value_bytes):
    shape = shapes.Shape.of(model)
    room = budget_bytes - shape.params * weight_bytes
    return max(0, int(room // shapes.kv_cache_bytes(shape, 1, context, value_bytes)))


@exercise(
    "02.request-peak",
    "predict",
    "the peak one request adds: batch 1 × 384 prompt tokens, 2 new tokens, every position's "
    "logits kept (MiB)",
    rtol=0.3,
    tolerance_why="±30 %: the formulas count tensors, not the libraries' scratch (section 2's "
    "request rows: a few % over), which weighs more in this small request; or the run's spread",
    hint="its KV cache for prompt + new tokens, plus the larger of its widest moment inside a "
    "layer and after the last one; with every position's logits kept, which of the two is it, "
    "and how many bytes does one position's scores over the vocabulary take?",
    unit="MiB",
)
def _request_peak_mib(measured):
    return measured


@exercise(
    "02.int8-fits",
    "investigate",
    "the batch that fits at another context, with the float and the int8 cache",
)
def _int8_fits(result, notebook_context):
    """A result {"context": c, "float": frontier, "int8": frontier, "predicted_ratio": r}: two
    `memory.search_frontier` frames at context c and the ratio predicted from the formulas
    before they ran (the frames' `predicted` columns hold the formulas' batches)."""
    frames = [result.get(k) for k in ("float", "int8")]
    if any(f is None or not hasattr(f, "found") or len(f) != 1 for f in frames):
        return "give the two searches' frames (one context each) as 'float' and 'int8'"
    contexts = {int(f.context.iloc[0]) for f in frames}
    if contexts != {result.get("context")}:
        return "both searches must run at your 'context'"
    if result["context"] == notebook_context:
        return f"section 4 already searched at {notebook_context} tokens: pick another context"
    (float_found, int8_found), (float_formula, int8_formula) = (
        [int(f[column].iloc[0]) for f in frames] for column in ("found", "predicted")
    )
    if float_found < 1 or float_formula < 1:
        return "not even one float request fits at this context: pick a shorter one"
    if int8_found < float_found:
        return "the int8 cache fit fewer sequences than the float one: swapped frames?"
    predicted = result.get("predicted_ratio")
    if predicted is None or not predicted > 0:
        return "state your predicted ratio (int8 batch ÷ float batch) before the searches run"
    if abs(predicted / (int8_formula / float_formula) - 1) > 0.1:
        way = "high" if predicted > int8_formula / float_formula else "low"
        return (
            f"your predicted ratio is too {way} (more than 10 % from the formulas'): the cache "
            "shrinks by the bytes per value (with its scales), the activations of the widest "
            "moment do not, and the batch grows by the ratio of whole requests"
        )
    return ""
