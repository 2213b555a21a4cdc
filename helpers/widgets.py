"""Interactive widgets for the notebooks (ipywidgets). The math lives in the other modules."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from ipywidgets import Dropdown, IntSlider, interact

from helpers import DATA_DIR, checks
from helpers.shapes import (
    ARCHITECTURES,
    KV_DTYPES,
    PRECISIONS,
    VALUE_BYTES,
    WEIGHT_BYTES,
    Shape,
    kv_value_bytes,
    serving_memory,
)


def device_capacities() -> dict[str, float]:
    """GPU memory in GB from the published datasheets shipped in data/."""
    gpus = pd.read_csv(DATA_DIR / "published_hardware.csv")
    return dict(zip(gpus.gpu, gpus.memory_gb, strict=True))


def memory_parts(
    model: str, precision: str, batch: int, context: int, tp: int = 1, kv_dtype: str | None = None
) -> dict:
    """What the calculator shows: bytes per device by component. int8/int4/fp8 weights are
    weight-only: the weights take `WEIGHT_BYTES` (int4: half a byte plus a 16-bit scale and zero
    point per group of 64, as the planner counts), activations stay 16-bit, and the KV cache is
    in `kv_dtype` (None: the activations' format; fp8 or int8 halve it, `shapes.kv_value_bytes`)."""
    precision = checks.choice("precision", precision, PRECISIONS)
    shape = Shape.of(model)
    weight, value = WEIGHT_BYTES[precision], VALUE_BYTES[precision]
    kv = None if kv_dtype is None else kv_value_bytes(kv_dtype, shape.head_dim)
    return serving_memory(shape, batch, context, weight, value, tp, kv_bytes=kv)


def plot_memory_budget(
    model: str, precision: str, batch: int, context: int, tp: int, kv_dtype: str = "fp16"
) -> dict:
    """Stacked bar of what one device holds, against the capacity of common GPUs."""
    try:
        parts = memory_parts(model, precision, batch, context, tp, kv_dtype)
    except ValueError as err:
        print(err)
        return {}
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    left = 0.0
    for name, value in parts.items():
        ax.barh([0], [value / 1e9], left=left, label=f"{name}: {value / 1e9:,.2f} GB")
        left += value / 1e9
    for gpu, gb in device_capacities().items():
        ax.axvline(gb, color="grey", lw=0.8, ls="--")
        ax.text(gb, 0.45, gpu, rotation=90, fontsize=7, va="bottom", ha="right")
    ax.set(yticks=[], xlabel="GB per device", xlim=(0, max(left, 150) * 1.05))
    ax.set_title(
        f"{model}, {precision} weights, {kv_dtype} KV cache, batch {batch} × {context} tokens, "
        f"TP {tp}: {left:,.1f} GB",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    plt.show()
    return parts


def memory_calculator():
    """Model × precision × KV-cache format × batch × context × TP → per-device memory against
    GPU capacities."""
    return interact(
        plot_memory_budget,
        model=Dropdown(options=list(ARCHITECTURES), value="llama-2-7b"),
        precision=Dropdown(options=list(PRECISIONS), value="bf16"),
        batch=IntSlider(value=8, min=1, max=256, step=1),
        context=IntSlider(value=4096, min=256, max=32768, step=256),
        tp=Dropdown(options=[1, 2, 4, 8], value=1),
        kv_dtype=Dropdown(options=list(KV_DTYPES), value="fp16", description="KV cache"),
    )
