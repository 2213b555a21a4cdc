"""Eager vs compiled decode of SmolLM2-135M (and a Llama-2-7B shape on a large GPU), and the
overhead measurements of notebook 00, saved with provenance to
data/measured/<device>_compiled_decode.csv and data/measured/<device>_overhead.csv.

    python tools/measure_compiled.py            # this machine's device
    python tools/measure_compiled.py --no-7b    # skip the 7B shape (needs ~14 GB of GPU memory)

On a CPU, compiling SmolLM2 takes about a minute on 2 cores, too long for notebook 00's budget:
the notebook compiles a small case live and shows this file for the full model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import DATA_DIR, device, memory, models, noise, overhead, roofline  # noqa: E402
from helpers.decode import sweep  # noqa: E402


def rows_for(model, name: str, source: str, batches, dev, bandwidth: float) -> list[dict]:
    weights = memory.weight_bytes(model)
    labels = {
        "model": name,
        "source": source,
        "weight_bytes": weights,
        "floor_s": weights / bandwidth,
    }
    frames = [
        sweep(model, [16], batches, 64, compiled=compiled, warmup_tokens=64, labels=labels
              ).assign(compiled=compiled)
        for compiled in (False, True)
    ]  # fmt: skip
    rows = pd.concat(frames).sort_values(["batch", "compiled"]).to_dict("records")
    for r in rows:
        if not r["oom"]:
            print(f"{name} batch {r['batch']} {r['mode']}: {r['tpot_s'] * 1e3:.3f} ms/token "
                  f"(compile/capture {r['setup_s']:.1f} s)", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-7b", action="store_true")
    args = parser.parse_args()
    noise.quiet()
    dev = device.pick_device()
    dtype = device.serving_dtype(dev)
    bandwidth = roofline.measure_read(dev, 2**28, repeats=10)["value"]  # for the floor
    batches = (1, 8) if dev.type == "cpu" else (1, 4, 16, 64)
    lm = models.load_smollm2(dtype=dtype, device=dev)
    rows = rows_for(lm.model, "smollm2-135m", lm.source, batches, dev, bandwidth)
    del lm
    if dev.type == "cuda" and not args.no_7b:
        big = models.llama_from_config("llama-2-7b", dtype=dtype, device=dev)
        rows += rows_for(big, "llama-2-7b", "random weights, Llama-2-7B shape", (1, 16), dev,
                         bandwidth)  # fmt: skip
    info = device.describe(dev)
    df = pd.DataFrame(rows).assign(
        dtype=str(dtype).removeprefix("torch."), read_bandwidth=bandwidth,
        device=info.get("gpu", info["cpu"]), torch=torch.__version__,
        transformers=transformers.__version__, date=datetime.date.today().isoformat(),
        script="tools/measure_compiled.py",
        load_average=os.getloadavg()[0],  # other work on the machine during the run: ≈ 0 is quiet
    )  # fmt: skip
    kind = "cpu" if dev.type == "cpu" else info["gpu"].split()[-1].lower()
    out = DATA_DIR / "measured" / f"{kind}_compiled_decode.csv"
    df.to_csv(out, index=False)
    provenance = df[["device", "torch", "transformers", "date", "script"]].iloc[0].to_dict()
    ops = overhead.op_overhead(dev).assign(kind="op")
    steps = overhead.step_overhead(dev, dtype=dtype).assign(kind="eager step, tiny widths")
    overhead_out = DATA_DIR / "measured" / f"{kind}_overhead.csv"
    both = pd.concat([ops, steps], ignore_index=True).assign(**provenance)
    both.to_csv(overhead_out, index=False)
    print(f"wrote {out} and {overhead_out}")


if __name__ == "__main__":
    main()
