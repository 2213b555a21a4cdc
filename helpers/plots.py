"""One plot style for the course, and its standard figures."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from helpers import BUILD_DIR
from helpers.roofline import Ceilings, attainable_flops

FIGURES_DIR = Path(os.environ.get("COURSE_FIGURES", BUILD_DIR / "figures"))


def use_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.5, 4.5), "figure.dpi": 100, "savefig.dpi": 120})


def save(fig: plt.Figure, name: str) -> Path:
    """Save a figure under build/figures (README's key figures are copied from there)."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    path = FIGURES_DIR / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    return path


def roofline(
    ceilings: Ceilings,
    points: list[dict] | None = None,
    bandwidth: float | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Roofline per dtype from measured ceilings, with measured points on it.

    `points`: dicts with `intensity` (FLOP/byte), `flops` (FLOP/s) and optionally `label`,
    `dtype` (coloured like that dtype's roof), `marker` and `xytext` (label offset in points).
    """
    ax = ax or plt.subplots()[1]
    bandwidth = bandwidth or ceilings.read_bandwidth
    intensities = np.logspace(-2, 4, 200)
    colors = dict(zip(ceilings.matmul_flops, sns.color_palette(), strict=False))
    for dtype, peak in ceilings.matmul_flops.items():
        roof = [attainable_flops(i, peak, bandwidth) for i in intensities]
        label = f"{dtype} matmul peak {peak / 1e9:,.0f} GFLOP/s"
        ax.plot(intensities, roof, color=colors[dtype], label=label)
    ax.plot(intensities, intensities * bandwidth, ls=":", color="grey",
            label=f"memory roof: {bandwidth / 1e9:.3g} GB/s")  # fmt: skip
    for p in points or []:
        color = colors.get(p.get("dtype"), "black")
        marker = p.get("marker", "o")
        ax.scatter(p["intensity"], p["flops"], s=150 if marker == "*" else 50, zorder=3,
                   color=color, marker=marker, edgecolor="white")  # fmt: skip
        if p.get("label"):
            ax.annotate(p["label"], (p["intensity"], p["flops"]), xytext=p.get("xytext", (5, -12)),
                        textcoords="offset points", fontsize=8)  # fmt: skip
    top = max(ceilings.matmul_flops.values())
    ax.set(xscale="log", yscale="log", ylim=(top / 1e4, top * 3))
    ax.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="attainable FLOP/s")
    ax.set_title(f"Roofline of this machine ({ceilings.device}), measured")
    ax.legend(fontsize=8, loc="lower right")
    return ax
