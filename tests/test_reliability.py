"""Issue 13: the mistakes a learner plausibly makes get one clear line, never a hang or garbage.

Each test is one finding: the call, and the error (or value) it must give. Tensor-parallel
failures are in test_tp.py, the offline model cache in test_models.py.
"""

import math

import numpy as np
import pytest
import torch

from helpers import device, memory, models, quant, quant_linears, shapes

W = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))


# --- quantizers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "error", "message"),
    [
        (1, ValueError, "bits must be at least 2, got 1"),  # symmetric 1-bit: all NaN before
        (0, ValueError, "bits must be at least 2, got 0"),
        (-1, ValueError, "bits must be at least 2, got -1"),
        (2.5, TypeError, "bits must be a whole number, got 2.5"),
        (17, ValueError, "bits must be between 2 and 16, got 17"),
        ("8", TypeError, "bits must be a whole number"),
    ],
)
def test_bits_outside_the_valid_range_are_refused(bits, error, message):
    with pytest.raises(error, match=message):
        quant.fake_quantize(W, bits=bits)


def test_one_bit_zero_point_is_valid_and_finite():
    approx = quant.fake_quantize(W, bits=1, symmetric=False)  # two levels: each row's min and max
    assert torch.isfinite(approx).all() and approx.unique().numel() <= 2 * W.shape[0]


@pytest.mark.parametrize(
    ("w", "message"),
    [
        (torch.randn(128), r"2-D \(rows, columns\) matrix, got shape \(128,\).*reshape"),
        (torch.randn(2, 8, 128), r"got shape \(2, 8, 128\)"),
        (torch.empty(0, 128), r"non-empty 2-D.*got shape \(0, 128\)"),
    ],
)
def test_tensors_that_are_not_matrices_are_refused(w, message):
    with pytest.raises(ValueError, match=message):
        quant.fake_quantize(w)


def test_integer_weights_are_refused():
    with pytest.raises(TypeError, match="floating-point torch.Tensor"):
        quant.quantize(torch.ones(4, 4, dtype=torch.int32))


@pytest.mark.parametrize(
    ("group_size", "error", "message"),
    [
        (0, ValueError, "group_size must be at least 1, got 0"),
        (-64, ValueError, "group_size must be at least 1, got -64"),
        # the suggestions are group sizes PyTorch's int4 kernel runs (issue 22)
        (100, ValueError, r"100 does not divide the 128 columns; use e.g. \[32, 64, 128\]"),
        (32.5, TypeError, "group_size must be a whole number"),
    ],
)
def test_bad_group_sizes_are_refused(group_size, error, message):
    with pytest.raises(error, match=message):
        quant.fake_quantize(W, granularity="group", group_size=group_size)


def test_a_group_size_alone_means_groups_and_is_not_ignored():
    with pytest.raises(ValueError, match="does not divide"):
        quant.fake_quantize(W, group_size=100)  # was silently per channel
    by_32 = quant.fake_quantize(W, bits=4, group_size=32)
    torch.testing.assert_close(by_32, quant.fake_quantize(W, bits=4, granularity="group",
                                                          group_size=32))  # fmt: skip
    assert not torch.equal(by_32, quant.fake_quantize(W, bits=4))


def test_granularity_is_a_label_in_any_case():
    torch.testing.assert_close(quant.fake_quantize(W, granularity="Channel"),
                               quant.fake_quantize(W, granularity="channel"))  # fmt: skip
    with pytest.raises(ValueError, match=r"Unknown granularity 'row'; use one of \['channel'"):
        quant.fake_quantize(W, granularity="row")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_weights_is_reported_not_spread(bad):
    w = W.clone()
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"w holds 1 NaN/inf value\(s\) of 1024"):
        quant.fake_quantize(w, granularity="tensor")  # one NaN made the whole result NaN before
    layer = torch.nn.Linear(128, 8, bias=False)
    with torch.no_grad():
        layer.weight[0, 0] = bad
    for quantized in (quant_linears.Int8WeightOnlyLinear, quant_linears.Int4WeightOnlyLinear):
        with pytest.raises(ValueError, match="w holds 1 NaN/inf"):
            quantized(layer)


class Logits(torch.nn.Module):
    def __init__(self, vocab=11, value=0.0):
        super().__init__()
        self.vocab, self.value = vocab, value

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, self.vocab), self.value)
        return type("Out", (), {"logits": logits})()


def test_perplexity_takes_ids_as_a_tokenizer_returns_them():
    ids = torch.randint(0, 11, (1, 50))  # (1, n): ZeroDivisionError before
    assert quant.perplexity(Logits(), ids) == pytest.approx(11)
    assert quant.perplexity(Logits(), ids[0]) == pytest.approx(11)
    with pytest.raises(ValueError, match=r"one sequence of at least 2 tokens.*got shape \(2, 25\)"):
        quant.perplexity(Logits(), ids.reshape(2, 25))
    with pytest.raises(ValueError, match=r"got shape \(1,\)"):
        quant.perplexity(Logits(), ids[0, :1])
    with pytest.raises(TypeError, match="tensor of token ids"):
        quant.perplexity(Logits(), ids.float())


def test_perplexity_of_nan_logits_is_an_error_not_nan():
    with pytest.raises(ValueError, match="logits hold NaN or inf"):
        quant.perplexity(Logits(value=math.nan), torch.randint(0, 11, (40,)))


def test_agreement_needs_matching_finite_logits():
    with pytest.raises(ValueError, match=r"differ in shape: \(4, 11\) vs \(5, 11\)"):
        quant.agreement_and_kl(torch.zeros(4, 11), torch.zeros(5, 11))
    bad = torch.zeros(4, 11)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="logits holds 1 NaN/inf"):
        quant.agreement_and_kl(torch.zeros(4, 11), bad)


# --- memory formulas and the search -------------------------------------------------------

SHAPE = shapes.Shape.of("llama-2-7b")


def test_kv_cache_bytes_refuses_a_dtype_name_at_once():
    with pytest.raises(TypeError, match="bytes_per_value must be a finite number, got 'fp16'"):
        shapes.kv_cache_bytes(SHAPE, 1, 4096, "fp16")  # built a multi-GB string before
    with pytest.raises(TypeError, match="batch must be a whole number, got 1.5"):
        shapes.kv_cache_bytes(SHAPE, 1.5, 4096, 2)
    with pytest.raises(ValueError, match="context must be at least 0, got -1"):
        shapes.kv_cache_bytes(SHAPE, 1, -1, 2)
    with pytest.raises(TypeError, match=r"pass shapes.Shape.of\(...\)"):
        shapes.kv_cache_bytes("llama-2-7b", 1, 4096, 2)
    assert shapes.kv_cache_bytes(SHAPE, np.int64(2), 10, 2) == 2 * shapes.kv_cache_bytes(
        SHAPE, 1, 10, 2
    )  # a count read from a DataFrame is a whole number too


def test_shape_of_a_partial_config_names_what_is_missing():
    with pytest.raises(ValueError, match=r"lacks \['intermediate_size', 'num_attention_heads'"):
        shapes.Shape.of({"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 10})
    assert shapes.Shape.of("LLAMA-2-7B") == SHAPE  # names in any case
    assert shapes.Shape.of(SHAPE) is SHAPE


@pytest.mark.parametrize("start", [0, -3])
def test_the_search_refuses_a_start_that_would_never_grow(start):
    with pytest.raises(ValueError, match=f"start must be at least 1, got {start}"):
        memory.largest_fitting(lambda n: None, start=start)  # looped forever before


def test_the_search_refuses_a_start_above_the_limit():
    with pytest.raises(ValueError, match=r"limit \(5\) is below start \(10\)"):
        memory.largest_fitting(lambda n: None, start=10, limit=5)  # returned 10 before
    with pytest.raises(TypeError, match="trial must be a function"):
        memory.largest_fitting(100)


def test_serving_memory_refuses_bad_tp_and_sizes():
    with pytest.raises(ValueError, match="TP degree must be at least 1, got 0"):
        shapes.serving_memory(SHAPE, 1, 128, 2, 2, tp=0)  # ZeroDivisionError before
    with pytest.raises(ValueError, match="TP degree must be at least 1, got -1"):
        shapes.serving_memory(SHAPE, 1, 128, 2, 2, tp=-1)
    with pytest.raises(TypeError, match="weight_bytes_per_param must be a finite number"):
        shapes.serving_memory(SHAPE, 1, 128, "int8", 2)


def test_peak_memory_takes_a_device_name():
    with memory.PeakMemory("CPU") as peak:
        torch.ones(1000)
    assert peak.device == torch.device("cpu") and peak.peak_bytes > 0
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"), memory.PeakMemory("gpu0"):
        pass


# --- devices, dtypes and the model loader -------------------------------------------------


def test_functions_taking_a_device_accept_its_name():
    assert device.resolve_dtype("BF16", "cpu") is torch.bfloat16  # AttributeError before
    assert device.preset("cpu", override="CPU").kind == "cpu"
    assert device.describe("cpu")["device"] == "cpu"
    assert device.serving_dtype("cpu") is torch.float32
    assert device.pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        device.resolve_dtype("fp32", "tpu")
    with pytest.raises(ValueError, match=r"Unknown preset 'huge'; use one of \['cpu'"):
        device.preset("cpu", override="huge")
    with pytest.raises(ValueError, match="Unknown dtype 'int8'"):
        device.resolve_dtype("int8", "cpu")


def test_dtype_names_reach_the_model_builders():
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=10)  # fmt: skip
    assert models.llama_from_config(dtype="bf16", **tiny).lm_head.weight.dtype is torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype 'half-ish'"):
        models.load_smollm2(dtype="half-ish", source="random")
    with pytest.raises(ValueError, match="Unknown architecture 'Llama-9'"):
        models.llama_from_config("Llama-9")
