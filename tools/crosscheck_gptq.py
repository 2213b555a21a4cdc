"""Cross-check `helpers.calibrate.gptq` against a library GPTQ (llm-compressor), on planted layers.

Not part of `make test` (llm-compressor is not a course dependency); run it by hand:

    pip install --no-deps --target /tmp/llmc llmcompressor compressed-tensors loguru datasets \
        multiprocess pyarrow dill xxhash
    PYTHONPATH=/tmp/llmc .venv/bin/python tools/crosscheck_gptq.py

The formats differ in one way, said in the output: llm-compressor fixes each group's scale and
zero point from the unquantized weights before its pass (an observer), `calibrate.gptq` sets a
group's grid at its first column from the columns as updated so far (the GPTQ paper's code without
static groups). Both minimise ‖(Ŵ − W)·Xᵀ‖ for the same Hessian, so on the same layer their output
errors must be close and both below round-to-nearest's. Writes data/measured/gptq_crosscheck.csv.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import calibrate  # noqa: E402


def library_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                            group_size=group)  # fmt: skip
    groups = w.reshape(w.shape[0], -1, group)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    out, _, _ = quantize_weight(w[None].clone(), h[None].clone(), scale[None], zero[None], None,
                                args, blocksize=128, percdamp=0.01)  # fmt: skip
    return out[0]


def main() -> None:
    rows = []
    for seed in range(3):
        w, x = calibrate.planted_layer(seed)
        h = calibrate.hessian(x)
        for bits, group in ((4, 64), (3, 64), (4, 128)):
            found = {
                "round-to-nearest": calibrate.rtn(w, bits, group),
                "calibrate.gptq": calibrate.gptq(w, h, bits, group),
                "llm-compressor gptq": library_gptq(w, h, bits, group),
            }
            for method, w_hat in found.items():
                rows.append({"seed": seed, "bits": bits, "group": group, "method": method,
                             "output_error": calibrate.output_error(w_hat, w, x)})  # fmt: skip
    table = pd.DataFrame(rows).assign(
        llmcompressor=importlib.metadata.version("llmcompressor"),
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        source="tools/crosscheck_gptq.py (planted correlated layers, 128 × 512, 4096 tokens)",
    )
    table.to_csv(ROOT / "data" / "measured" / "gptq_crosscheck.csv", index=False)
    wide = table.pivot_table(index=["bits", "group", "seed"], columns="method",
                             values="output_error")  # fmt: skip
    print(wide.round(5).to_string())
    ratio = wide["calibrate.gptq"] / wide["llm-compressor gptq"]
    print(f"\ncalibrate.gptq ÷ llm-compressor: median {ratio.median():.3f}, "
          f"range {ratio.min():.3f}–{ratio.max():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
