"""One plot style for the course, and its standard figures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FixedFormatter, FixedLocator, LogFormatter

from helpers import BUILD_DIR
from helpers.profile import CATEGORIES
from helpers.roofline import Ceilings, attainable_flops

FIGURES_DIR = Path(os.environ.get("COURSE_FIGURES", BUILD_DIR / "figures"))


# One colour and marker per entity, in every figure of every notebook (issue 19): a reader who
# learned that bf16 is orange in notebook 00 finds it orange in notebook 04. Families rarely share
# a figure, so colours repeat across families, never within one.
_CB = sns.color_palette("colorblind", 10)


def _family(*entries: tuple[str, str]) -> dict[str, dict]:
    return {name: {"color": _CB[i], "marker": m} for i, (name, m) in enumerate(entries)}


STYLES: dict[str, dict[str, dict]] = {
    "precision": _family(("fp32", "o"), ("bf16", "s"), ("fp16", "^"), ("int8", "D"), ("int4", "v"),
                         ("fp8", "P"), ("nf4", "X"), ("int3", "<"), ("fp8-w8a8", "*")),
    "policy": _family(("static", "s"), ("continuous", "o"), ("chunked", "^"), ("reservation", "D")),
    # the planner's engines, a PCIe box's assumed α, and notebook 00's ways to decode
    "engine": _family(("course", "o"), ("vllm", "s"), ("gpt-fast", "^"), ("production", "D"),
                      ("pcie box", "v"), ("eager", "<"), ("generate", "h"),
                      ("generate, growing cache", "X"), ("matmuls only", ">"), ("compiled", "P")),
    "tp": _family(("TP 1", "o"), ("TP 2", "s"), ("TP 4", "^"), ("TP 8", "D"), ("TP 16", "v")),
    # what limits an operation (notebook 00's three limits, the roofline's memory roof, a TP
    # step's parts): memory and overhead in colours no roof of the roofline takes (0–3)
    "limit": {"compute": {"color": _CB[0], "marker": "^"},
              "memory": {"color": _CB[4], "marker": "o"},
              "overhead": {"color": _CB[5], "marker": "s"}},
    "collective": {"compute": {"color": _CB[0], "marker": "o"},
                   "all-reduce": {"color": _CB[3], "marker": "s"},
                   "skew": {"color": _CB[7], "marker": "^"}},
}  # fmt: skip
STYLES["category"] = {c: {"color": _CB[i], "marker": "s"} for i, c in enumerate(CATEGORIES)}
# Every backend of `helpers.quant_backends.BACKENDS` in its precision's colour (the format its
# linears hold), one marker per implementation: the int8 backends share int8's colour and differ
# by marker (tests/test_plot_styles.py checks every backend has an entry).
_IMPLEMENTATION_MARKERS = [("deprecated", "X"), ("dynamic (torchao)", "P"), ("torchao", "s"),
                           ("bitsandbytes", "^"), ("pytorch op", "D")]  # fmt: skip
_BACKEND_NAMES = [
    "fp32", "bf16", "fp16", "int8 weight-only (PyTorch op)", "int4 weight-only (PyTorch op)",
    "int8 weight-only (torchao)", "int8 dynamic (torchao)", "int4 weight-only (torchao)",
    "int8 (bitsandbytes)", "nf4 (bitsandbytes)", "torch.ao dynamic int8 (deprecated)",
]  # fmt: skip


def _backend_look(name: str) -> dict:
    precision = style("precision", name)
    marker = next((m for key, m in _IMPLEMENTATION_MARKERS if key in name.lower()), None)
    return {"color": precision["color"], "marker": marker or precision["marker"]}


def style(family: str, name: str) -> dict:
    """The colour and marker of entity `name` of `family` ("precision", "policy", "engine",
    "tp", "collective", "category", "limit", "backend"). A name is matched exactly, then by the
    family's key it contains ("int8 weight-only (torchao)" is an int8; "chunk 32" a chunked
    policy)."""
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


STYLES["backend"] = {name: _backend_look(name) for name in _BACKEND_NAMES}


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


# --- Readable axes and labels ---------------------------------------------------------------


class PlainLogFormatter(LogFormatter):
    """A log axis's ticks in one format: plain numbers with thousands separators ("0.01", "100",
    "1,000"), or with SI prefixes when `unit` is given ("10 µs", "1 G"); matplotlib's choice of
    which minor ticks to label (some, when the axis spans less than a decade) is kept."""

    def __init__(self, unit: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.unit = unit
        self.eng = None if unit is None else EngFormatter(unit=unit, sep=" " if unit else "")

    def _num_to_string(self, x, vmin, vmax):
        if self.eng is not None:
            return self.eng.format_eng(x)
        if x >= 1:
            return f"{x:,.0f}" if x == round(x) else f"{x:,.3g}"
        return np.format_float_positional(x, precision=3, unique=True, fractional=False, trim="-")


def log_format(ax: plt.Axes, axis: str = "both", unit: str | None = None) -> None:
    """One plain tick format on the log axes of `ax` ("x", "y" or "both"; a linear axis is left
    alone): call it after the scale is set. `unit` (e.g. "s", "B", "" for a bare prefix) writes
    SI prefixes instead of zeros: "10 µs" rather than "0.00001"."""
    for name in ("x", "y") if axis == "both" else (axis,):
        axis_ = ax.xaxis if name == "x" else ax.yaxis
        if axis_.get_scale() != "log":
            continue
        axis_.set_major_formatter(PlainLogFormatter(unit, labelOnlyBase=False))
        axis_.set_minor_formatter(
            PlainLogFormatter(unit, labelOnlyBase=False, minor_thresholds=(1, 0.4))
        )


def log2_ticks(ax: plt.Axes, ticks, axis: str = "x", labels: list[str] | None = None) -> None:
    """Only `ticks` on a log axis, written in full ("1,024") or as `labels`, no minor labels."""
    axis_ = ax.xaxis if axis == "x" else ax.yaxis
    ticks = sorted({int(t) if float(t).is_integer() else float(t) for t in ticks})
    axis_.set_major_locator(FixedLocator(ticks))
    axis_.set_major_formatter(FixedFormatter(labels or [f"{t:,}" for t in ticks]))
    axis_.set_minor_locator(plt.NullLocator())


def label_point(ax: plt.Axes, x, y, text: str, offset=(6, 6), **kwargs) -> plt.Annotation:
    """`text` written `offset` points (dx, dy) away from the point (x, y), aligned away from it
    (a label to the left ends at its point, one below hangs under it) with a short grey leader
    line from the point, so a label never covers the point it names."""
    dx, dy = offset
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    kwargs = {"fontsize": 7, **kwargs}
    return ax.annotate(
        text,
        (x, y),
        xytext=offset,
        textcoords="offset points",
        ha="left" if dx >= 0 else "right",
        va=va,
        arrowprops={"arrowstyle": "-", "color": "0.45", "lw": 0.6, "shrinkA": 0, "shrinkB": 4},
        **kwargs,
    )


def key_right(ax: plt.Axes, **kwargs) -> None:
    """The axes' key outside it, on the right, where it covers no data."""
    kwargs = {"fontsize": 8, "frameon": False, **kwargs}
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), **kwargs)


# --- Notebook 00's roofline (its machine figures: helpers.plots_machine) ----------------------


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
    `dtype` (coloured like that dtype's roof), `engine` (coloured like that engine), `marker` and
    `xytext` (label offset in points, see `label_point`). A later format's points are drawn
    hollow and larger, so one at the same intensity as an earlier format's does not hide it.
    """
    ax = ax or plt.subplots()[1]
    bandwidth = bandwidth or ceilings.read_bandwidth
    _roofs(ax, ceilings, bandwidth, attainable)
    if skinny:
        batches = sorted(skinny)
        xs = [2 * b / skinny_bytes for b in batches]
        label = f"decode-shaped products, batch {batches[0]}–{batches[-1]} (measured)"
        ax.plot(xs, [skinny[b] for b in batches], "-D", color="black", ms=4, lw=1, label=label)
    _roof_points(ax, points or [], list(ceilings.matmul_flops))
    top = max(ceilings.matmul_flops.values())
    low = min([top / 1e4] + [p["flops"] / 3 for p in points or []])  # every point shown
    ax.set(xscale="log", yscale="log", ylim=(low, top * 3))
    log_format(ax, "x")
    log_format(ax, "y", unit="")
    ax.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="attainable FLOP/s")
    ax.set_title(f"Roofline of this machine ({ceilings.device}), measured")
    key_right(ax)
    return ax


def _roofs(ax: plt.Axes, ceilings: Ceilings, bandwidth: float, attainable: Callable) -> None:
    """One roof per dtype in its colour (equal peaks, fp16 = fp32 on some CPUs, both show by
    their dashes), and the memory roof in the memory limit's colour."""
    intensities = np.logspace(-2, 4, 200)
    dashes = ["-", "--", "-.", ":"]
    for k, (dtype, peak) in enumerate(ceilings.matmul_flops.items()):
        roof = [attainable(i, peak, bandwidth) for i in intensities]
        ax.plot(
            intensities,
            roof,
            color=style("precision", dtype)["color"],
            ls=dashes[k % 4],
            lw=2.2 - 0.4 * k,
            label=f"{dtype} matmul peak {peak / 1e9:,.0f} GFLOP/s",
        )
    memory = f"memory roof: {bandwidth / 1e9:.3g} GB/s"
    ax.plot(
        intensities,
        intensities * bandwidth,
        ls=":",
        label=memory,
        color=style("limit", "memory")["color"],
    )


def _roof_points(ax: plt.Axes, points: list[dict], formats: list[str]) -> None:
    formats = [f for f in formats if any(p.get("dtype") == f for p in points)]  # drawn ones
    for p in points:
        dtype, engine = p.get("dtype"), p.get("engine")
        look = style("engine", engine) if engine else style("precision", dtype) if dtype else {}
        color = look.get("color", "black")
        marker = p.get("marker") or look.get("marker", "o")
        k = formats.index(dtype) if dtype in formats else 0
        size = (150 if marker == "*" else 50) * (1 + 0.6 * k)
        face = (
            {"color": color, "edgecolor": "white"}
            if k == 0
            else {"facecolor": "none", "edgecolor": color, "linewidth": 1.5}
        )
        ax.scatter(p["intensity"], p["flops"], s=size, zorder=3 + k, marker=marker, **face)
        if p.get("label"):
            # to the left, below: the next point to the right is the same format at n × 2
            label_point(
                ax, p["intensity"], p["flops"], p["label"], p.get("xytext", (-8, -10)), fontsize=8
            )


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
    key_right(ax)
    return ax


def batch_sweep(runs, critical_batch: float) -> plt.Figure:
    """TPOT (with its spread) and throughput against the batch, one line per prompt length
    (`helpers.decode.sweep` rows), with the predicted critical batch; the key right of both."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    ok = runs[~runs.oom]
    for i, (prompt, g) in enumerate(ok.groupby("prompt")):
        look = {"color": _CB[i % len(_CB)], "marker": "o", "label": f"prompt {prompt}"}
        spread = [(g.tpot_s - g.tpot_q1_s) * 1e3, (g.tpot_q3_s - g.tpot_s) * 1e3]
        axes[0].errorbar(g.batch, g.tpot_s * 1e3, yerr=spread, capsize=3, **look)
        axes[1].plot(g.batch, g.tokens_per_s, **look)
    label = f"predicted critical batch ≈ {critical_batch:.0f}"
    for ax in axes:
        ax.axvline(critical_batch, color="grey", ls="--", label=label)
        ax.set(xscale="log", xlabel="batch")
        log2_ticks(ax, ok.batch)
    axes[0].set(ylabel="ms per output token (TPOT)", title="latency per step")
    axes[1].set(ylabel="tokens/s (generated ÷ latency)", yscale="log", title="throughput")
    log_format(axes[1], "y")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    return fig


def policy_panels(
    data, panels: dict[str, str], title: str, capacity: float | None = None, log: tuple = ()
) -> plt.Figure:
    """Notebook 05's sweeps: one panel per column of `data` named in `panels` (its title),
    against the offered load `rate`, one line per `engine` in its policy's colour and marker
    (the same in every panel), the `capacity` dashed; panels in `log` on a log y axis; the
    figure's title above the panels' titles and one key below them, off every line."""
    size = (3.6 * len(panels) + 0.5, 4.0)
    fig, axes = plt.subplots(1, len(panels), figsize=size, layout="constrained", squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], panels.items(), strict=True):
        for engine, g in data.groupby("engine", sort=False):
            ax.plot(g.rate, g[key], label=engine, **style("policy", engine))
        if capacity is not None:
            ax.axvline(capacity, color="grey", ls="--", label="capacity")
        ax.set(xlabel="offered load (requests/s)")
        ax.set_title(panel_title, fontsize=10)
        if key in log:
            ax.set_yscale("log")
            log_format(ax, "y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False
    )
    fig.suptitle(title, fontsize=12)
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
    for r in front.itertuples():  # up the frontier: each label right of and below its point
        text = ", ".join(str(getattr(r, k)) for k in knobs[1:])
        label_point(ax, r.latency_s, r.tokens_per_s, text, (8, -6))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="end-to-end latency of a request (s)",
        ylabel="tokens/s (generated ÷ latency)",
    )
    log_format(ax)
    key_right(ax)
    return ax


def sla(table, best, budget_ms: float, ax: plt.Axes | None = None) -> plt.Axes:
    """The planner's candidates (TPOT against tokens/s, by precision), the budget, the best."""
    ax = ax or plt.subplots(figsize=(7.5, 4))[1]
    for name, g in table[table.fits].groupby("dtype"):
        ax.scatter(g.tpot_ms, g.tokens_per_s, s=12, label=name, **style("precision", name))
    ax.axvline(budget_ms, color="red", ls="--", label="budget")
    if best is not None:
        label = f"best: {best['dtype']}, TP {best.tp} × {best.replicas}, batch {best.batch}"
        ax.scatter(
            [best.tpot_ms], [best.tokens_per_s], s=150, marker="*", color="black", label=label
        )
    ax.set(xscale="log", yscale="log", xlabel="TPOT (ms)", ylabel="tokens/s on all GPUs")
    log_format(ax)
    key_right(ax, fontsize=7)
    return ax


# --- Notebook 01's figures ------------------------------------------------------------------


def outliers(ratios, channel_max, layer: int) -> plt.Figure:
    """Three panels: max |w| / std per layer and matrix; int8 error of the same matrices with one
    scale per tensor (solid) and per output channel (dotted), in each matrix's colour; the
    largest activation of each channel into `layer` (`quant.outlier_ratios` rows). One key, for
    both panels, below them."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    key = []
    for i, (name, g) in enumerate(ratios.groupby("matrix")):
        color = _CB[i % len(_CB)]
        axes[0].plot(g.layer, g["max / std"], marker="o", ms=3, color=color)
        for granularity, ls in (("tensor", "-"), ("channel", ":")):
            axes[1].plot(g.layer, g[f"int8 error, per {granularity}"], ls=ls, color=color)
        key.append(Line2D([], [], color=color, marker="o", ms=3, label=name))
    key += [
        Line2D([], [], color="black", ls="-", label="int8 error, one scale per tensor"),
        Line2D([], [], color="black", ls=":", label="int8 error, one scale per channel"),
    ]
    axes[0].set(xlabel="layer", ylabel="max |w| / std(w)", title="weights: largest vs typical")
    axes[1].set(xlabel="layer", ylabel="‖ŵ − w‖ / ‖w‖", yscale="log")
    axes[1].set_title("int8 absmax: per tensor vs per channel")
    axes[2].plot(np.asarray(channel_max), lw=0.7, color="0.3")
    axes[2].set(xlabel="channel", ylabel="max |activation|", yscale="log")
    axes[2].set_title(f"activations into layer {layer} down_proj")
    for ax in axes[1:]:
        log_format(ax, "y")
    fig.legend(handles=key, loc="outside lower center", ncols=len(key), fontsize=8, frameon=False)
    return fig


def quant_speed(speed, floors, compiled=None, reference: str = "fp32") -> plt.Figure:
    """Time per decode step against the batch, one panel per backend in its colour and marker
    (`style("backend", backend)`): measured (median, IQR) solid; the floor max(bytes ÷
    bandwidth, FLOPs ÷ peak) dashed and floor + the eager loop's overhead dotted, each labelled
    where it is flat; `reference`'s measurement in grey in every other panel; `compiled` rows
    (backend, batch, tpot_s and quartiles) as hollow squares. The key sits below the panels.

    `speed`: one row per backend × batch with ms, q1_ms, q3_ms (`quant_backends.measure_backends`);
    `floors`: rows of backend, batch, floor_ms, with_overhead_ms (a dense batch grid, so the bend
    at the ridge shows)."""
    names = list(dict.fromkeys(speed.backend))
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    size = (3.4 * cols, 2.9 * rows + 0.6)
    fig, axes = plt.subplots(rows, cols, figsize=size, sharex=True, sharey=True, squeeze=False,
                             layout="constrained")  # fmt: skip
    for ax, name in zip(axes.flat, names, strict=False):
        _speed_panel(ax, name, speed, floors, compiled, reference)
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
    fig.legend(handles=key, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig


def _speed_panel(ax: plt.Axes, name: str, speed, floors, compiled, reference: str) -> None:
    look = _backend_or_precision(name)
    if name != reference:
        ref = speed[speed.backend == reference]
        ax.plot(ref.batch, ref.ms, color="grey", alpha=0.6, lw=1)
    g = speed[speed.backend == name]
    ax.errorbar(g.batch, g.ms, yerr=[g.ms - g.q1_ms, g.q3_ms - g.ms], ms=4, capsize=2, **look)
    f = floors[floors.backend == name]
    ax.plot(f.batch, f.floor_ms, ls="--", color=look["color"])
    ax.plot(f.batch, f.with_overhead_ms, ls=":", color=look["color"])
    _label_floors(ax, f, look["color"])
    if compiled is not None and name in set(compiled.backend):
        c = compiled[compiled.backend == name]
        spread = [(c.tpot_s - c.tpot_q1_s) * 1e3, (c.tpot_q3_s - c.tpot_s) * 1e3]
        ax.errorbar(c.batch, c.tpot_s * 1e3, yerr=spread, fmt="s", mfc="white",
                    color=look["color"], capsize=2)  # fmt: skip
    ax.set_title(name, fontsize=8, color=look["color"])
    ax.set(xscale="log", yscale="log")
    log2_ticks(ax, speed.batch)
    log_format(ax, "y")


def _backend_or_precision(name: str) -> dict:
    try:
        return style("backend", name)
    except KeyError:
        return style("precision", name)


def _label_floors(ax: plt.Axes, floors, color) -> None:
    """'floor' under its dashed line and '+ overhead' over its dotted one, at the smallest batch
    where both lines are still flat (the bend at the ridge comes later), so they never overprint
    each other or a rising line."""
    first = floors.iloc[0]
    for value, text, dy, va in (
        (first.floor_ms, "floor", -2, "top"),
        (first.with_overhead_ms, "+ overhead", 2, "bottom"),
    ):
        ax.annotate(
            text,
            (first.batch, value),
            xytext=(2, dy),
            textcoords="offset points",
            ha="left",
            va=va,
            fontsize=7,
            color=color,
        )
