"""Definitions written in a notebook, importable by tests: the notebook owns the idea.

A code cell tagged `idea` (cell metadata `"tags": ["idea"]`) writes one idea of the course — a
quantizer, a column/row split, the KV-cache formula — as short, self-contained code: its own
imports, definitions, no heavy work. `definitions("01_quantization")` runs a notebook's idea
cells, in order, in a fresh namespace and returns it, so a test can check the notebook's
definition against a known answer or against the helper's fast path.
"""

from __future__ import annotations

import types
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TAG = "idea"


def idea_cells(stem: str) -> list[str]:
    (path,) = NOTEBOOKS.glob(f"{stem}*.ipynb")
    cells = nbformat.read(path, as_version=4).cells
    return [c.source for c in cells if c.cell_type == "code" and TAG in c.metadata.get("tags", [])]


def definitions(stem: str) -> types.SimpleNamespace:
    """The names the notebook's `idea` cells define (run in order, in a fresh namespace)."""
    sources = idea_cells(stem)
    if not sources:
        raise LookupError(f"notebook {stem} has no cell tagged {TAG!r}")
    namespace: dict = {"__name__": f"notebook_{stem}"}
    for i, source in enumerate(sources):
        exec(compile(source, f"<{stem} idea cell {i}>", "exec"), namespace)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if not k.startswith("__")})
