"""Execute every notebook *as a notebook* on a lent GPU machine, and record what happened.

The machine (see the device tool's README) has torch but not the notebook stack, no network and
no model files. Here, first: `bash tools/fetch_gpu_wheels.sh` (wheels into build/gpu_wheels/,
never committed). Then the one command, through the device tool, from the repository root:

    run(command="python3 tools/gpu_notebooks.py --budget-s 300",
        carry=["build/gpu_wheels"], timeout_s=420)

(about 9 of the session's 15 device minutes with the machine's start, leaving time to rerun what
failed with --only), then copy the returned CSVs from the reply's files_at into data/measured/.
To try it on this machine: `.venv/bin/python tools/gpu_notebooks.py --only 00 --out build/x`.

What it does:
1. installs the wheels of build/gpu_wheels/ (when there are any) into build/gpu_site/ with
   pip --no-index --no-deps, and puts that folder and the repository first on PYTHONPATH for
   itself and for every kernel;
2. runs offline (HF_HUB_OFFLINE=1); where no offline copy of SmolLM2 is on disk it sets
   COURSE_MODEL_SOURCE=random: random weights of SmolLM2's shape, so speed and memory are real
   and quality numbers are noise (each notebook prints which source it used);
3. executes each notebook with tools/run_notebooks.run (nbclient; peak RSS over the kernel's
   process tree), polling the GPU's used memory through NVML meanwhile: the peak above the level
   before the notebook started, all processes together (tensor-parallel ranks and CUDA contexts
   included), as nvidia-smi shows it;
4. writes, after every notebook (so a run cut short still leaves its results),
   <out>/<gpu>_notebooks.csv (notebook, passed, wall time, peak GPU memory, peak RSS, device,
   versions, date) and <out>/<gpu>_verdicts.csv (every claim → evidence → rule → verdict row the
   executed notebooks displayed), <gpu> being e.g. h200 or cpu; keeps the executed notebooks in
   build/<gpu>_notebooks/; and copies all of these to $OUT when the device tool sets it.
Notebooks not started within --budget-s seconds of the start are listed as skipped, and one still
running 90 s after that is stopped (so the command ends inside the device tool's limit).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "build" / "gpu_wheels"
SITE = ROOT / "build" / "gpu_site"


def fits_here(wheel: Path) -> bool:
    """Whether this interpreter can install `wheel` (its Python, ABI and platform tags)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    return not parse_wheel_filename(wheel.name)[3].isdisjoint(set(sys_tags()))


def install_wheels(wheels: Path = WHEELS, site: Path = SITE) -> list[str]:
    """Install the carried wheels into `site`, and put `site` (and the repository) first on the
    path of this process and its children. The wheels are one set for one Python: where any of
    them does not fit this one (the GPU image's 3.12 set, tried on a 3.11 machine that has the
    stack already), none is installed. Returns the installed wheels' file names."""
    found = sorted(wheels.glob("*.whl"))
    fitting = found if all(fits_here(w) for w in found) else []
    if found and not fitting:
        print(f"not installing the wheels in {wheels}: they are for another Python or platform",
              flush=True)  # fmt: skip
    if fitting:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
             *map(str, fitting)],
            check=True,
        )  # fmt: skip
    front = ([str(site)] if fitting else []) + [str(ROOT)]  # ROOT: helpers, not pip-installed
    sys.path[:0] = front
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*front, os.getenv("PYTHONPATH")]))
    return [w.name for w in fitting]


def offline_environment() -> str:
    """Settings for a machine without network; returns the model source the notebooks will use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from helpers import noise

    noise.quiet()  # before helpers.models imports torchao; the kernels inherit $COURSE_QUIET
    from helpers import models

    if "COURSE_MODEL_SOURCE" not in os.environ:
        copy = models.gguf_dir() is not None or not models.verify_offline(models.offline_dir())
        os.environ["COURSE_MODEL_SOURCE"] = "offline" if copy else "random"
    return os.environ["COURSE_MODEL_SOURCE"]


def slug(device_name: str) -> str:
    """'NVIDIA H200' → 'h200'; 'NVIDIA H100 80GB HBM3' → 'h100_80gb_hbm3'; '' → 'cpu'."""
    name = re.sub(r"^nvidia\s+", "", device_name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "cpu"


def verdict_rows(executed: Path) -> list[dict]:
    """Every verdict row an executed notebook displayed (helpers.verdicts puts them in the
    output's metadata), each with the notebook's name."""
    import nbformat

    from helpers.verdicts import METADATA_KEY

    nb = nbformat.read(executed, as_version=4)
    rows = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            for row in output.get("metadata", {}).get("text/html", {}).get(METADATA_KEY, []):
                rows.append({"notebook": executed.stem, **row})
    return rows


def gpu_used_bytes() -> float:
    from helpers import memory

    view = memory.device_memory(0)
    return float("nan") if view is None else view["used"]


def parse_args(argv, run_notebooks) -> argparse.Namespace:
    parser = run_notebooks.parser_with_only(__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "data" / "measured",
        help="folder for the CSVs (default data/measured)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=300,
        help="start no notebook after this many seconds (default 300)",
    )
    return parser.parse_args(argv)


def provenance_of(facts: dict, source: str, wheels: list) -> dict:
    import torch

    return {
        "device": facts.get("gpu", facts.get("cpu", "cpu")), "torch": torch.__version__,
        "transformers": facts.get("transformers", ""), "python": platform.python_version(),
        "model_source": source, "carried_wheels": len(wheels),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "script": "tools/gpu_notebooks.py",
    }  # fmt: skip


def run_one(run_notebooks, nb: Path, executed_dir: Path, gpu: bool, limit_s: float) -> dict:
    """Execute one notebook; its peak GPU memory is counted above what was in use before it."""
    print(f"running {nb.name} …", flush=True)
    (executed_dir / nb.name).unlink(missing_ok=True)  # no verdicts from an earlier run
    baseline = gpu_used_bytes() if gpu else float("nan")
    samplers = {"peak_gpu_used_bytes": gpu_used_bytes} if gpu else {}
    row = run_notebooks.run(nb, executed_dir, html=False, extra_samplers=samplers, limit_s=limit_s)
    row["peak_gpu_bytes"] = row.pop("peak_gpu_used_bytes", float("nan")) - baseline
    row["result"] = "pass" if row["passed"] else "FAIL"
    row["result"] += " (timed out)" if row["timed_out"] else ""
    return row


def write_tables(rows, verdicts, provenance, summary_csv: Path, verdicts_csv: Path) -> None:
    import pandas as pd

    table = pd.DataFrame([{**r, **provenance} for r in rows])
    first = ["notebook", "result", "wall_s", "peak_gpu_bytes", "peak_rss_bytes"]
    table = table[[c for c in first if c in table] + [c for c in table if c not in first]]
    table.to_csv(summary_csv, index=False)
    if verdicts:
        pd.DataFrame(verdicts).to_csv(verdicts_csv, index=False)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import run_notebooks

    args = parse_args(argv, run_notebooks)
    start = time.monotonic()
    wheels = install_wheels()
    source = offline_environment()
    from helpers import device

    facts = device.describe()
    name = slug(facts.get("gpu", ""))
    executed_dir = ROOT / "build" / f"{name}_notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary_csv = args.out / f"{name}_notebooks.csv"
    verdicts_csv = args.out / f"{name}_verdicts.csv"
    provenance = provenance_of(facts, source, wheels)
    print(f"{provenance['device']}: torch {provenance['torch']}, model source {source}, "
          f"{len(wheels)} carried wheels", flush=True)  # fmt: skip
    rows, verdicts = [], []
    for nb in run_notebooks.select(run_notebooks.all_notebooks(), args.only):
        if time.monotonic() - start > args.budget_s:
            rows.append({"notebook": nb.stem, "passed": None, "result": "skipped (time budget)"})
        else:
            limit = args.budget_s + 90 - (time.monotonic() - start)  # the last may overrun
            rows.append(run_one(run_notebooks, nb, executed_dir, name != "cpu", limit))
            if (executed_dir / nb.name).exists():
                verdicts += [{**v, **provenance} for v in verdict_rows(executed_dir / nb.name)]
        write_tables(rows, verdicts, provenance, summary_csv, verdicts_csv)
        copy_back([summary_csv, verdicts_csv, *executed_dir.glob("*.ipynb")])
    print("\n" + run_notebooks.summary([r for r in rows if r.get("passed") is not None]))
    print(f"summary: {summary_csv}; executed notebooks: {executed_dir}")
    return 0 if all(r.get("passed") for r in rows) else 1


def copy_back(paths: list[Path]) -> None:
    """Copy `paths` into $OUT, where the device tool collects what comes back (8 files at most)."""
    out = os.environ.get("OUT")
    if out:
        for path in [p for p in paths if p.exists()][:8]:
            shutil.copy2(path, Path(out) / path.name)


if __name__ == "__main__":
    sys.exit(main())
