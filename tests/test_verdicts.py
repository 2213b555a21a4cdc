import math

import nbformat
import pytest
from IPython.core.formatters import DisplayFormatter
from nbconvert import HTMLExporter

from helpers import verdicts
from helpers.verdicts import FAILS, HOLDS, NOISE, NOT_MEASURED


def test_compare_overlapping_spreads_is_within_noise():
    verdict, rule = verdicts.compare("int8", 30.0, (28.0, 33.0), "fp32", 31.0, (29.5, 32.0))
    assert verdict == NOISE
    assert "[28, 33]" in rule and "[29.5, 32]" in rule


def test_compare_separated_spreads_decide_by_direction():
    faster = verdicts.compare("TP 2", 13.5, (13.0, 14.0), "TP 1", 22.0, (21.0, 23.0))
    assert faster.verdict == HOLDS
    claimed_higher = verdicts.compare("TP 2", 13.5, (13, 14), "TP 1", 22.0, (21, 23), "higher")
    assert claimed_higher.verdict == FAILS
    slower = verdicts.compare("int8", 74.6, (74.0, 75.0), "fp32", 29.4, (29.0, 30.0))
    assert slower.verdict == FAILS


def test_compare_without_spread_uses_the_relative_threshold():
    # 0.4 % apart, one run each: no verdict either way
    assert verdicts.compare("a", 100.4, None, "b", 100.0, None, "higher").verdict == NOISE
    decided = verdicts.compare("a", 110.0, None, "b", 100.0, None, "higher", rel_tol=0.05)
    assert decided.verdict == HOLDS
    assert "5%" in decided.rule


def test_compare_one_sided_spread_treats_the_other_as_a_point():
    assert verdicts.compare("a", 10.0, (9.0, 11.0), "b", 10.5, None).verdict == NOISE
    assert verdicts.compare("a", 10.0, (9.0, 11.0), "b", 12.0, None).verdict == HOLDS


def test_compare_rejects_unknown_direction_and_reports_missing_numbers():
    with pytest.raises(ValueError, match="lower"):
        verdicts.compare("a", 1, None, "b", 2, None, "faster")
    assert verdicts.compare("a", math.nan, None, "b", 2.0, None).verdict == NOT_MEASURED


def test_limits_and_closeness():
    assert verdicts.at_most("peak", 1.2, 1.3, "GiB") == (HOLDS, "peak ≤ 1.3 GiB")
    assert verdicts.at_most("peak", 1.52, 1.3, "GiB").verdict == FAILS
    assert verdicts.at_least("pinned ÷ pageable", 6.8, 1.0).verdict == HOLDS
    assert verdicts.at_least("pinned ÷ pageable", 0.9, 1.0).verdict == FAILS
    assert verdicts.close_to("KV cache", 1.02e6, 1.0e6, 0.05).verdict == HOLDS
    assert verdicts.close_to("KV cache", 2.0e6, 1.0e6, 0.05).verdict == FAILS
    assert verdicts.at_most("peak", None, 1.3).verdict == NOT_MEASURED


def test_monotonic():
    assert verdicts.monotonic("latency", [22.0, 13.5, 9.0]).verdict == HOLDS
    assert verdicts.monotonic("latency", [22.0, 13.5, 15.0]).verdict == FAILS
    assert verdicts.monotonic("latency", [22.0, 22.3, 21.9]).verdict == NOISE
    # a small step back inside the tolerance does not break the trend
    assert verdicts.monotonic("tokens/s", [10, 20, 19.5, 40], decreasing=False).verdict == HOLDS
    assert verdicts.monotonic("tokens/s", [10]).verdict == NOT_MEASURED


def test_table_renders_long_text_in_full():
    evidence = ("int8 weight-only 74.6 ms (IQR 74.0–75.1) vs fp32 29.4 ms; " * 6)[:300]
    assert len(evidence) == 300
    rows = [
        verdicts.row("Quantized decode is faster at batch 1", evidence,
                     verdicts.compare("int8", 74.6, (74.0, 75.1), "fp32", 29.4, (29.0, 30.0))),
        ("A & B <tags>", "x", "rule", HOLDS),
    ]  # fmt: skip
    shown = verdicts.table(rows)
    assert list(shown.frame.columns) == verdicts.COLUMNS
    assert shown.frame.loc[0, "verdict"] == FAILS
    page = shown._repr_html_()
    assert evidence in page and "white-space:normal" in page
    assert "A &amp; B &lt;tags&gt;" in page
    assert "…" not in page and "..." not in page
    text = repr(shown)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "".join(text.split()).count("".join(evidence.split())) == 1

    # as IPython displays it: the rows also travel in the output's metadata
    data, metadata = DisplayFormatter().format(shown)
    assert data["text/html"] == page
    assert metadata["text/html"][verdicts.METADATA_KEY][0]["evidence (this run)"] == evidence

    # and through nbconvert's HTML export, as `make run` writes it
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("verdicts.table(rows)")
    cell.outputs = [
        nbformat.v4.new_output("execute_result", data, metadata=metadata, execution_count=1)
    ]
    nb.cells.append(cell)
    exported, _ = HTMLExporter().from_notebook_node(nb)
    assert evidence in exported


def test_table_rejects_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match="4 fields"):
        verdicts.table([("claim", "evidence", HOLDS)])


def test_ms_formats_a_timing_and_its_spread():
    assert verdicts.ms(0.01234) == "12.3 ms"
    assert verdicts.ms(0.01234, 0.0119, 0.0128) == "12.3 ms (IQR 11.9–12.8)"
    assert verdicts.ms(2.0189, 0.678, 2.0201) == "2,019 ms (IQR 678–2,020)"  # no 2.02e+03


def test_say_follows_the_verdict_it_is_given():
    texts = {"holds": "bandwidth sets it", "fails": "something else costs more"}
    assert verdicts.say(verdicts.at_most("x", 1.0, 2.0), **texts) == "bandwidth sets it"
    assert verdicts.say(verdicts.at_most("x", 3.0, 2.0), **texts) == "something else costs more"
    noisy = verdicts.compare("a", 10.0, (9, 11), "b", 10.5, (9.5, 11.5))
    assert verdicts.say(noisy, **texts).startswith("Verdict: within noise")
    assert verdicts.say(noisy, noise="too close to call", **texts) == "too close to call"
    missing = verdicts.at_most("x", float("nan"), 2.0)
    assert "not measured here" in verdicts.say(missing, **texts)
    with pytest.raises(TypeError, match="not_measured"):
        verdicts.say(noisy, hold="typo")
