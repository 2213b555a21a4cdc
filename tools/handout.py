"""`make handout`: copies of the notebooks without their solutions, for a workshop (issue 19).

A solution is a code cell tagged `solution`; the markdown cell that heads the solutions
("## Solutions") goes with them. The copies land in build/handout/, outputs cleared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_TAG = "solution"


def is_solution(cell) -> bool:
    if SOLUTION_TAG in cell.metadata.get("tags", []):
        return True
    return cell.cell_type == "markdown" and cell.source.lstrip().startswith("## Solutions")


def handout(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook without its solution cells (a copy; the original is left alone)."""
    copy = nbformat.from_dict(notebook)
    copy.cells = [c for c in copy.cells if not is_solution(c)]
    for cell in copy.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return copy


def main(out: Path = ROOT / "build" / "handout") -> int:
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        copy = handout(notebook)
        removed = len(notebook.cells) - len(copy.cells)
        nbformat.write(copy, out / path.name)
        print(f"{path.name}: {removed} solution cells left out")
    print(f"handouts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
