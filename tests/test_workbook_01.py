"""Notebook 01's exercises against known answers worked out by hand (issue 19): each fails with
None and with a wrong answer, never prints its expected value on a miss, passes with the right
one."""

import pytest
import torch

from helpers import exercises, memory, quant, quant_linears, workbook

TESTED = {"01.int4-bytes", "01.int8-error", "01.group-128-error", "01.bits-or-groups"}


def right_int4_bytes(out_features, in_features, group_size):
    groups = out_features * in_features // group_size
    return out_features * in_features // 2 + groups * 4  # two bf16 numbers per group


def wrong_int4_bytes(out_features, in_features, group_size):
    return out_features * in_features // 2  # forgets the scales and zero points


def test_int4_bytes(capsys):
    key = "01.int4-bytes"
    assert not workbook.derive(key, None)
    assert not workbook.derive(key, wrong_int4_bytes)
    out = capsys.readouterr().out
    assert "Hint:" in out and "9.437e+06" not in out  # 4096 × 4096's answer is not shown
    assert workbook.derive(key, right_int4_bytes)
    # 4096 × 4096 in groups of 64: 8 MiB of nibbles + 262,144 groups × 4 bytes = 9,437,184
    assert right_int4_bytes(4096, 4096, 64) == 9_437_184


def test_int4_bytes_are_what_the_course_s_int4_layer_stores():
    layer = quant_linears.Int4WeightOnlyLinear(torch.nn.Linear(256, 48, bias=False), group_size=64)
    expected = exercises.BANK["01.int4-bytes"].expected(48, 256, 64)
    assert memory.weight_bytes(layer, include_buffers=True) == expected == 48 * 128 + 48 * 4 * 4


@pytest.mark.parametrize("key", ["01.int8-error", "01.group-128-error"])
def test_error_predictions(key, capsys):
    assert not workbook.predict(key, None, measured=0.0092)
    assert not workbook.predict(key, 0.0092 * 1.5, measured=0.0092)
    before = capsys.readouterr().out.split("measured here")[0]  # the value is shown after
    assert "Hint:" in before and "0.0092" not in before
    assert workbook.predict(key, 0.0092 * 1.08, measured=0.0092)  # inside the stated ±10 %


def test_the_rounding_model_predicts_int8_error_within_the_tolerance():
    """The solution's model on a planted matrix: rows of very different sizes, heavy tails."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * torch.logspace(-2, 0, 64)[:, None]
    step = w.abs().amax(1) / 127
    predicted = (step.pow(2).sum() * w.shape[1] / 12).sqrt() / w.norm()
    measured = quant.relative_error(quant.fake_quantize(w, bits=8, granularity="channel"), w)
    assert workbook.predict("01.int8-error", predicted.item(), measured)


def sweep(weight, configs):
    errors = [
        quant.relative_error(
            quant.fake_quantize(weight, bits=b, group_size=g, symmetric=False), weight
        )
        for b, g in configs
    ]
    return {"configs": configs, "error": errors}


def test_bits_or_groups():
    torch.manual_seed(0)
    weight = torch.randn(32, 256)
    key, given = "01.bits-or-groups", dict(budget_bits=4.5)
    configs = [(3, 32), (4, 64), (4, 128), (5, 32)]  # 4, 4.5, 4.25 and 6 bits per weight
    result = sweep(weight, configs)
    # within 4.5 bits: 4 bits in groups of 64 err least (more levels beat finer groups here)
    best = min(zip(result["error"][:3], configs[:3], strict=True))[1]
    assert best == (4, 64)
    assert not workbook.investigate(key, None, weight=weight, **given)
    assert not workbook.investigate(key, {**result, "best": (5, 32)}, weight=weight, **given)
    assert not workbook.investigate(key, {**result, "best": (3, 32)}, weight=weight, **given)
    fake = {**result, "error": [e * 0.5 for e in result["error"]], "best": best}
    assert not workbook.investigate(key, fake, weight=weight, **given)  # not measured
    few = sweep(weight, configs[:3]) | {"best": best}
    assert not workbook.investigate(key, few, weight=weight, **given)
    inside = sweep(weight, [(3, 32), (4, 64), (4, 128), (3, 64)]) | {"best": (4, 64)}
    assert not workbook.investigate(key, inside, weight=weight, **given)  # none over the budget
    assert workbook.investigate(key, {**result, "best": best}, weight=weight, **given)
