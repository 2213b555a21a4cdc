"""`make figures`: publish the executed notebooks of a `make run` as docs/executed/NN_name.html.

A reader browsing the repository sees numbers and plots without running anything, while
`notebooks/` stays output-free. Each page opens with the machine and the date of the run it shows,
so nobody mistakes one machine's numbers for another's (issue 19).
"""

from __future__ import annotations

import datetime
import html
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
OUT = ROOT / "docs" / "executed"


def machine() -> str:
    """This machine in a few words: the CPU's model name and core count, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]}, {len(names)} cores" if names else cpu
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            cpu += f"; GPU: {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return cpu


def banner(run_on: str, date: str) -> str:
    return (
        '<div style="padding:0.6em 1em;margin:0 0 1em;border-left:4px solid #0173b2;'
        'background:#f2f7fb;font-family:sans-serif">'
        f"Executed on <b>{html.escape(run_on)}</b> on {html.escape(date)} by <code>make run</code>."
        " "
        "Numbers and verdicts are this machine's; run the notebook to get yours.</div>"
    )


def publish(page: Path, out_dir: Path, run_on: str) -> Path:
    """Copy one executed HTML page into `out_dir` with the banner after its <body> tag."""
    date = datetime.datetime.fromtimestamp(page.stat().st_mtime, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M UTC"
    )
    text = page.read_text()
    head, sep, rest = text.partition("<body")
    if not sep:
        raise ValueError(f"{page} has no <body>: is it an nbconvert HTML export?")
    tag_end = rest.index(">") + 1
    out = out_dir / page.name
    out.write_text(head + sep + rest[:tag_end] + banner(run_on, date) + rest[tag_end:])
    return out


def main() -> int:
    pages = sorted(BUILD.glob("[0-9][0-9]_*.html"))
    if not pages:
        print("no executed notebooks in build/: run `make run` first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    run_on = machine()
    for page in pages:
        print(f"published {publish(page, OUT, run_on).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
