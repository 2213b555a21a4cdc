"""Execute every notebook headless (in order) into build/, and print a summary table.

    python tools/run_notebooks.py              # every notebook
    python tools/run_notebooks.py --only 01    # those whose name contains "01" (repeatable)

Each notebook runs in a child process of its own (nbclient), which starts the notebook's kernel;
the kernel may start processes too (the tensor-parallel ranks of notebook 03).
Peak memory is that of the kernel's whole process tree: a thread sums the resident set (RSS) of
every process below the child (kernel and its descendants, not the nbclient process itself) every
0.1 s and keeps the largest sum: close to what a memory cap such as Binder's counts. (The rusage of
`wait4` gives only the largest single process that was waited for, never a sum of live ones, and
misses children that are killed rather than reaped.) A spike shorter than 0.1 s can be missed,
and pages that processes share (torch's libraries, mapped by the kernel and by each rank) count
once per process: for a notebook with worker processes the figure is an upper bound. (Exact
unique-page counts need /proc/PID/smaps, ~20 ms a process a reading: too costly to poll beside
a benchmark on a 2-core machine.)
Exit status is non-zero if any notebook fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
POLL_S = 0.1
RUN_TIMES = BUILD / "run_times.csv"


def tree_rss(root) -> int:
    """Summed RSS (bytes) of every process below `root` (a psutil.Process, root excluded).

    Processes that end or cannot be read while being summed count as zero."""
    total = 0
    try:
        procs = root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            total += proc.memory_info().rss
    return total


# helpers.server starts a server with this variable in its environment (all its processes
# inherit it): their memory is reported apart from the kernel's (notebook 06's vLLM).
SERVER_MARK = "COURSE_SERVER_PROCESS"


def is_server(proc) -> bool:
    """A server's process: marked, or below a marked one (vLLM renames its engine and worker
    processes with setproctitle, which empties what /proc/PID/environ shows)."""
    try:
        return any(p.environ().get(SERVER_MARK) == "1" for p in [proc, *proc.parents()])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, AttributeError):
        return False


def split_rss(root) -> tuple[int, int]:
    """(kernel, server): summed RSS below `root` of the processes that are not a server's and of
    those that are (marked by SERVER_MARK)."""
    kernel = server = 0
    try:
        procs = root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            rss = proc.memory_info().rss
            if is_server(proc):
                server += rss
            else:
                kernel += rss
    return kernel, server


class PeakSampler(threading.Thread):
    """Calls `sample()` every `interval` s until `stop()`, keeping the largest value it returned."""

    def __init__(self, sample: Callable[[], float], interval: float = POLL_S):
        super().__init__(daemon=True)
        self.sample, self.interval = sample, interval
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.sample())
            if self._done.wait(self.interval):
                break

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def kernel_config():
    """Kernel settings: CurveZMQ keys for the kernel's sockets where pyzmq and the kernel support
    them, so the kernel is not left on plain TCP (and logs no "running over TCP" warning)."""
    import zmq
    from traitlets.config import Config

    config = Config()
    config.KernelManager.transport_encryption = "auto" if zmq.has("curve") else "disabled"
    return config


def execute(src: Path, out_nb: Path, out_html: Path | None) -> None:
    """Execute one notebook (in this process) and write the executed copy, even if it failed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(src, as_version=4)
    try:
        resources = {"metadata": {"path": str(src.parent)}}
        client = NotebookClient(nb, timeout=1200, resources=resources, config=kernel_config())
        client.execute()
    finally:
        nbformat.write(nb, out_nb)
        if out_html is not None:
            from nbconvert import HTMLExporter

            out_html.write_text(HTMLExporter().from_notebook_node(nb)[0])


def run(
    notebook: Path,
    out_dir: Path = BUILD,
    html: bool = True,
    env: dict | None = None,
    extra_samplers: dict[str, Callable[[], float]] | None = None,
    limit_s: float | None = None,
) -> dict:
    """Execute `notebook` in a child process; return its name, pass/fail, wall seconds and the
    peak RSS of the kernel's process tree, plus the peak of each of `extra_samplers`. After
    `limit_s` seconds the whole tree is killed and the notebook counts as failed (timed_out)."""
    command = [sys.executable, __file__, "--execute", str(notebook), str(out_dir / notebook.name)]
    if html:
        command.append(str(out_dir / notebook.with_suffix(".html").name))
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env)
    launcher = psutil.Process(child.pid)
    samplers = {
        "peak_rss_bytes": PeakSampler(lambda: tree_rss(launcher)),
        "kernel_peak_rss_bytes": PeakSampler(lambda: split_rss(launcher)[0]),
        "server_peak_rss_bytes": PeakSampler(lambda: split_rss(launcher)[1]),
    }
    samplers.update({k: PeakSampler(f) for k, f in (extra_samplers or {}).items()})
    for sampler in samplers.values():
        sampler.start()
    try:
        returncode, timed_out = child.wait(limit_s), False
    except subprocess.TimeoutExpired:
        for proc in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        returncode, timed_out = child.wait(), True
    wall = time.perf_counter() - start
    peaks = {name: sampler.stop() for name, sampler in samplers.items()}
    passed = returncode == 0 and not timed_out
    return {
        "notebook": notebook.stem,
        "passed": passed,
        "wall_s": wall,
        "timed_out": timed_out,
        **peaks,
    }


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """The notebooks whose file name contains one of `only` (all of them when `only` is empty)."""
    if not only:
        return notebooks
    chosen = [nb for nb in notebooks if any(part in nb.name for part in only)]
    if not chosen:
        names = ", ".join(nb.stem for nb in notebooks)
        raise SystemExit(f"--only {' '.join(only)} matches no notebook; there are: {names}")
    return chosen


def all_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def summary(rows: list[dict]) -> str:
    """One line per notebook; a server's memory (notebook 06) in a column of its own, apart from
    the kernel's tree (what a memory cap such as Binder's counts for the notebook)."""
    lines = [
        f"{'notebook':<34} {'result':<6} {'wall':>8} {'peak RSS (kernel tree)':>23}"
        f" {'server (apart)':>15}"
    ]
    for r in rows:
        result = "pass" if r["passed"] else "FAIL"
        server = r.get("server_peak_rss_bytes", 0)
        peak = (r.get("kernel_peak_rss_bytes") if server else None) or r["peak_rss_bytes"]
        apart = f"{server / 2**30:>11.2f} GiB" if server else f"{'—':>15}"
        lines.append(
            f"{r['notebook']:<34} {result:<6} {r['wall_s']:>7.0f}s "
            f"{peak / 2**30:>19.2f} GiB {apart}"
        )
    return "\n".join(lines)


def write_run_times(rows: list[dict], path: Path) -> None:
    """The run's wall time and peak memory per notebook, with the machine and date: README's
    teachers' table quotes a stored copy of it (data/measured/cpu_*_run_times.csv)."""
    import datetime

    import pandas as pd

    from helpers import device

    f = device.describe()
    cpu = (
        f"{f['cpu']} ({f['cpu vector ISA (torch)']}, matrix extensions: "
        f"{f['cpu matrix extensions']}; {f['cpu cores (logical)']} cores; {f['caches']})"
    )
    gib = 2**30
    table = pd.DataFrame(rows)
    none = pd.Series(float("nan"), index=table.index)
    server = table.get("server_peak_rss_bytes", none).fillna(0.0)
    # Without a server the whole tree is the kernel's: its sampler (the cheaper one) sees more
    # spikes than the kernel/server split, which reads each process's environment.
    kernel = table.get("kernel_peak_rss_bytes", none).fillna(table.peak_rss_bytes)
    kernel = kernel.where(server > 0, table.peak_rss_bytes.combine(kernel, max))
    table = table.assign(
        kernel_peak_gib=(kernel / gib).round(2),
        server_peak_gib=(server / gib).round(2),
        machine=f.get("gpu", cpu),
        torch=f["torch"],
        date=datetime.date.today().isoformat(),
        source="tools/run_notebooks.py (make run), each notebook in a fresh kernel",
    )
    columns = ["notebook", "passed", "wall_s", "kernel_peak_gib", "server_peak_gib"]
    rest = ["load_avg_1m_before", "machine", "torch", "date", "source"]
    table[columns + rest].to_csv(path, index=False)


def parser_with_only(description: str) -> argparse.ArgumentParser:
    """An argument parser with the --only NAME option (repeatable) that `select` reads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run the notebooks whose name contains NAME (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = parser_with_only(__doc__.split("\n")[0])
    parser.add_argument("--execute", nargs="+", help=argparse.SUPPRESS)  # the child's entry
    args = parser.parse_args(argv)
    if args.execute:
        src, out_nb, *out_html = (Path(p) for p in args.execute)
        execute(src, out_nb, out_html[0] if out_html else None)
        return 0
    BUILD.mkdir(exist_ok=True)
    rows = []
    for nb in select(all_notebooks(), args.only):
        print(f"running {nb.name} …", flush=True)
        load = os.getloadavg()[0]
        rows.append({**run(nb), "load_avg_1m_before": load})
    print("\n" + summary(rows))
    write_run_times(rows, RUN_TIMES)
    print(f"executed copies (.ipynb, .html) and figures are in {BUILD.relative_to(ROOT)}/")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
