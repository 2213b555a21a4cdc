"""Measure notebook 00's quantities through the helpers, without Jupyter, and save them as CSV.

For machines without the notebook stack or the model files (a lent cloud GPU with no network):
it measures the device's ceilings, then batch-1 (and batched) decode of SmolLM2-135M (random
weights of the same shape where the real weights cannot be loaded: timing depends only on shapes)
and of a Llama-2-7B-shaped model, with the static-cache loop, `generate` and the matmuls alone.

    python tools/gpu_report.py OUTDIR
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pandas as pd
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import decode, device, memory, models, roofline, setup_notebook  # noqa: E402


def provenance(dev: torch.device) -> dict:
    return {
        "device": device.describe(dev).get("gpu", str(dev)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "script": "tools/gpu_report.py",
    }


def smollm2_or_its_shape(dev, dtype):
    try:
        lm = models.load_smollm2(dtype=dtype, device=dev)
        return lm.model, lm.source
    except models.ModelUnavailableError:
        model = models.llama_from_config("smollm2-135m", dtype=dtype, device=dev)
        return model, "random weights with SmolLM2-135M's shape (no model files here)"


def decode_rows(name, model, source, batches, bw, dev, new_tokens=64, prompt_len=16):
    weights = memory.weight_bytes(model)
    common = {"model": name, "source": source, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "weight_bytes": weights, "floor_s": weights / bw}  # fmt: skip
    loop = decode.sweep(model, [prompt_len], batches, new_tokens, warmup_tokens=8, labels=common)
    rows = loop.assign(method="static-cache loop").to_dict("records")
    for batch in [b for b in (1, 16) if b in batches]:
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=dev)
        hf = decode.generate_timing(model, ids, new_tokens)
        rows.append({**common, "batch": batch, "method": "generate", "tpot_s": hf["tpot_s"],
                     "ttft_s": hf["ttft_s"]})  # fmt: skip
        matmul_s = decode.matmuls_only(model, batch=batch, repeats=20)
        rows.append({**common, "batch": batch, "method": "matmuls only", "tpot_s": matmul_s})
    for r in rows[: len(loop)]:
        if not r["oom"]:
            print(f"{name} batch {r['batch']}: {r['tpot_s'] * 1e3:.2f} ms/token", flush=True)
    return rows


def main(out: Path, batches=(1, 4, 16, 64, 256), big_model="llama-2-7b") -> None:
    setup_notebook()
    out.mkdir(parents=True, exist_ok=True)
    dev = device.pick_device()
    prov = provenance(dev)
    print(device.describe(dev))

    ceilings_df = roofline.measure_ceilings(dev, device.preset(dev))
    ceilings_df.assign(**prov).to_csv(out / "ceilings.csv", index=False)
    ceilings = roofline.Ceilings.from_frame(ceilings_df, str(dev))
    print(ceilings)

    dtype = device.serving_dtype(dev)
    model, source = smollm2_or_its_shape(dev, dtype)
    rows = decode_rows("smollm2-135m", model, source, batches, ceilings.read_bandwidth, dev)
    del model
    torch.cuda.empty_cache()
    big = models.llama_from_config(big_model, dtype=dtype, device=dev)
    rows += decode_rows(big_model, big, f"random weights with {big_model}'s shape", (1, 16),
                        ceilings.read_bandwidth, dev)  # fmt: skip
    if dev.type == "cuda":
        view = {"model": big_model, **memory.gpu_memory(dev), **(memory.device_memory() or {})}
        pd.DataFrame([view | prov]).to_csv(out / "memory.csv", index=False)
    pd.DataFrame(rows).assign(dtype=str(dtype), **prov).to_csv(out / "decode.csv", index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/gpu"))
