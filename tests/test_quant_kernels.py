"""PyTorch's packed int8/int4 CPU kernels only where they are valid (issue 22): every width from
8 to 4096 through both quantized linears, in a subprocess (a kernel's segmentation fault would
kill pytest itself), with no crash and the same output as the readable path."""

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import quant, quant_backends, quant_linears

SWEEP = textwrap.dedent(
    """
    import torch
    from helpers import quant_linears
    torch.manual_seed(0)
    widths = [8, 15, 16, 17, 24, 32, 48, 64, 96, 100, 127, 128, 192, 256, 576, 1000, 4096]
    for in_f in widths:
        for out_f in (8, 16, 48, 100):
            linear = torch.nn.Linear(in_f, out_f, bias=False)
            x = torch.randn(3, in_f)
            fast = quant_linears.Int8WeightOnlyLinear(linear)  # packed=None: the kernel where valid
            slow = quant_linears.Int8WeightOnlyLinear(linear, packed=False)
            torch.testing.assert_close(fast(x), slow(x), rtol=2e-2, atol=2e-2)
            for group in [g for g in (16, 32, 64, 128) if in_f % g == 0]:
                fast = quant_linears.Int4WeightOnlyLinear(linear, group_size=group)
                slow = quant_linears.Int4WeightOnlyLinear(linear, group_size=group, packed=False)
                torch.testing.assert_close(fast(x), slow(x), rtol=2e-2, atol=5e-2)
    print("swept", len(widths))
    """
)


def test_every_width_runs_both_paths_without_a_crash_and_agrees():
    done = subprocess.run(
        [sys.executable, "-c", SWEEP], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "swept 17" in done.stdout


def test_the_layer_says_which_path_it_chose_and_why():
    odd = quant_linears.Int8WeightOnlyLinear(torch.nn.Linear(100, 16))
    assert not odd.packed and "in_features divisible by 16, got 100" in odd.path
    small_group = quant_linears.Int4WeightOnlyLinear(torch.nn.Linear(48, 32), group_size=16)
    assert not small_group.packed and "not 16" in small_group.path
    if hasattr(torch, "_weight_int8pack_mm"):
        assert quant_linears.Int8WeightOnlyLinear(torch.nn.Linear(96, 16)).path == "packed kernel"


def test_forcing_the_kernel_on_a_shape_it_cannot_run_is_one_line():
    with pytest.raises(ValueError, match="in_features divisible by 16, got 100"):
        quant_linears.Int8WeightOnlyLinear(torch.nn.Linear(100, 16), packed=True)
    with pytest.raises(ValueError, match="out_features divisible by 16, got 8"):
        quant_linears.Int4WeightOnlyLinear(torch.nn.Linear(64, 8), group_size=64, packed=True)


def test_the_suggested_group_sizes_are_ones_the_kernel_runs():
    assert quant_linears.int4_group_sizes(576) == [32, 64]
    with pytest.raises(ValueError, match=r"use e.g. \[32, 64\]"):
        quant.quantize(torch.randn(4, 576), bits=4, group_size=100)


def test_measure_backends_checks_every_name_before_measuring_any():
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the names were checked")

    with pytest.raises(ValueError, match="int9"):
        quant_backends.measure_backends(
            load, "cpu", torch.zeros(8, dtype=torch.long), [1], names=["fp32", "int9"]
        )
