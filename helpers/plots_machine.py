"""The figures of one machine's measurements (notebooks 00, 02 and 06): the three limits, the
read staircase, the overhead of a step, decode against its floor, copy bandwidth, the KV cache,
what fits, and vLLM against concurrency, in the
course's one style (`helpers.plots`: limits in `style("limit")`, engines in `style("engine")`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from helpers.plots import _CB, key_right, label_point, log2_ticks, log_format, style
from helpers.shapes import format_bytes


def three_limits(sweep, overhead_s: float, ax: plt.Axes | None = None) -> plt.Axes:
    """Measured time per operation against its first-principles time, coloured by which limit
    the model says rules it: overhead, memory or compute (`helpers.overhead.work_sweep` rows).
    Labels sit off the lines, which rise to the right: memory- and overhead-bound ones below and
    right of their point, compute-bound ones (which share x with memory ones) above and left."""
    ax = ax or plt.subplots()[1]
    ideal = np.maximum(sweep.memory_s, sweep.compute_s)
    memory_bound = np.where(sweep.memory_s >= sweep.compute_s, "memory", "compute")
    regime = np.where(overhead_s > ideal, "overhead", memory_bound)
    for name in ("overhead", "memory", "compute"):
        sel = regime == name
        look = style("limit", name)
        spread = [sweep.measured_s[sel] - sweep.q1_s[sel], sweep.q3_s[sel] - sweep.measured_s[sel]]
        ax.errorbar(
            ideal[sel],
            sweep.measured_s[sel],
            yerr=spread,
            fmt=look["marker"],
            ms=8,
            capsize=3,
            color=look["color"],
            label=f"{name}-bound (predicted)",
        )
    for r, x, kind in zip(sweep.itertuples(), ideal, regime, strict=True):
        offset = (-8, 8) if kind == "compute" else (8, -8)
        label_point(ax, x, r.measured_s, f"{r.rows}×{r.n}", offset)
    xs = np.logspace(np.log10(ideal.min() / 3), np.log10(ideal.max() * 3), 100)
    ax.plot(xs, xs, ls=":", color="grey", label="bytes ÷ bandwidth or FLOPs ÷ peak")
    label = f"+ overhead {overhead_s * 1e6:.1f} µs per op"
    ax.plot(xs, xs + overhead_s, color="black", lw=1, label=label)
    ax.set(xscale="log", yscale="log")
    ax.set(xlabel="first-principles time per product", ylabel="measured time per product")
    log_format(ax, unit="s")
    key_right(ax)
    return ax


def read_staircase(
    sweep, caches: dict[str, int], working_set: int | None = None, ax: plt.Axes | None = None
) -> plt.Axes:
    """Read bandwidth against buffer size (`roofline.read_sweep` rows), each cache level's size
    drawn as a vertical line and the bytes of one decode step marked."""
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    gbs, look = 1e9, style("limit", "memory")
    spread = [(sweep.bandwidth - sweep.low) / gbs, (sweep.high - sweep.bandwidth) / gbs]
    ax.errorbar(
        sweep.bytes,
        sweep.bandwidth / gbs,
        yerr=spread,
        fmt="o-",
        capsize=3,
        color=look["color"],
        label="read bandwidth (sum of one buffer)",
    )
    top = max(sweep.high.max(), sweep.bandwidth.max()) / gbs * 1.3  # room for the caches' names
    ax.set(xscale="log", xlabel="buffer size", ylabel="GB/s", ylim=(0, top))
    if working_set:
        ax.axvline(working_set, color="black", lw=1.5, label="bytes one decode step reads")
    _cache_lines(ax, caches, sweep.bytes.min())
    log_format(ax, "x", unit="B")
    key_right(ax)
    return ax


def _cache_lines(ax: plt.Axes, caches: dict[str, int], smallest: float) -> None:
    """Each cache level's size as a dashed line, named at the top: to its right, or to its left
    near the right edge; levels off the left of the data (L1, often) are left out."""
    shown = {k: v for k, v in caches.items() if v >= smallest / 4}
    for size in shown.values():
        ax.axvline(size, color="grey", ls="--", lw=1)
    ax.autoscale_view()
    low, high = np.log(ax.get_xlim())
    for i, (level, size) in enumerate(sorted(shown.items(), key=lambda kv: kv[1])):
        right = (np.log(size) - low) / (high - low) > 0.8  # near the edge: write it to the left
        ax.annotate(
            f"{level} {format_bytes(size)}",
            (size, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if right else 3, -4 - 11 * (i % 2)),
            textcoords="offset points",
            fontsize=8,
            ha="right" if right else "left",
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )


def step_overhead(steps, fit, ax: plt.Axes | None = None) -> plt.Axes:
    """Decode-step time of tiny-width models against their layer count, with the fitted line
    (`helpers.overhead.step_overhead` rows and `fit_line` of them)."""
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    ms, look = 1e3, style("limit", "overhead")
    spread = [(steps.step_s - steps.q1_s) * ms, (steps.q3_s - steps.step_s) * ms]
    ax.errorbar(
        steps.layers,
        steps.step_s * ms,
        yerr=spread,
        fmt=look["marker"],
        capsize=3,
        color=look["color"],
        label="measured (median, IQR)",
    )
    label = f"fit: {fit.intercept * ms:.2f} ms + {fit.slope * ms:.3f} ms × layers"
    ax.plot(steps.layers, fit(steps.layers) * ms, color="black", lw=1, label=label)
    ax.set(xlabel="layers (hidden size 64: bytes and FLOPs ≈ 0)", ylabel="ms per decode step")
    key_right(ax)
    return ax


DECODE_BARS = {  # what each bar of `decode_vs_floor` is, for its colour
    "predicted floor": ("limit", "memory"),
    "matmuls only": ("engine", "matmuls only"),
    "static-cache loop": ("engine", "course"),
    "generate, static cache": ("engine", "generate"),
    "generate, growing cache": ("engine", "generate, growing cache"),
}


def decode_vs_floor(results, title: str) -> plt.Axes:
    """Milliseconds per token of each way to decode (`results`: what, ms_per_token, q1, q3; the
    quartiles empty where one run was timed), the predicted floor first, each bar in its limit's
    or engine's colour."""
    ax = plt.subplots(figsize=(7.5, 3.2))[1]
    ms = results.ms_per_token
    err = [(ms - results.q1.fillna(ms)).to_numpy(), (results.q3.fillna(ms) - ms).to_numpy()]
    colours = [_bar_colour(what) for what in results.what]
    ax.barh(results.what, ms, xerr=err, color=colours, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per token (batch 1)")
    ax.set_title(title)
    return ax


def _bar_colour(what: str):
    for start, (family, name) in DECODE_BARS.items():
        if what.startswith(start):
            return style(family, name)["color"]
    raise KeyError(f"no colour for the bar {what!r}: add it to plots_machine.DECODE_BARS")


def copy_bandwidth(transfers, caches: dict[str, int], title: str) -> plt.Axes:
    """GB/s against bytes per buffer, one line per `ceiling` of `transfers` (size, ceiling,
    value in bytes/s), each cache level's size dashed and named (none on a GPU: `caches` {})."""
    ax = plt.subplots(figsize=(7.5, 4))[1]
    table = transfers.pivot_table(index="size", columns="ceiling", values="value") / 1e9
    for i, column in enumerate(table.columns):
        ax.plot(table.index, table[column], marker="o", color=_CB[i % len(_CB)], label=column)
    ax.set(xscale="log", ylabel="GB/s", xlabel="bytes per buffer (a copy holds two)", title=title)
    ticks = sorted(transfers["size"].unique())
    log2_ticks(ax, ticks, labels=[format_bytes(s).replace(".0 ", " ") for s in ticks])
    ax.tick_params(axis="x", labelsize=8)
    _cache_lines(ax, caches, min(ticks) * 2)
    key_right(ax)
    return ax


def kv_cache_growth(curves, weights_gib: float, title: str) -> plt.Figure:
    """KV-cache GiB against context, one colour per batch, GQA solid and MHA dashed, with the
    weights as a black line; `curves` has one column per "GQA, batch b" / "MHA, batch b" and the
    contexts as its index. The key sits to the right of the axes, off the lines."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    batches = list(dict.fromkeys(c.rsplit(" ", 1)[-1] for c in curves.columns))
    for column in curves.columns:
        kind, batch = column.split(", batch ")
        color = _CB[batches.index(batch) % len(_CB)]
        ls = "-" if kind == "GQA" else "--"
        ax.plot(curves.index, curves[column], marker="o", ms=3, color=color, ls=ls, label=column)
    ax.axhline(weights_gib, color="black", lw=1, label="weights")
    ax.set(xscale="log", yscale="log", xlabel=curves.index.name or "context (tokens)", ylabel="GiB")
    log2_ticks(ax, curves.index)
    log_format(ax, "y")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=10)
    key_right(ax)
    return fig


def what_fits(frontier, contexts, title: str, dtype: str) -> plt.Axes:
    """The largest batch that fits against the context: predicted (dashed, hollow) beside found
    (solid), both in the colour of the precision they hold (`frontier`: context, predicted,
    found, as `memory.search_frontier` returns)."""
    ax = plt.subplots(figsize=(7, 4))[1]
    look = style("precision", dtype)
    ax.plot(frontier.context, frontier.found, ls="-", label="found (measured)", **look)
    ax.plot(
        frontier.context,
        frontier.predicted,
        ls="--",
        mfc="none",
        ms=10,
        label="predicted (formula)",
        **look,
    )
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="largest batch")
    log2_ticks(ax, contexts)
    log_format(ax, "y")
    ax.set_title(title)
    key_right(ax)
    return ax


def vllm_concurrency(conc, title: str) -> plt.Figure:
    """Closed-loop vLLM against concurrency: output tokens/s and ITL p50 measured (solid, in
    vLLM's colour) beside the memory-bound prediction (dashed: tokens/s grow as c ÷ ITL(1) and
    every stream keeps ITL(1)), ITL p99 dotted (`conc` rows: concurrency, output_tokens_per_s,
    predicted_tokens_per_s, itl_p50_s, itl_p99_s, the first at concurrency 1)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    look = style("engine", "vllm")
    c, ms = conc.concurrency, 1e3
    predicted_itl = np.full(len(c), conc.itl_p50_s.iloc[0] * ms)
    axes[0].plot(c, conc.output_tokens_per_s, label="measured", **look)
    axes[0].plot(
        c, conc.predicted_tokens_per_s, ls="--", mfc="none", label="memory-bound prediction", **look
    )
    axes[0].set(ylabel="output tokens/s", title="throughput")
    axes[1].plot(c, conc.itl_p50_s * ms, label="ITL p50, measured", **look)
    axes[1].plot(
        c, predicted_itl, ls="--", mfc="none", label="ITL, memory-bound prediction", **look
    )
    axes[1].plot(
        c, conc.itl_p99_s * ms, ls=":", color=look["color"], marker="v", label="ITL p99, measured"
    )
    axes[1].set(ylabel="inter-token latency (ms)", title="inter-token latency")
    for ax in axes:
        ax.set(xscale="log", xlabel="concurrency (requests in flight)")
        ax.set_xscale("log", base=2)
        log2_ticks(ax, c)
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8, frameon=False
        )
    fig.suptitle(title)
    return fig
