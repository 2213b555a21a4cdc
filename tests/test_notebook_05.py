"""Notebook 05 writes the engine's step itself; it must serve exactly as the helper's step does."""

import pandas as pd
import pytest
import torch

from helpers import serving
from tests.notebook_defs import definitions

nb = definitions("05_serving_under_load")

MIXED = [(5, 6, 0.0), (12, 3, 0.0), (3, 8, 0.01), (20, 5, 0.02), (7, 1, 0.03), (9, 7, 0.03)]
COLUMNS = ["admitted_s", "first_token_s", "finish_s", "output_tokens", "preemptions", "queue_s"]


def requests(spec=MIXED, stop=None):
    gen = torch.Generator().manual_seed(0)
    return [
        serving.Request(torch.randint(0, 97, (p,), generator=gen), n, a, stop) for p, n, a in spec
    ]


def linear_steps(step):
    return 0.01 + 0.001 * step.tokens + 0.002 * step.seqs


@pytest.mark.parametrize("policy", ["continuous", "static"])
@pytest.mark.parametrize("prefill_chunk", [None, 4])
@pytest.mark.parametrize("kv_blocks", [64, 12])  # 12 blocks of 2: requests preempt each other
def test_the_notebooks_step_serves_as_the_helpers(tiny_llama, policy, prefill_chunk, kv_blocks):
    kwargs = dict(policy=policy, max_batch=4, block_size=2, kv_blocks=kv_blocks,
                  prefill_chunk=prefill_chunk, clock=linear_steps)  # fmt: skip
    helper = serving.run(tiny_llama, requests(), **kwargs)
    notebook = serving.run(tiny_llama, requests(), step=nb.step, **kwargs)
    pd.testing.assert_frame_equal(helper[COLUMNS], notebook[COLUMNS])
    assert helper.tokens.tolist() == notebook.tokens.tolist()
    steps = ["seqs", "tokens", "context", "blocks_in_use", "preempted", "waiting"]
    pd.testing.assert_frame_equal(helper.attrs["steps"][steps], notebook.attrs["steps"][steps])


def test_the_notebooks_step_preempts_and_never_admits_in_that_step():
    df = serving.run(None, requests(), max_batch=4, block_size=2, kv_blocks=12,
                     clock=linear_steps, step=nb.step)  # fmt: skip
    steps = df.attrs["steps"]
    assert steps.preempted.sum() > 0
    preempting = set(steps.start_s[steps.preempted > 0])
    assert not preempting & set(df.admitted_s)


def test_a_bad_step_function_is_refused():
    with pytest.raises(TypeError, match="step must be None or a function"):
        serving.run(None, requests(), clock=linear_steps, step="mine")


def test_the_sweep_figure_gives_each_policy_one_colour_and_its_title_clears_the_panels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors

    from helpers import plots

    sweep = pd.DataFrame(
        [{"engine": e, "rate": r, "a": r * k, "b": 1 / r}
         for k, e in enumerate(["static", "continuous", "chunked"], 1) for r in (1, 2, 4)]
    )  # fmt: skip
    fig = plots.policy_panels(sweep, {"a": "A p99 (s)", "b": "B (s)"}, "a long title", log=("a",))
    fig.canvas.draw()
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in ("static", "continuous", "chunked"):
                want = plots.style("policy", line.get_label())["color"]
                assert mcolors.to_hex(line.get_color()) == mcolors.to_hex(want)
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert not title.overlaps(ax.title.get_window_extent(renderer))
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"
