"""One plot style for the course, and its standard figures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.lines import Line2D

from helpers import BUILD_DIR
from helpers.profile import CATEGORIES
from helpers.roofline import Ceilings, attainable_flops
from helpers.shapes import format_bytes

FIGURES_DIR = Path(os.environ.get("COURSE_FIGURES", BUILD_DIR / "figures"))


# One colour and marker per entity, in every figure of every notebook (issue 19): a reader who
# learned that bf16 is orange in notebook 00 finds it orange in notebook 04. Families rarely share
# a figure, so colours repeat across families, never within one.
_CB = sns.color_palette("colorblind", 10)
STYLES: dict[str, dict[str, dict]] = {
    "precision": {name: {"color": _CB[i], "marker": m} for i, (name, m) in enumerate(
        [("fp32", "o"), ("bf16", "s"), ("fp16", "^"), ("int8", "D"), ("int4", "v"),
         ("fp8", "P"), ("nf4", "X"), ("int3", "<"), ("fp8-w8a8", "*")])},
    "policy": {name: {"color": _CB[i], "marker": m} for i, (name, m) in enumerate(
        [("static", "s"), ("continuous", "o"), ("chunked", "^"), ("reservation", "D")])},
    "engine": {name: {"color": _CB[i], "marker": m} for i, (name, m) in enumerate(
        [("course", "o"), ("vllm", "s"), ("gpt-fast", "^"), ("production", "D")])},
    "tp": {f"TP {t}": {"color": _CB[i], "marker": m} for i, (t, m) in enumerate(
        [(1, "o"), (2, "s"), (4, "^"), (8, "D"), (16, "v")])},
    "collective": {"compute": {"color": _CB[0], "marker": "o"},
                   "all-reduce": {"color": _CB[3], "marker": "s"},
                   "skew": {"color": _CB[7], "marker": "^"}},
}  # fmt: skip
STYLES["category"] = {c: {"color": _CB[i], "marker": "s"} for i, c in enumerate(CATEGORIES)}
STYLES["engine"]["pcie box"] = {"color": _CB[4], "marker": "v"}  # an α assumed for PCIe
STYLES["engine"]["eager"] = {"color": _CB[5], "marker": "v"}  # the planner's engines
STYLES["engine"]["compiled"] = {"color": _CB[9], "marker": "P"}


def style(family: str, name: str) -> dict:
    """The colour and marker of entity `name` of `family` ("precision", "policy", "engine",
    "tp", "collective", "category"). A name is matched exactly, then by the family's key it
    contains ("int8 weight-only (torchao)" is an int8; "chunk 32" a chunked policy)."""
    if family not in STYLES:
        raise KeyError(f"no style family {family!r}: use one of {sorted(STYLES)}")
    entries = STYLES[family]
    key = str(name).lower()
    if key in entries:
        return dict(entries[key])
    if family == "policy" and key.startswith("chunk"):
        return dict(entries["chunked"])
    for known in sorted(entries, key=len, reverse=True):  # "int8" before "int"
        if known.lower() in key:
            return dict(entries[known])
    raise KeyError(f"no {family} style for {name!r}: add it to helpers.plots.STYLES")


def use_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.5, 4.5), "figure.dpi": 100, "savefig.dpi": 120})
    # log axes label 0.01 … 100 as plain numbers (matplotlib's default writes "2×10⁰")
    plt.rcParams["axes.formatter.min_exponent"] = 3


def save(fig: plt.Figure, name: str) -> Path:
    """Save a figure under build/figures (README's key figures are copied from there)."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    path = FIGURES_DIR / f"{name}.png"
    partial = path.with_name(path.name + ".partial")  # whole or not at all: then renamed
    fig.savefig(partial, bbox_inches="tight", format="png")
    os.replace(partial, path)
    return path


def roofline(
    ceilings: Ceilings,
    points: list[dict] | None = None,
    bandwidth: float | None = None,
    ax: plt.Axes | None = None,
    attainable: Callable[[float, float, float], float] = attainable_flops,
    skinny: dict[int, float] | None = None,
    skinny_bytes: int = 4,
) -> plt.Axes:
    """Roofline per dtype from measured ceilings, with measured points on it.

    `skinny`: FLOP/s of decode-shaped products by batch (`Ceilings.linear_flops`), drawn as a
    measured roof of its own at their intensity, 2 · batch FLOPs per weight of `skinny_bytes`.
    `attainable(intensity, peak, bandwidth)` draws the roofs (notebook 00 passes its own).
    `points`: dicts with `intensity` (FLOP/byte), `flops` (FLOP/s) and optionally `label`,
    `dtype` (coloured like that dtype's roof), `marker` and `xytext` (label offset in points).
    """
    ax = ax or plt.subplots()[1]
    bandwidth = bandwidth or ceilings.read_bandwidth
    intensities = np.logspace(-2, 4, 200)
    colors = {dtype: style("precision", dtype)["color"] for dtype in ceilings.matmul_flops}
    dashes = ["-", "--", "-.", ":"]  # roofs of equal peaks (fp16 = fp32 on some CPUs) both show
    for k, (dtype, peak) in enumerate(ceilings.matmul_flops.items()):
        roof = [attainable(i, peak, bandwidth) for i in intensities]
        label = f"{dtype} matmul peak {peak / 1e9:,.0f} GFLOP/s"
        ax.plot(
            intensities, roof, color=colors[dtype], ls=dashes[k % 4], lw=2.2 - 0.4 * k, label=label
        )
    ax.plot(
        intensities,
        intensities * bandwidth,
        ls=":",
        color="grey",
        label=f"memory roof: {bandwidth / 1e9:.3g} GB/s",
    )
    if skinny:
        batches = sorted(skinny)
        xs = [2 * b / skinny_bytes for b in batches]
        ax.plot(
            xs,
            [skinny[b] for b in batches],
            "-D",
            color="black",
            ms=4,
            lw=1,
            label=f"decode-shaped products, batch {batches[0]}–{batches[-1]} (measured)",
        )
    for p in points or []:
        color = colors.get(p.get("dtype"), "black")
        marker = p.get("marker") or (
            style("precision", p["dtype"])["marker"] if "dtype" in p else "o"
        )
        ax.scatter(
            p["intensity"],
            p["flops"],
            s=150 if marker == "*" else 50,
            zorder=3,
            color=color,
            marker=marker,
            edgecolor="white",
        )
        if p.get("label"):
            # to the left, below: the next point to the right is the same format at n × 2
            ax.annotate(
                p["label"],
                (p["intensity"], p["flops"]),
                xytext=p.get("xytext", (-4, -14)),
                textcoords="offset points",
                fontsize=8,
                ha="right",
            )
    top = max(ceilings.matmul_flops.values())
    ax.set(xscale="log", yscale="log", ylim=(top / 1e4, top * 3))
    ax.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="attainable FLOP/s")
    ax.set_title(f"Roofline of this machine ({ceilings.device}), measured")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def three_limits(sweep, overhead_s: float, ax: plt.Axes | None = None) -> plt.Axes:
    """Measured time per operation against its first-principles time, coloured by which limit
    the model says rules it: overhead, memory or compute (`helpers.overhead.work_sweep` rows)."""
    ax = ax or plt.subplots()[1]
    ideal = np.maximum(sweep.memory_s, sweep.compute_s)
    regime = np.where(
        overhead_s > ideal,
        "overhead",
        np.where(sweep.memory_s >= sweep.compute_s, "memory", "compute"),
    )
    for name, marker in (("overhead", "s"), ("memory", "o"), ("compute", "^")):
        sel = regime == name
        ax.errorbar(
            ideal[sel],
            sweep.measured_s[sel],
            fmt=marker,
            ms=8,
            capsize=3,
            yerr=[sweep.measured_s[sel] - sweep.q1_s[sel], sweep.q3_s[sel] - sweep.measured_s[sel]],
            label=f"{name}-bound (predicted)",
        )
    for r, x, kind in zip(sweep.itertuples(), ideal, regime, strict=True):
        below = kind != "compute"  # compute-bound labels go above: they share x with memory ones
        ax.annotate(
            f"{r.rows}×{r.n}",
            (x, r.measured_s),
            xytext=(5, -10 if below else 6),
            textcoords="offset points",
            fontsize=7,
        )
    xs = np.logspace(np.log10(ideal.min() / 3), np.log10(ideal.max() * 3), 100)
    ax.plot(xs, xs, ls=":", color="grey", label="bytes ÷ bandwidth or FLOPs ÷ peak")
    ax.plot(
        xs,
        xs + overhead_s,
        color="black",
        lw=1,
        label=f"+ overhead {overhead_s * 1e6:.1f} µs per op",
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="first-principles time per product (s)",
        ylabel="measured time per product (s)",
    )
    ax.legend(fontsize=8)
    return ax


def read_staircase(
    sweep, caches: dict[str, int], working_set: int | None = None, ax: plt.Axes | None = None
) -> plt.Axes:
    """Read bandwidth against buffer size (`roofline.read_sweep` rows), each cache level's size
    drawn as a vertical line and the bytes of one decode step marked."""
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    gbs = 1e9
    ax.errorbar(
        sweep.bytes,
        sweep.bandwidth / gbs,
        fmt="o-",
        capsize=3,
        color="C0",
        yerr=[(sweep.bandwidth - sweep.low) / gbs, (sweep.high - sweep.bandwidth) / gbs],
        label="read bandwidth (sum of one buffer)",
    )
    shown = {k: v for k, v in caches.items() if v >= sweep.bytes.min() / 4}  # L1: off the left
    for size in shown.values():
        ax.axvline(size, color="grey", ls="--", lw=1)
    if working_set:
        ax.axvline(working_set, color="crimson", lw=1.5, label="bytes one decode step reads")
    ax.set(xscale="log", xlabel="buffer size (bytes)", ylabel="GB/s", ylim=(0, None))
    low, high = np.log(ax.get_xlim())
    for i, (level, size) in enumerate(sorted(shown.items())):
        right = (np.log(size) - low) / (high - low) > 0.8  # near the edge: write it to the left
        ax.annotate(
            f"{level} {format_bytes(size)}",
            (size, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if right else 3, -12 - 10 * (i % 2)),
            textcoords="offset points",
            fontsize=8,
            ha="right" if right else "left",
        )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def profile_bars(parts, ax: plt.Axes | None = None) -> plt.Axes:
    """Two stacked bars, predicted and measured, one segment per category of a step
    (`helpers.profile.compare` rows), each category in the same colour in both bars."""
    ax = ax or plt.subplots(figsize=(7.5, 3.0))[1]
    for col, y in (("predicted_ms", "predicted"), ("measured_ms", "measured (profiled)")):
        left = 0.0
        for row in parts.itertuples():
            value, color = getattr(row, col), style("category", row.category)["color"]
            ax.barh(
                y,
                value,
                left=left,
                color=color,
                label=row.category if col == "measured_ms" else None,
            )
            left += value
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per decode step")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def step_overhead(steps, fit, ax: plt.Axes | None = None) -> plt.Axes:
    """Decode-step time of tiny-width models against their layer count, with the fitted line
    (`helpers.overhead.step_overhead` rows and `fit_line` of them)."""
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    ms = 1e3
    spread = [(steps.step_s - steps.q1_s) * ms, (steps.q3_s - steps.step_s) * ms]
    ax.errorbar(steps.layers, steps.step_s * ms, yerr=spread, fmt="o", capsize=3)
    label = f"{fit.intercept * ms:.2f} ms + {fit.slope * ms:.3f} ms × layers"
    ax.plot(steps.layers, fit(steps.layers) * ms, color="black", lw=1, label=label)
    ax.set(xlabel="layers (hidden size 64: bytes and FLOPs ≈ 0)", ylabel="ms per decode step")
    ax.legend()
    return ax


def batch_sweep(runs, critical_batch: float) -> plt.Figure:
    """TPOT (with its spread) and throughput against the batch, one line per prompt length
    (`helpers.decode.sweep` rows), with the predicted critical batch."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for prompt, g in runs[~runs.oom].groupby("prompt"):
        spread = [(g.tpot_s - g.tpot_q1_s) * 1e3, (g.tpot_q3_s - g.tpot_s) * 1e3]
        axes[0].errorbar(
            g.batch, g.tpot_s * 1e3, yerr=spread, marker="o", capsize=3, label=f"prompt {prompt}"
        )
        axes[1].plot(g.batch, g.tokens_per_s, marker="o", label=f"prompt {prompt}")
    for ax in axes:
        ax.axvline(critical_batch, color="grey", ls="--", label="predicted critical batch")
        ax.set(xscale="log", xlabel="batch")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside the data
    axes[0].set(ylabel="ms per output token (TPOT)", title="latency per step")
    axes[1].set(ylabel="tokens/s (generated ÷ latency)", yscale="log", title="throughput")
    return fig


def policy_panels(
    data, panels: dict[str, str], title: str, capacity: float | None = None, log: tuple = ()
) -> plt.Figure:
    """Notebook 05's sweeps: one panel per column of `data` named in `panels` (its title),
    against the offered load `rate`, one line per `engine` in its policy's colour and marker
    (the same in every panel), the `capacity` dashed; panels in `log` on a log y axis; the
    figure's title above the panels' titles and one key outside them, on the right."""
    size = (3.6 * len(panels) + 1.5, 3.6)
    fig, axes = plt.subplots(1, len(panels), figsize=size, layout="constrained", squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], panels.items(), strict=True):
        for engine, g in data.groupby("engine", sort=False):
            ax.plot(g.rate, g[key], label=engine, **style("policy", engine))
        if capacity is not None:
            ax.axvline(capacity, color="grey", ls="--", label="capacity")
        ax.set(xlabel="offered load (requests/s)", title=panel_title)
        if key in log:
            ax.set_yscale("log")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    return fig


def frontier(points, front, knobs: list[str], ax: plt.Axes | None = None) -> plt.Axes:
    """Every configuration as a point (latency, throughput), marked by the first knob, with the
    Pareto frontier `front` (a subset of `points`) drawn through its points and labelled."""
    ax = ax or plt.subplots()[1]
    for value, g in points.groupby(knobs[0]):
        look = style(knobs[0], value) if knobs[0] in STYLES else {}
        ax.scatter(g.latency_s, g.tokens_per_s, alpha=0.6, label=f"{knobs[0]} {value}", **look)
    front = front.sort_values("latency_s")
    ax.plot(front.latency_s, front.tokens_per_s, "-", color="black", lw=1, label="frontier")
    for r in front.itertuples():
        text = ", ".join(str(getattr(r, k)) for k in knobs[1:])
        ax.annotate(
            text,
            (r.latency_s, r.tokens_per_s),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="end-to-end latency of a request (s)",
        ylabel="tokens/s (generated ÷ latency)",
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside the data
    return ax


def sla(table, best, budget_ms: float, ax: plt.Axes | None = None) -> plt.Axes:
    """The planner's candidates (TPOT against tokens/s, by precision), the budget, the best."""
    ax = ax or plt.subplots(figsize=(7.5, 4))[1]
    for name, g in table[table.fits].groupby("dtype"):
        ax.scatter(g.tpot_ms, g.tokens_per_s, s=12, label=name, **style("precision", name))
    ax.axvline(budget_ms, color="red", ls="--", label="budget")
    if best is not None:
        label = f"best: {best.dtype}, TP {best.tp} × {best.replicas}, batch {best.batch}"
        ax.scatter(
            [best.tpot_ms], [best.tokens_per_s], s=150, marker="*", color="black", label=label
        )
    ax.set(xscale="log", yscale="log", xlabel="TPOT (ms)", ylabel="tokens/s on all GPUs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside the data
    return ax


# --- Notebook 01's figures ------------------------------------------------------------------


def outliers(ratios, channel_max, layer: int) -> plt.Figure:
    """Three panels: max |w| / std per layer and matrix; int8 error of the same matrices with one
    scale per tensor (solid) and per output channel (dotted), in each matrix's colour; the
    largest activation of each channel into `layer` (`quant.outlier_ratios` rows)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for (name, g), color in zip(ratios.groupby("matrix"), sns.color_palette(), strict=False):
        axes[0].plot(g.layer, g["max / std"], marker="o", ms=3, color=color, label=name)
        for granularity, ls in (("tensor", "-"), ("channel", ":")):
            axes[1].plot(
                g.layer,
                g[f"int8 error, per {granularity}"],
                ls=ls,
                color=color,
                label=f"{name}, per {granularity}",
            )
    axes[0].set(xlabel="layer", ylabel="max |w| / std(w)", title="weights: largest vs typical")
    axes[1].set(
        xlabel="layer",
        ylabel="‖ŵ − w‖ / ‖w‖",
        yscale="log",
        title="int8 absmax: one scale per tensor vs per channel",
    )
    axes[2].plot(np.asarray(channel_max), lw=0.7)
    axes[2].set(
        xlabel="channel",
        ylabel="max |activation|",
        yscale="log",
        title=f"activations into layer {layer} down_proj",
    )
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    return fig


def quant_speed(speed, floors, compiled=None, reference: str = "fp32") -> plt.Figure:
    """Time per decode step against the batch, one panel per backend in its precision's colour
    (`style("precision", backend)`): measured (median, IQR) solid; the floor max(bytes ÷
    bandwidth, FLOPs ÷ peak) dashed and floor + the eager loop's overhead dotted, each labelled
    at its right end; `reference`'s measurement in grey in every other panel; `compiled` rows
    (backend, batch, tpot_s and quartiles) as hollow squares. The key sits below the panels.

    `speed`: one row per backend × batch with ms, q1_ms, q3_ms (`quant_backends.measure_backends`);
    `floors`: rows of backend, batch, floor_ms, with_overhead_ms (a dense batch grid, so the bend
    at the ridge shows)."""
    names = list(dict.fromkeys(speed.backend))
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.9 * rows), sharex=True, sharey=True, squeeze=False
    )
    reference_ms = speed[speed.backend == reference]
    for ax, name in zip(axes.flat, names, strict=False):
        color = style("precision", name)["color"]
        if name != reference:
            ax.plot(reference_ms.batch, reference_ms.ms, color="grey", alpha=0.6, lw=1)
        g = speed[speed.backend == name]
        spread = [g.ms - g.q1_ms, g.q3_ms - g.ms]
        ax.errorbar(g.batch, g.ms, yerr=spread, marker="o", ms=4, capsize=2, color=color)
        f = floors[floors.backend == name]
        ax.plot(f.batch, f.floor_ms, ls="--", color=color)
        ax.plot(f.batch, f.with_overhead_ms, ls=":", color=color)
        _label_line_ends(ax, f, color)
        if compiled is not None and name in set(compiled.backend):
            c = compiled[compiled.backend == name]
            spread = [(c.tpot_s - c.tpot_q1_s) * 1e3, (c.tpot_q3_s - c.tpot_s) * 1e3]
            ax.errorbar(
                c.batch, c.tpot_s * 1e3, yerr=spread, fmt="s", mfc="white", color=color, capsize=2
            )
        ax.set_title(name, fontsize=8, color=color)
        ax.set(xscale="log", yscale="log")
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("batch")
    for ax in axes[:, 0]:
        ax.set_ylabel("ms per step")
    key = [
        Line2D([], [], color="black", marker="o", label="measured (median, IQR)"),
        Line2D([], [], color="black", ls="--", label="floor: max(bytes ÷ bandwidth, FLOPs ÷ peak)"),
        Line2D([], [], color="black", ls=":", label="floor + eager loop overhead"),
        Line2D([], [], color="grey", alpha=0.6, label=f"{reference}, measured"),
        Line2D([], [], color="black", marker="s", mfc="white", ls="", label="compiled"),
    ]
    fig.tight_layout()
    # the key below the figure's panels and their labels (savefig's tight bounding box keeps it)
    fig.legend(
        handles=key, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8, frameon=False
    )
    return fig


def _label_line_ends(ax: plt.Axes, floors, color) -> None:
    """'floor' and '+ overhead' written beside the right end of a panel's two floor lines, the
    lower one below its line and the upper one above, so the two never overprint."""
    last = floors.iloc[-1]
    for value, text, dy in (
        (last.floor_ms, "floor", -9),
        (last.with_overhead_ms, "+ overhead", 3),
    ):
        ax.annotate(
            text,
            (last.batch, value),
            xytext=(-2, dy),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color=color,
        )


# --- Notebook 02's figures ------------------------------------------------------------------


def log2_ticks(ax: plt.Axes, ticks, axis: str = "x") -> None:
    """Only `ticks` on a log axis, written in full ("1,024"), with no minor labels to collide."""
    axis_ = ax.xaxis if axis == "x" else ax.yaxis
    axis_.set_ticks(list(ticks), [f"{t:,}" for t in ticks])
    axis_.set_minor_locator(plt.NullLocator())


def kv_cache_growth(curves, weights_gib: float, title: str) -> plt.Figure:
    """KV-cache GiB against context, one colour per batch, GQA solid and MHA dashed, with the
    weights as a black line; `curves` has one column per "GQA, batch b" / "MHA, batch b" and the
    contexts as its index. The key sits to the right of the axes, off the lines."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    batches = list(dict.fromkeys(c.rsplit(" ", 1)[-1] for c in curves.columns))
    for column in curves.columns:
        kind, batch = column.split(", batch ")
        color = _CB[batches.index(batch) % len(_CB)]
        ax.plot(
            curves.index,
            curves[column],
            marker="o",
            ms=3,
            color=color,
            ls="-" if kind == "GQA" else "--",
            label=column,
        )
    ax.axhline(weights_gib, color="black", lw=1, label="weights")
    ax.set(xscale="log", yscale="log", xlabel=curves.index.name, ylabel="GiB")
    log2_ticks(ax, curves.index)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
