"""Notebook 00 writes the roofline itself; it must agree with known answers and the helper."""

import pytest

from helpers import roofline
from tests.notebook_defs import definitions

nb = definitions("00_your_machine")


def test_roofline_known_answers():
    peak, bw = 100e12, 2e12  # ridge at 50 FLOP/byte
    assert nb.ridge_point(peak, bw) == 50
    assert nb.attainable_flops(10, peak, bw) == 20e12  # memory-bound: intensity × bandwidth
    assert nb.attainable_flops(1000, peak, bw) == peak  # compute-bound: the peak
    assert nb.matmul_intensity(600, 600, 600, 4) == pytest.approx(100)  # 2n³ / (3n² · 4)
    assert nb.matmul_intensity(1, 4096, 4096, 4) == pytest.approx(0.5, rel=1e-3)  # matrix-vector


@pytest.mark.parametrize("intensity", [0.01, 0.5, 49.9, 50, 1e4])
def test_roofline_equals_the_helper(intensity):
    assert nb.attainable_flops(intensity, 100e12, 2e12) == roofline.attainable_flops(
        intensity, 100e12, 2e12
    )
    assert nb.matmul_intensity(7, 300, 5, 2) == roofline.matmul_intensity(7, 300, 5, 2)
