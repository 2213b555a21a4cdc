"""Helpers for the LLM-serving course: the plumbing the notebooks share.

Each notebook writes the idea it teaches in its own cells (tagged `idea`, imported by the tests);
this package holds what every notebook needs and a learner need not read — shapes and byte
formulas, timing, memory readings, ceilings, model loading, fast kernels, plots — in five layers
that import one way (docs/ARCHITECTURE.md).
"""

import os
from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
BUILD_DIR = REPO_ROOT / "build"

# torch.compile on a CPU would start a pool of compiler processes (~0.4 GB more under Binder's
# 2 GB cap, counted in a notebook's process tree); compile in the process that asked instead.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

if os.environ.get("COURSE_QUIET") == "1":  # a child of a quieted process: quiet it too (noise.py)
    from helpers import noise

    noise.quiet()


def setup_notebook() -> None:
    """Silence known library noise in one place, apply the course's plot style, and show table
    cells in full (pandas cuts text at 50 characters by default: verdicts and notes were cut)."""
    from helpers import noise

    noise.quiet()  # before anything imports torchao or torch (helpers.plots does, via roofline)
    import pandas as pd

    from helpers import plots

    pd.set_option("display.max_colwidth", None)
    plots.use_style()
