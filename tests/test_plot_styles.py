"""One colour per entity across the course's figures (issue 19)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from helpers import plots, profile  # noqa: E402
from helpers.roofline import Ceilings  # noqa: E402


def same(a, b) -> bool:
    return mcolors.to_hex(a) == mcolors.to_hex(b)


@pytest.mark.parametrize("family", sorted(plots.STYLES))
def test_no_two_entities_of_a_family_share_a_colour_and_marker(family):
    looks = [(mcolors.to_hex(s["color"]), s["marker"]) for s in plots.STYLES[family].values()]
    colours = [c for c, _ in looks]
    assert len(set(colours)) == len(colours), f"{family}: two entities share a colour"


def test_names_find_their_family_entry():
    assert plots.style("precision", "int8 weight-only (torchao)") == plots.style(
        "precision", "int8"
    )
    assert plots.style("policy", "chunk 32") == plots.style("policy", "chunked")
    assert plots.style("tp", "TP 8") != plots.style("tp", "TP 2")
    with pytest.raises(KeyError, match="add it to helpers.plots.STYLES"):
        plots.style("precision", "int2")
    with pytest.raises(KeyError, match="use one of"):
        plots.style("colour", "fp32")


def test_the_roofline_draws_each_format_in_its_colour():
    ceilings = Ceilings(
        device="cpu",
        matmul_flops={"fp32": 1e11, "bf16": 3e11},
        read_bandwidth=2e10,
        copy_bandwidth=1e10,
    )
    ax = plots.roofline(ceilings)
    by_label = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for dtype in ("fp32", "bf16"):
        (label,) = [lab for lab in by_label if lab.startswith(dtype)]
        assert same(by_label[label], plots.style("precision", dtype)["color"])


def test_profile_bars_colour_each_category_the_same_everywhere():
    parts = pd.DataFrame(
        {"category": list(profile.CATEGORIES), "predicted_ms": 1.0, "measured_ms": 2.0}
    )
    ax = plots.profile_bars(parts.iloc[::-1])  # order does not change a category's colour
    handles, labels = ax.get_legend_handles_labels()
    assert sorted(labels) == sorted(profile.CATEGORIES)
    for handle, label in zip(handles, labels, strict=True):
        colour = handle.patches[0].get_facecolor()
        assert same(colour, plots.style("category", label)["color"])
