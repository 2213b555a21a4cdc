"""The tensor-parallel figures of notebooks 03 and 04: the all-reduce against its α–β fit, TP's
compute against its communication, the planner's TPOT and throughput against the TP degree, and
a TP step's parts, in the course's one style (`helpers.plots`: the all-reduce in one colour in
every one of them)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from helpers.plots import key_right, log2_ticks, log_format, style


def tp_compute_vs_comm(layers, predicted_ms, world: int, backend: str) -> plt.Figure:
    """Per layer size, bars of TP 1's total, TP `world`'s total, its all-reduce (timed alone) and
    its skew (median, IQR) by batch, and TP `world`'s prediction as a black tick. TP degrees in
    `style("tp")`'s colours, the all-reduce and the skew in `style("collective")`'s.
    `layers`: rows of tp, hidden, batch and `{total,comm,skew}_s` with `_q1_s`, `_q3_s`;
    `predicted_ms`: indexed by (hidden, batch)."""
    sizes = sorted(layers.hidden.unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(10, 3.8), layout="constrained")
    bars = [
        (1, "total", "TP 1 total", style("tp", "TP 1")),
        (world, "total", f"TP {world} total", style("tp", f"TP {world}")),
        (world, "comm", f"TP {world}: its all-reduce", style("collective", "all-reduce")),
        (world, "skew", f"TP {world}: skew", style("collective", "skew")),
    ]
    for ax, hidden in zip(np.atleast_1d(axes), sizes, strict=True):
        part = layers[layers.hidden == hidden]
        batches = sorted(part.batch.unique())
        x = np.arange(len(batches))
        for i, (degree, what, label, look) in enumerate(bars):
            runs = part[part.tp == degree].sort_values("batch")
            ms = runs[f"{what}_s"].to_numpy() * 1e3
            spread = [ms - runs[f"{what}_q1_s"] * 1e3, runs[f"{what}_q3_s"] * 1e3 - ms]
            ax.bar(
                x + (i - 1.5) * 0.2,
                ms,
                width=0.2,
                yerr=spread,
                capsize=2,
                color=look["color"],
                label=label,
            )
        ax.plot(
            x - 0.1,
            [predicted_ms[hidden, b] for b in batches],
            "k_",
            ms=14,
            mew=2,
            label=f"TP {world} predicted",
        )
        ax.set_xticks(x, [f"batch {b}" for b in batches])
        ax.set(yscale="log", ylabel="ms per MLP forward (median, IQR)", title=f"hidden {hidden}")
        log_format(ax, "y")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    fig.suptitle(f"Megatron MLP, TP 1 vs {world} ({backend}): predicted and measured")
    return fig


def tp_planner(scaling, tps) -> plt.Figure:
    """The planner's batch-1 TPOT and per-GPU throughput against the TP degree, one line per
    all-reduce latency α (`scaling` rows: α, tp, tpot_ms, tokens_per_s_per_gpu), each α in its
    engine's colour (`style("engine")`: gpt-fast, production, a PCIe box); the key below both
    panels, off every line."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, g in scaling.groupby("α", observed=True, sort=False):
        look = {**style("engine", name), "label": name}
        axes[0].plot(g.tp, g.tpot_ms, **look)
        axes[1].plot(g.tp, g.tokens_per_s_per_gpu, **look)
    axes[0].set(
        ylabel="ms per token (batch 1)", title="Llama-2-7B fp16 on H100s: latency (planner)"
    )
    axes[1].set(ylabel="tokens/s per GPU (batch 64)", title="throughput per GPU (planner)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        log2_ticks(ax, tps)
        ax.set_xlabel("TP degree")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False
    )
    return fig


def allreduce_alpha_beta(ar, alpha: float, beta: float, title: str) -> plt.Axes:
    """All-reduce time against message size (`ar` rows: bytes, seconds, q1_s, q3_s), measured in
    the all-reduce's colour and marker, beside the α–β fit α + β · bytes, drawn over a dense
    log-spaced grid so it is the straight-then-bending curve it is on log axes."""
    ax = plt.subplots()[1]
    look, ms = style("collective", "all-reduce"), ar["seconds"] * 1e3
    spread = [ms - ar["q1_s"] * 1e3, ar["q3_s"] * 1e3 - ms]
    ax.errorbar(ar["bytes"], ms, yerr=spread, fmt=look["marker"], capsize=3,
                color=look["color"], label="measured (median, IQR)")  # fmt: skip
    grid = np.logspace(np.log10(ar["bytes"].min()), np.log10(ar["bytes"].max()), 100)
    fit_label = f"α–β fit: α = {alpha * 1e6:.0f} µs, 1/β = {1 / beta / 1e9:.2f} GB/s"
    ax.plot(grid, (alpha + beta * grid) * 1e3, "-", color="black", lw=1, label=fit_label)
    ax.set(xscale="log", yscale="log", xlabel="message", ylabel="ms", title=title)
    log_format(ax, "x", unit="B")
    log_format(ax, "y")
    key_right(ax)
    return ax


TP_PARTS = {  # a decode step's parts in the planner, in the colour of what limits each
    "weights and KV": style("limit", "memory"),
    "overhead": style("limit", "overhead"),
    "all-reduces": style("collective", "all-reduce"),  # as `tp_compute_vs_comm` draws it
}


def tp_overhead(tp_parts, title: str) -> plt.Figure:
    """One panel per engine: ms per token at batch 1 against the TP degree, stacked by part
    (`tp_parts`: indexed by engine and tp, one column per key of `TP_PARTS`), the key below."""
    engines = list(dict.fromkeys(tp_parts.index.get_level_values("engine")))
    fig, axes = plt.subplots(1, len(engines), figsize=(10, 3.8), layout="constrained")
    for ax, engine in zip(np.atleast_1d(axes), engines, strict=True):
        g = tp_parts.xs(engine, level="engine")
        colours = [TP_PARTS[c]["color"] for c in g.columns]
        g.plot.bar(stacked=True, ax=ax, rot=0, legend=False, color=colours)
        ax.set(title=f"{engine} engine", xlabel="TP degree", ylabel="ms per token (batch 1)")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False
    )
    fig.suptitle(title)
    return fig
