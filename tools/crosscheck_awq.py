"""Cross-check `helpers.calibrate.awq_scales` against a library AWQ (llm-compressor), on planted
layers whose inputs have a few salient channels (`calibrate.salient_layer`).

Not part of `make test` (llm-compressor is not a course dependency); run it by hand:

    pip install --no-deps --target /tmp/llmc llmcompressor compressed-tensors loguru datasets \
        multiprocess pyarrow dill xxhash
    PYTHONPATH=/tmp/llmc .venv/bin/python tools/crosscheck_awq.py

The library's AWQ is run through its own call path, not re-typed: a two-module model, an
elementwise scale `norm` (weight 1, the place AWQ folds 1/s into, like an RMSNorm's weight)
feeding the planted linear `fc`, is put through llm-compressor's session with the recipe
[AWQModifier, QuantizationModifier] and its sequential calibration pipeline (the one it picks
for AWQ) on the planted inputs.
The parent module whose output MSE AWQ minimises is then `fc` itself (the lowest common
ancestor of its one balance layer), so its loss is our ‖x·(Q(w·s)/s)ᵀ − x·wᵀ‖² up to a
constant factor. Ŵ is read back as the library leaves it: Q(W·s) from compressed-tensors'
fake quantization of `fc` with its observed scale and zero point, times the folded `norm`
weight (1/s); the model's own forward is checked to give the same output. On a machine
without an accelerator the cache's pin_memory (only a speed-up for copies to a GPU, which
fails with no GPU present) is made a no-op; nothing else of the library is replaced.

Format, ours vs the library's, as run here:

* scales: both s = mean|x|^α over the calibration tokens (the library's duo_scaling=False; its
  default duo_scaling=True divides by mean-normalised |w|^(1−α), which ours does not), both
  normalised by √(max s · min s);
* grid of α: ours k/20 for k = 0…19, [0, 0.95]; the library's n_grid=21 gives k/20 for
  k = 0…20, the same points plus α = 1 (its default n_grid=20 would be k/19 instead);
* loss: both the output error of the linear on the calibration inputs (ours relative L2, the
  library MSE: the same argmin);
* weights: `bits`-bit integers, one scale and zero point per group of `group` columns, min-max
  of each group, no clipping search in either (llm-compressor's AWQ has none; AutoAWQ's
  auto_clip is not run); the library's min-max range is stretched to include 0, ours is the
  group's own range: the same on every group that holds both signs (all of them here);
* the library's α is not reported by it: it is read by watching its own grid search (a
  subclass of AWQModifier that records the grid it asks for and each point's loss; nothing of
  the search is changed).

A second library row, "llm-compressor awq defaults", runs AWQModifier as it comes
(duo_scaling=True, n_grid=20: s = mean|x|^α / (w_mean^(1−α) + 1e-4), w_mean the mean of
|w| normalised by each group's max, α = k/18 plus the plain α = 0 point): a format ours does
not have, shown beside it, not compared against it.

Pipeline note: the library picks its sequential pipeline for AWQ. Its basic pipeline calls the
smoothing step after leaving its DisableQuantization context, so the grid search there ran with
the fake quantization switched on (quantization_enabled=True was observed during the search)
and chose other α (α up to 1, output errors up to twice round-to-nearest's on these layers;
in a process's first run no search was recorded at all, α = 0); it is not used here.

Writes data/measured/awq_crosscheck.csv.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import calibrate  # noqa: E402

GRID = 20  # ours: α = k/20, k < 20; the library: n_grid = GRID + 1, α = k/20, k ≤ 20
SOURCE = (
    "tools/crosscheck_awq.py (planted salient-channel layers, 128 × 512, 4096 tokens; "
    "s = mean|x|^α, duo_scaling=False; α grid ours k/20 k<20, library n_grid=21 k/20 k≤20; "
    "asymmetric min-max groups, no clipping; library range includes 0)"
)
SOURCE_DEFAULTS = (
    "tools/crosscheck_awq.py (same layers; llm-compressor AWQModifier defaults: duo_scaling=True, "
    "s = mean|x|^α / (w_mean^(1-α) + 1e-4), grid (0, no duo) + k/18 k≤18; otherwise as above)"
)


class Scale(torch.nn.Module):
    """x · weight, elementwise: where AWQ folds 1/s (an RMSNorm's weight without the norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight


class Block(torch.nn.Module):
    """norm → fc: one "decoder layer" for the sequential pipeline to trace and run."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.norm = Scale(w.shape[1])
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.fc.weight.data.copy_(w)

    def forward(self, x):
        return self.fc(self.norm(x))


class Toy(torch.nn.Module):
    """The model the pipeline traces: what it reads of a transformers model is a config and a
    device, given here."""

    def __init__(self, w: torch.Tensor):
        from transformers import PretrainedConfig

        super().__init__()
        self.block = Block(w)
        self.config = PretrainedConfig()

    @property
    def device(self):
        return self.block.fc.weight.device

    def forward(self, x):
        return self.block(x)


def library_awq(w, x, bits: int, group: int, duo_scaling=False, n_grid=GRID + 1):
    """(ŵ the linear computes with on x, (α, duo) the library chose) from llm-compressor's AWQ.
    Its choice is read by watching its own search: the grid it asks for and the loss it gets
    for each point, in order (it keeps the first lowest)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmcompressor.args import DatasetArguments
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from llmcompressor.pipelines.sequential import SequentialPipeline

    if not torch.accelerator.is_available():  # pinning (for faster copies to a GPU) needs one
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    grid, losses = [], []

    class Watched(AWQModifier):
        def _get_grid_search_params(self):
            grid.extend(super()._get_grid_search_params())
            return grid

        def _compute_loss(self, fp16_outputs, int_w_outputs):
            losses.append(super()._compute_loss(fp16_outputs, int_w_outputs))
            return losses[-1]

    model = Toy(w).eval()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                            group_size=group)  # fmt: skip
    recipe = [
        Watched(
            mappings=[AWQMapping("re:.*norm$", ["re:.*fc$"])],
            duo_scaling=duo_scaling,
            n_grid=n_grid,
        ),  # fmt: skip
        QuantizationModifier(
            config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}
        ),
    ]
    batches = [{"x": chunk[None]} for chunk in x.split(1024)]
    session = active_session()
    session.reset()
    session.initialize(model=model, start=-1, recipe=recipe, calib_data=batches)
    SequentialPipeline()(model, batches, DatasetArguments(sequential_targets=["Block"]))
    session.finalize()
    with torch.no_grad():
        fc = model.block.fc
        q = forward_quantize(fc, fc.weight, "weight", fc.quantization_scheme.weights)
        w_hat = q * model.block.norm.weight[None, :]  # Q(W·s) · diag(1/s)
        through_model = model(x[None])[0]  # the library's own quantized forward
        assert torch.allclose(through_model, x @ w_hat.T, rtol=1e-4, atol=1e-4 * x.abs().max())
    session.reset()
    assert len(losses) == len(grid), (len(losses), len(grid))  # one search, fully watched
    return w_hat.detach(), grid[losses.index(min(losses))]


LIBRARY = {  # method: (duo_scaling, n_grid, source)
    "llm-compressor awq": (False, GRID + 1, SOURCE),
    "llm-compressor awq defaults": (True, 20, SOURCE_DEFAULTS),
}


def main() -> None:
    rows = []
    for seed in range(3):
        w, x = calibrate.salient_layer(seed)
        for bits, group in ((4, 64), (3, 64), (4, 128)):
            s, alpha, _ = calibrate.awq_scales(w, x, bits, group, GRID)
            found = {
                "round-to-nearest": (calibrate.rtn(w, bits, group), math.nan, None, SOURCE),
                "calibrate.awq": (calibrate.rtn(w * s, bits, group) / s, alpha, False, SOURCE),
            }
            for method, (duo, n_grid, source) in LIBRARY.items():
                w_lib, (a, used_duo) = library_awq(w, x, bits, group, duo, n_grid)
                found[method] = (w_lib, round(a, 6), used_duo, source)
            for method, (w_hat, a, duo, source) in found.items():
                rows.append({"seed": seed, "bits": bits, "group": group, "method": method,
                             "output_error": calibrate.output_error(w_hat, w, x),
                             "alpha": a, "duo_scaling": duo, "source": source})  # fmt: skip
    table = pd.DataFrame(rows)
    table.insert(
        len(table.columns) - 1, "llmcompressor", importlib.metadata.version("llmcompressor")
    )
    table.insert(len(table.columns) - 1, "torch", torch.__version__)
    table.insert(len(table.columns) - 1, "date", datetime.date.today().isoformat())
    table.to_csv(ROOT / "data" / "measured" / "awq_crosscheck.csv", index=False)
    wide = table.pivot_table(index=["bits", "group", "seed"], columns="method",
                             values=["output_error", "alpha"])  # fmt: skip
    print(wide.round(5).to_string())
    err = wide["output_error"]
    ratio = err["calibrate.awq"] / err["llm-compressor awq"]
    gain = err[["calibrate.awq", "llm-compressor awq", "llm-compressor awq defaults"]].div(
        err["round-to-nearest"], axis=0
    )
    print(f"\ncalibrate.awq ÷ llm-compressor awq: median {ratio.median():.6f}, "
          f"range {ratio.min():.6f}–{ratio.max():.6f}")  # fmt: skip
    print("÷ round-to-nearest, range:")
    print(gain.agg(["min", "max"]).round(3).to_string())


if __name__ == "__main__":
    main()
