"""Helpers for the LLM-serving course: measurement plumbing the notebooks share.

The teaching code lives in the notebooks; this package holds what every notebook needs
(device choice, timing, memory readings, ceilings, model loading, plots).
"""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
BUILD_DIR = REPO_ROOT / "build"


def setup_notebook() -> None:
    """Silence known library noise in one place and apply the course's plot style."""
    from helpers import noise, plots

    noise.quiet()
    plots.use_style()
