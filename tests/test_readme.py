"""README's run times are the stored measurements (data/measured/cpu_*_run_times.csv, written by
`tools/run_notebooks.py`): a number a teacher plans a workshop with is never typed by hand."""

import re

import pandas as pd
import pytest

from helpers import DATA_DIR, REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
STORED = sorted((DATA_DIR / "measured").glob("cpu_*_run_times.csv"))


def duration(seconds: float) -> str:
    """As README writes a wall time: '58 s', '2 min 43 s'."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


def table(heading: str) -> pd.DataFrame:
    """The first Markdown table after `heading`, cells as text, its first column the index."""
    rows = []
    for line in README[README.index(heading) :].splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:  # the first line after the table
            break
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return pd.DataFrame(cells[2:], columns=cells[0]).set_index(cells[0][0])


def test_there_is_a_stored_run_of_the_whole_course():
    assert STORED
    for path in STORED:
        runs = pd.read_csv(path)
        assert runs.passed.all() and len(runs) == 7, path.name  # notebooks 00–06, all passed


@pytest.mark.parametrize("path", STORED, ids=lambda p: p.stem)
def test_the_measured_table_quotes_each_stored_run(path):
    runs = pd.read_csv(path)
    measured = table("## Measured on this course's reference machine")
    column = [c for c in measured.columns if runs.date[0] in c]
    assert len(column) == 1, f"README's measured table has no column dated {runs.date[0]}"
    for run in runs.itertuples():
        want = f"{duration(run.wall_s)}, {run.kernel_peak_gib:.2f} GiB"
        if run.server_peak_gib > 0:
            want += f" + {run.server_peak_gib:.2f} GiB server"
        assert measured.loc[run.notebook.removesuffix(".ipynb"), column[0]] == want, run.notebook


def test_the_teachers_run_times_cover_the_stored_runs():
    teachers = table("## For teachers")
    for path in STORED:
        for run in pd.read_csv(path).itertuples():
            number = run.notebook[:2]
            row = teachers[teachers.index.str.startswith(number)].iloc[0]
            m = re.search(r"(\d+(?:\.\d+)?)(?:–(\d+(?:\.\d+)?))? min", row["run time"])
            assert m, f"{number}: no run time in minutes"
            low, high = float(m[1]), float(m[2] or m[1])
            minutes = run.wall_s / 60
            assert low - 0.25 <= minutes <= high + 0.25, (
                f"notebook {number}: README says {m[0]}, {path.name} measured {minutes:.1f} min"
            )
