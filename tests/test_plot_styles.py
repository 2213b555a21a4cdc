"""One colour per entity across the course's figures (issue 19)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import Collection, PathCollection  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402
from matplotlib.ticker import FixedFormatter  # noqa: E402

from helpers import overhead, plots, plots_machine, plots_parallel, profile  # noqa: E402
from helpers.roofline import Ceilings  # noqa: E402


def same(a, b) -> bool:
    return mcolors.to_hex(a) == mcolors.to_hex(b)


@pytest.mark.parametrize("family", sorted(plots.STYLES))
def test_no_two_entities_of_a_family_share_a_colour_and_marker(family):
    looks = [(mcolors.to_hex(s["color"]), s["marker"]) for s in plots.STYLES[family].values()]
    assert len(set(looks)) == len(looks), f"{family}: two entities share a colour and marker"
    if family != "backend":  # backends take their precision's colour, told apart by marker
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


# --- Every figure of the course, rendered on small synthetic data (issue 19) -----------------
# Each builder returns the figure and {label: (family, entity)}: the artist the figure labels so
# (in a key, a panel title or a bar) must be drawn in that entity's mapped colour.

CEILINGS = Ceilings(
    device="cpu",
    matmul_flops={"fp32": 3e11, "fp16": 3.2e11, "bf16": 2e12},
    read_bandwidth=2.5e10,
    copy_bandwidth=1e10,
    linear_flops={1: 1e10, 4: 4e10, 16: 1e11},
)


def _roofline():
    points = [
        {
            "intensity": n / 2,
            "flops": f * 0.7,
            "dtype": d,
            "label": f"{d} n={n}" if n == 256 and d == "fp32" else "",
        }
        for d, f in CEILINGS.matmul_flops.items()
        for n in (64, 128, 256)
    ]
    ax = plots.roofline(CEILINGS, points, skinny=CEILINGS.linear_flops)
    key = {f"{d} matmul": ("precision", d) for d in CEILINGS.matmul_flops}
    return ax.figure, key | {"memory roof": ("limit", "memory")}


def _roofline_decode():
    points = [
        {"intensity": 0.5, "flops": f, "label": name, "marker": "*", "engine": engine, "xytext": xy}
        for name, f, engine, xy in (
            ("static-cache loop", 8e9, "course", (12, 6)),
            ("generate", 7.5e9, "generate", (12, -6)),
        )
    ]
    return plots.roofline(CEILINGS, points).figure, {}


def _roofline_batches():
    """Notebook 04's decode steps: one format, a star per batch, each labelled (B=1 … B=32)."""
    points = [
        {
            "intensity": b / 2,
            "flops": b / 2 * 2e10,
            "dtype": "fp32",
            "label": f"B={b}",
            "marker": "*",
            "xytext": (8, -10),  # as notebook 04 places them
        }
        for b in (1, 2, 4, 8, 16, 32)
    ]
    return plots.roofline(CEILINGS, points).figure, {}


def _work_sweep():
    rows, ns = [1, 1, 1, 1, 256, 1024, 2048], [16, 64, 256, 4096, 1024, 1024, 2048]
    memory = np.array([4e-8, 6e-7, 1e-5, 2.5e-3, 1.5e-3, 6e-3, 5e-2])
    compute = memory * np.array([0.01, 0.01, 0.01, 0.01, 1.2, 1.2, 1.2])
    measured = np.maximum(memory, compute) + 2e-6
    return pd.DataFrame(
        {
            "rows": rows,
            "n": ns,
            "memory_s": memory,
            "compute_s": compute,
            "measured_s": measured,
            "q1_s": measured * 0.9,
            "q3_s": measured * 1.1,
        }
    )


def _three_limits():
    ax = plots_machine.three_limits(_work_sweep(), 2e-6)
    return ax.figure, {f"{k}-bound": ("limit", k) for k in ("overhead", "memory", "compute")}


def _read_staircase():
    sizes = np.array([2**18, 2**20, 2**22, 2**24, 2**26, 2**28])
    bw = np.array([250, 260, 65, 60, 53, 28]) * 1e9
    sweep = pd.DataFrame({"bytes": sizes, "bandwidth": bw, "low": bw * 0.95, "high": bw * 1.05})
    caches = {"L1": 48 * 2**10, "L2": 2 * 2**20, "L3": 480 * 2**20}
    ax = plots_machine.read_staircase(sweep, caches, 540 * 2**20)
    return ax.figure, {"read bandwidth": ("limit", "memory")}


def _step_overhead():
    steps = pd.DataFrame({"layers": [1, 2, 4, 8], "step_s": [1e-3, 1.4e-3, 2.2e-3, 3.8e-3]})
    steps["q1_s"], steps["q3_s"] = steps.step_s * 0.9, steps.step_s * 1.1
    fit = overhead.fit_line(steps.layers, steps.step_s)
    return plots_machine.step_overhead(steps, fit).figure, {"measured": ("limit", "overhead")}


def _decode_vs_floor():
    what = [
        "predicted floor: bytes read ÷ read rate",
        "matmuls only (every Linear once)",
        "static-cache loop (the course's)",
        "generate, static cache",
        "generate, growing cache",
    ]
    results = pd.DataFrame({"what": what, "ms_per_token": [20.0, 22, 29, 35, 34]})
    results["q1"], results["q3"] = [None, None, 28, None, None], [None, None, 32, None, None]
    ax = plots_machine.decode_vs_floor(results, "decode")
    bars = {
        "predicted floor": ("limit", "memory"),
        "matmuls only": ("engine", "matmuls only"),
        "static-cache loop": ("engine", "course"),
        "generate, static": ("engine", "generate"),
        "generate, growing": ("engine", "generate, growing cache"),
    }
    return ax.figure, bars


def _copy_bandwidth():
    sizes = [2**18, 2**20, 2**22, 2**24, 2**26, 2**27]
    transfers = pd.DataFrame(
        {"size": sizes, "ceiling": "copy", "value": np.linspace(9e10, 3e10, 6)}
    )
    caches = {"L1": 48 * 2**10, "L2": 2 * 2**20, "L3": 480 * 2**20}
    return plots_machine.copy_bandwidth(transfers, caches, "copy").figure, {}


def _kv_cache_growth():
    contexts = [256 * 2**i for i in range(6)]
    curves = pd.DataFrame(
        {
            f"{kind}, batch {b}": [b * c * k * 1e-5 for c in contexts]
            for b in (1, 8, 32)
            for kind, k in (("GQA", 1), ("MHA", 3))
        },
        index=pd.Index(contexts, name="context (tokens)"),
    )
    return plots_machine.kv_cache_growth(curves, 0.5, "KV cache (fp32)"), {}


def _what_fits():
    frontier = pd.DataFrame(
        {"context": [32, 128, 512], "predicted": [24, 6, 1], "found": [20, 5, 1]}
    )
    ax = plots_machine.what_fits(frontier, [32, 128, 512], "what fits", "fp32")
    return ax.figure, {"found": ("precision", "fp32"), "predicted": ("precision", "fp32")}


def _vllm_concurrency():
    conc = pd.DataFrame(
        {
            "concurrency": [1, 2, 4, 8],
            "output_tokens_per_s": [15.0, 28, 34, 37],
            "itl_p50_s": [0.05, 0.052, 0.053, 0.066],
            "itl_p99_s": [0.07, 0.12, 0.3, 0.56],
        }
    )
    conc["predicted_tokens_per_s"] = conc.concurrency / conc.itl_p50_s.iloc[0]
    key = {"measured": ("engine", "vllm"), "prediction": ("engine", "vllm")}
    return plots_machine.vllm_concurrency(conc, "vLLM"), key


def _batch_sweep():
    runs = pd.DataFrame(
        [
            {"prompt": p, "batch": b, "tpot_s": 0.03 * (1 + b / 8) * (1 + p / 512), "oom": False}
            for p in (32, 128)
            for b in (1, 2, 4, 8, 16)
        ]
    )
    runs["tpot_q1_s"], runs["tpot_q3_s"] = runs.tpot_s * 0.95, runs.tpot_s * 1.05
    runs["tokens_per_s"] = runs.batch / runs.tpot_s
    return plots.batch_sweep(runs, 24.0), {}


def _policy_panels():
    data = pd.DataFrame(
        [
            {"engine": e, "rate": r, "ttft_s": r * k, "tokens_per_s": 10 * r / k}
            for e, k in (("static", 3), ("continuous", 1), ("chunk 32", 2))
            for r in (1, 2, 4, 6)
        ]
    )
    panels = {"ttft_s": "TTFT (s)", "tokens_per_s": "tokens/s"}
    fig = plots.policy_panels(data, panels, "a long title " * 8, capacity=5.0, log=("ttft_s",))
    return fig, {e: ("policy", e) for e in ("static", "continuous", "chunk 32")}


def _frontier():
    points = pd.DataFrame(
        [
            {
                "precision": d,
                "engine": "eager",
                "batch": b,
                "latency_s": 0.4 * k * (1 + b / 16),
                "tokens_per_s": 30 * b / k,
            }
            for d, k in (("bf16", 1), ("fp32", 2))
            for b in (1, 2, 4, 8)
        ]
    )
    ax = plots.frontier(
        points, points[points.precision == "bf16"], ["precision", "engine", "batch"]
    )
    return ax.figure, {
        "precision bf16": ("precision", "bf16"),
        "precision fp32": ("precision", "fp32"),
    }


def _sla():
    table = pd.DataFrame(
        [
            {
                "dtype": d,
                "tpot_ms": 5 * k * (1 + b / 32),
                "tokens_per_s": 100 * b / k,
                "fits": True,
                "tp": 1,
                "replicas": 8,
                "batch": b,
            }
            for d, k in (("fp16", 2), ("int8", 1))
            for b in (1, 8, 64)
        ]
    )
    ax = plots.sla(table, table.iloc[4], 30.0)
    return ax.figure, {"fp16": ("precision", "fp16"), "int8": ("precision", "int8")}


def _outliers():
    ratios = pd.DataFrame(
        [
            {
                "layer": i,
                "matrix": m,
                "max / std": 10 + i % 7 + k,
                "int8 error, per tensor": 0.04 * k,
                "int8 error, per channel": 0.01 * k,
            }
            for m, k in (("mlp.down_proj", 1), ("q_proj", 2))
            for i in range(12)
        ]
    )
    return plots.outliers(ratios, np.abs(np.random.default_rng(0).normal(size=256)), 5), {}


QUANT_BACKENDS = ["fp32", "int8 weight-only (torchao)", "int8 (bitsandbytes)", "nf4 (bitsandbytes)"]


def _quant_speed():
    batches = [1, 4, 16, 64]
    speed = pd.DataFrame(
        [
            {
                "backend": n,
                "batch": b,
                "ms": 20 + i * 5 + b,
                "q1_ms": 19 + i * 5 + b,
                "q3_ms": 21 + i * 5 + b,
            }
            for i, n in enumerate(QUANT_BACKENDS)
            for b in batches
        ]
    )
    floors = pd.DataFrame(
        [
            {"backend": n, "batch": b, "floor_ms": 5.0 + b / 8, "with_overhead_ms": 9.0 + b / 8}
            for n in QUANT_BACKENDS
            for b in np.geomspace(1, 64, 20)
        ]
    )
    compiled = pd.DataFrame(
        {
            "backend": ["fp32"],
            "batch": [1],
            "tpot_s": [0.015],
            "tpot_q1_s": [0.014],
            "tpot_q3_s": [0.016],
        }
    )
    fig = plots.quant_speed(speed, floors, compiled)
    return fig, {n: ("backend", n) for n in QUANT_BACKENDS}


def _tp_compute_vs_comm():
    layers = pd.DataFrame(
        [
            {
                "tp": t,
                "hidden": h,
                "batch": b,
                **{
                    f"{w}{q}_s": 1e-3 * h / 512 * b / 16 * f * m
                    for w, f in (("total", 1 / t), ("comm", 0.3), ("skew", 0.1))
                    for q, m in (("", 1), ("_q1", 0.9), ("_q3", 1.1))
                },
            }
            for t in (1, 2)
            for h in (512, 1024)
            for b in (1, 16, 128)
        ]
    )
    predicted = pd.Series({(h, b): h / 512 * b / 16 for h in (512, 1024) for b in (1, 16, 128)})
    fig = plots_parallel.tp_compute_vs_comm(layers, predicted, 2, "gloo")
    return fig, {
        "all-reduce": ("collective", "all-reduce"),
        "skew": ("collective", "skew"),
        "TP 1 total": ("tp", "TP 1"),
        "TP 2 total": ("tp", "TP 2"),
    }


def _tp_planner():
    names = ["gpt-fast-class: α = 4 µs", "production engines: α = 20 µs", "a PCIe box: α = 50 µs"]
    scaling = pd.DataFrame(
        [
            {
                "α": n,
                "tp": t,
                "tpot_ms": 6.6 / t + k * t,
                "tokens_per_s_per_gpu": 3400 / (1 + k * t),
            }
            for n, k in zip(names, (0.1, 0.3, 0.6), strict=True)
            for t in (1, 2, 4, 8)
        ]
    )
    fig = plots_parallel.tp_planner(scaling, [1, 2, 4, 8])
    return fig, {
        "gpt-fast": ("engine", "gpt-fast"),
        "production": ("engine", "production"),
        "PCIe box": ("engine", "pcie box"),
    }


def _allreduce():
    sizes = np.array([2**k for k in range(12, 25, 2)], dtype=float)
    seconds = 2e-4 + sizes / 1.3e9
    ar = pd.DataFrame(
        {"bytes": sizes, "seconds": seconds, "q1_s": seconds * 0.9, "q3_s": seconds * 1.2}
    )
    ax = plots_parallel.allreduce_alpha_beta(ar, 2e-4, 1 / 1.3e9, "all-reduce")
    return ax.figure, {"measured": ("collective", "all-reduce")}


def _tp_overhead():
    tp_parts = pd.DataFrame(
        [
            {
                "engine": e,
                "tp": t,
                "weights and KV": 4.8 / t,
                "overhead": o,
                "all-reduces": 0.1 * (t > 1),
            }
            for e, o in (("compiled", 1.8), ("eager", 31.0))
            for t in (1, 2, 4, 8)
        ]
    ).set_index(["engine", "tp"])
    fig = plots_parallel.tp_overhead(tp_parts, "the parts of a decode step")
    return fig, {
        "weights and KV": ("limit", "memory"),
        "overhead": ("limit", "overhead"),
        "all-reduces": ("collective", "all-reduce"),
    }


FIGURES = {
    f.__name__.strip("_"): f
    for f in [
        _roofline,
        _roofline_decode,
        _roofline_batches,
        _three_limits,
        _read_staircase,
        _step_overhead,
        _decode_vs_floor,
        _copy_bandwidth,
        _kv_cache_growth,
        _what_fits,
        _vllm_concurrency,
        _batch_sweep,
        _policy_panels,
        _frontier,
        _sla,
        _outliers,
        _quant_speed,
        _tp_compute_vs_comm,
        _tp_planner,
        _allreduce,
        _tp_overhead,
    ]
}


@pytest.fixture(params=sorted(FIGURES))
def drawn(request):
    plots.use_style()
    fig, key = FIGURES[request.param]()
    fig.canvas.draw()
    yield fig, key
    plt.close(fig)


def _colour_of(artist):
    if isinstance(artist, ErrorbarContainer):
        artist = artist.lines[0]
    if isinstance(artist, BarContainer):
        artist = artist.patches[0]
    if isinstance(artist, Line2D):
        return artist.get_color()
    if isinstance(artist, Collection):
        face = artist.get_facecolor()
        return face[0] if len(face) and face[0][3] > 0 else artist.get_edgecolor()[0]
    return artist.get_facecolor()


def labelled_colours(fig) -> list[tuple[str, object]]:
    """(label, colour) of every labelled artist: keys' entries, coloured panel titles, bars."""
    found = []
    for ax in fig.axes:
        found += [
            (lab, _colour_of(h)) for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)
        ]
        if ax.get_title():
            found.append((ax.get_title(), ax.title.get_color()))
        for patch, tick in zip(ax.patches, ax.get_yticklabels(), strict=False):
            if tick.get_text():  # horizontal bars: the tick names the bar
                found.append((tick.get_text(), patch.get_facecolor()))
    return found


def test_every_figure_draws_each_entity_in_its_mapped_colour(drawn):
    fig, key = drawn
    found = labelled_colours(fig)
    for fragment, (family, entity) in key.items():
        exact = [c for label, c in found if label.lower() == fragment.lower()]
        matches = exact or [c for label, c in found if fragment.lower() in label.lower()]
        assert matches, f"nothing labelled {fragment!r} in {[lab for lab, _ in found]}"
        for colour in matches:
            assert same(colour, plots.style(family, entity)["color"]), f"{fragment} off its colour"


def _data_points(ax) -> np.ndarray:
    """Display coordinates of every marker drawn in `ax` (lines with markers, scatters)."""
    points = []
    for line in ax.get_lines():
        if line.get_marker() not in (None, "None", "", " ") and line.get_visible():
            xy = np.column_stack(line.get_data()).astype(float)
            points.append(line.get_transform().transform(xy))
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and len(coll.get_offsets()):
            points.append(coll.get_offset_transform().transform(coll.get_offsets()))
    return np.concatenate(points) if points else np.empty((0, 2))


def test_no_key_covers_a_data_point(drawn):
    fig, _ = drawn
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    renderer = fig.canvas.get_renderer()
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            inside = [p for p in _data_points(ax) if box.contains(*p)]
            assert not inside, f"the key covers {len(inside)} points of {ax.get_title()!r}"


def _extents(texts, renderer):
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def _overlapping(boxes) -> list:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]


def test_no_label_is_drawn_over_another(drawn):
    fig, _ = drawn
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        assert not _overlapping(_extents(ax.texts, renderer)), (
            f"labels overlap in {ax.get_title()!r}"
        )
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            assert not _overlapping(_extents(ticks, renderer)), f"tick labels collide: {ticks}"
    # titles: the figure's above the panels', the keys off both
    tops = [ax.title for ax in fig.axes if ax.get_visible()] + (
        [fig._suptitle] if fig._suptitle else []
    )
    boxes = _extents(tops, renderer) + [lg.get_window_extent(renderer) for lg in fig.legends]
    assert not _overlapping(boxes), "a title or key overprints another"


def test_labels_do_not_cover_their_own_point(drawn):
    fig, _ = drawn
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for text in ax.texts:
            if isinstance(text, Annotation) and text.arrow_patch is not None:
                point = ax.transData.transform(text.xy)
                assert not text.get_window_extent(renderer).contains(*point), text.get_text()


def test_log_axes_write_plain_ticks(drawn):
    fig, _ = drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log" and ax.get_visible():
                formatter = axis.get_major_formatter()
                assert isinstance(formatter, plots.PlainLogFormatter | FixedFormatter), formatter


def test_plain_formatter_writes_one_format():
    fmt = plots.PlainLogFormatter(labelOnlyBase=False)
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(0.01, 1e4)
    fmt.set_axis(ax.xaxis)
    assert [fmt(v) for v in (0.01, 1, 100, 1000, 10_000)] == ["0.01", "1", "100", "1,000", "10,000"]
    seconds = plots.PlainLogFormatter("s", labelOnlyBase=False)
    seconds.set_axis(ax.xaxis)
    assert seconds(1e-5) == "10 µs"
    plt.close(fig)


def test_label_point_aligns_away_from_its_point():
    fig, ax = plt.subplots()
    left = plots.label_point(ax, 1, 1, "left", (-8, 4))
    right = plots.label_point(ax, 1, 1, "right", (8, -4))
    assert (left.get_ha(), left.get_va()) == ("right", "bottom")
    assert (right.get_ha(), right.get_va()) == ("left", "top")
    plt.close(fig)


def test_every_backend_has_a_style():
    from helpers.quant_backends import BACKENDS

    assert set(BACKENDS) <= set(plots.STYLES["backend"])
    for name in BACKENDS:  # in its precision's colour
        assert same(plots.style("backend", name)["color"], plots.style("precision", name)["color"])


def test_one_formats_labels_cover_none_of_its_points():
    # one format's points are drawn filled at the base size: only overlapping formats need the
    # hollow, larger markers, which ran a label into the next star (notebook 04, before)
    plots.use_style()
    fig, _ = _roofline_batches()
    fig.canvas.draw()
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    points = _data_points(ax)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert not [p for p in points if box.contains(*p)], text.get_text()
    plt.close(fig)
