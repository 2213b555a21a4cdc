"""Benchmark: the planner against this machine at batch sizes and prompts no notebook uses.

    python tools/check_planner_cpu.py

Predicts SmolLM2-135M's fp32 TPOT with `planner.spec_from_ceilings` (this machine's measured
bandwidth, decode-shaped matmul rates and eager overhead; measured now or reused from notebook
00's saved ceilings) and measures it with the course's loop. Prints one row per point and the
share within ±25 %. A benchmark to report, not a test: timings on a shared machine move.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import decode, device, models, noise, planner, roofline  # noqa: E402


def main() -> None:
    noise.quiet()
    dev = torch.device("cpu")
    ceilings = roofline.load_or_measure(dev, device.preset(dev))
    spec = planner.spec_from_ceilings(ceilings)
    model = models.load_smollm2(dtype=torch.float32, device=dev).model
    rows = []
    for batch in (1, 3, 6, 12, 24):
        for prompt in (24, 96):
            ids = torch.randint(100, 10_000, (batch, prompt))
            decode.greedy_decode(model, ids, 4, all_logits=False)
            gen = decode.greedy_decode(model, ids, 16, all_logits=False)
            pred = planner.predict(model="smollm2-135m", gpu=spec, dtype="fp32", tp=1,
                                   batch=batch, prompt_tokens=prompt, new_tokens=16)  # fmt: skip
            rows.append({"batch": batch, "prompt": prompt, "measured_ms": gen.tpot_s * 1e3,
                         "q1_ms": gen.row()["tpot_q1_s"] * 1e3,
                         "q3_ms": gen.row()["tpot_q3_s"] * 1e3,
                         "predicted_ms": pred.tpot_s * 1e3, "bound": pred.bound})  # fmt: skip
    df = pd.DataFrame(rows)
    df["error"] = df.predicted_ms / df.measured_ms - 1
    print(df.round(3).to_string(index=False))
    print(f"within ±25 %: {(df.error.abs() <= 0.25).sum()} of {len(df)}; "
          f"median |error| {df.error.abs().median():.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
