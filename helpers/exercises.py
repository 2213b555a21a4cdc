"""Code-checked exercise answers."""

from __future__ import annotations

import math


def check(question: str, answer: float | None, expected: float, rtol: float = 0.05) -> bool:
    """Compare a learner's numeric answer with the expected value, within a relative tolerance."""
    if answer is None:
        print(f"⏳ {question}: not answered yet (replace None with your answer)")
        return False
    ok = math.isclose(answer, expected, rel_tol=rtol)
    mark = "✅ correct" if ok else f"❌ not yet: expected about {expected:.4g}"
    print(f"{mark} — {question}: you gave {answer:.4g}")
    return ok
