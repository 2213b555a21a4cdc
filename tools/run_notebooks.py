"""Execute every notebook headless (in order) into build/, and print a summary table.

Each notebook runs in its own child process, so the peak memory reported is that notebook's
kernel alone (the largest resident set of the child and everything it waited for).
Exit status is non-zero if any notebook fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"

EXECUTE_ONE = """
import sys, nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter
src, out_nb, out_html = sys.argv[1:4]
nb = nbformat.read(src, as_version=4)
try:
    resources = {"metadata": {"path": "notebooks"}}
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources=resources).execute()
finally:
    nbformat.write(nb, out_nb)
    open(out_html, "w").write(HTMLExporter().from_notebook_node(nb)[0])
"""


def run(notebook: Path) -> tuple[bool, float, int]:
    """Execute one notebook; return (passed, wall seconds, peak RSS bytes of its process tree)."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", EXECUTE_ONE, str(notebook),
         str(BUILD / notebook.name), str(BUILD / notebook.with_suffix(".html").name)],
        cwd=ROOT,
    )  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode == 0, time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> int:
    BUILD.mkdir(exist_ok=True)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    rows = []
    for nb in notebooks:
        print(f"running {nb.name} …", flush=True)
        rows.append((nb.name, *run(nb)))
    print(f"\n{'notebook':<34} {'result':<6} {'wall':>8} {'peak RSS':>10}")
    for name, ok, wall, peak in rows:
        result = "pass" if ok else "FAIL"
        print(f"{name:<34} {result:<6} {wall:>7.0f}s {peak / 2**30:>8.2f} GiB")
    print(f"executed copies (.ipynb, .html) and figures are in {BUILD.relative_to(ROOT)}/")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
