"""Issue 22: reliability, round 2 — each test is one finding: the call, and its error or value.

No evidence made of NaN (verdicts, planner, serving summaries), files written whole and read
defensively (ceilings, the model cache), one line naming the fix at every entry point. The
property test throwing random bad values at every public function is test_reliability_props.py.
"""

import math

import numpy as np
import pandas as pd
import pytest

from helpers import verdicts
from helpers.verdicts import FAILS, HOLDS, NOT_MEASURED

# --- verdicts: never "holds" on evidence that is not there ------------------------------------


def test_nan_spreads_are_not_measured_not_holds():
    nan = (math.nan, math.nan)
    assert verdicts.compare("a", 1.0, nan, "b", 5.0, nan).verdict == NOT_MEASURED  # "holds" before
    assert verdicts.compare("a", 1.0, (0.9, math.nan), "b", 5.0, None).verdict == NOT_MEASURED
    assert verdicts.compare("a", 1.0, None, "b", None, None).verdict == NOT_MEASURED


def test_reversed_or_malformed_spreads_are_refused():
    with pytest.raises(ValueError, match=r"spread_a is \(3, 1\), high before low: pass \(low, hi"):
        verdicts.compare("a", 2.0, (3.0, 1.0), "b", 9.0, (8.0, 10.0))  # "held" before
    with pytest.raises(ValueError, match=r"spread_b must be a \(low, high\) pair.*\(1, 2, 3\)"):
        verdicts.compare("a", 2.0, None, "b", 2.0, (1, 2, 3))
    with pytest.raises(TypeError, match="spread_a must be a \\(low, high\\) pair"):
        verdicts.compare("a", 2.0, 0.5, "b", 2.0, None)


@pytest.mark.parametrize("bad", ["12", [1.0, 2.0], np.array([1.0, 2.0]), True])
def test_non_numeric_values_are_refused(bad):
    with pytest.raises(TypeError, match=r"^(a|value) must be (a|one) number"):
        verdicts.compare("a", bad, None, "b", 2.0, None)
    with pytest.raises(TypeError, match="value must be"):
        verdicts.at_most("x", bad, 2.0)


def test_inf_is_not_a_measurement():
    with pytest.raises(ValueError, match="value is inf: a measurement is finite"):
        verdicts.close_to("x", math.inf, 1.0, 0.1)


def test_monotonic_given_a_dict_says_so_instead_of_judging_its_keys():
    with pytest.raises(TypeError, match=r"values is a dict \(monotonic would judge its keys\)"):
        verdicts.monotonic("tokens/s", {1: 30.0, 2: 20.0, 4: 10.0}, decreasing=False)
    with pytest.raises(TypeError, match=r"values\[1\] must be a number"):
        verdicts.monotonic("tokens/s", [1.0, "2"])
    assert verdicts.monotonic("x", pd.Series([3.0, 2.0, 1.0])).verdict == HOLDS


def test_close_to_a_target_of_zero_is_decided_not_unmeasured():
    assert verdicts.close_to("x", 5.0, 0, 0.1).verdict == FAILS  # "not measured here" before
    assert verdicts.close_to("x", 0.0, 0, 0.1).verdict == HOLDS
    assert verdicts.close_to("x", None, 0, 0.1).verdict == NOT_MEASURED
    assert verdicts.close_to("x", 1.0, math.nan, 0.1).verdict == NOT_MEASURED
    with pytest.raises(ValueError, match="rel_tol must be a fraction ≥ 0"):
        verdicts.close_to("x", 1.0, 1.0, -0.1)


def test_rows_take_decisions_only():
    with pytest.raises(TypeError, match="decision must be a verdicts.Decision"):
        verdicts.row("claim", "evidence", "holds")
    assert verdicts.ms(None) == "not measured"
