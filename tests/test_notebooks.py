"""Hygiene of the committed notebooks (their execution is checked by nbval in `make test`)."""

import re
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    for cell in code_cells(path):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{path.name} has outputs: clear them (Jupyter: Edit → Clear Outputs of All Cells)"
        )


def test_every_notebook_opens_with_the_same_bootstrap_cell():
    firsts = {p.name: code_cells(p)[0].source for p in NOTEBOOKS}
    assert len(set(firsts.values())) == 1, f"bootstrap cells differ: {sorted(firsts)}"
    with open(ROOT / "pyproject.toml", "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"]
    source = next(iter(firsts.values()))
    assert f'COURSE_REPO = "{url}"' in source, "run `make sync-url` after changing the URL"
    assert "setup_notebook()" in source


EXERCISE_CALL = re.compile(r"workbook\.(answer|predict|derive|investigate)\(\s*\"(\d\d\.[\w-]+)\"")


def exercise_calls(path, solutions: bool) -> dict[str, str]:
    """{key: kind} of the workbook calls in the notebook's exercise (or solution) cells;
    `workbook.answer` checks a "compute" exercise."""
    cells = [c for c in code_cells(path) if ("solution" in c.metadata.get("tags", [])) == solutions]
    calls = EXERCISE_CALL.findall("\n".join(c.source for c in cells))
    return {key: "compute" if call == "answer" else call for call, key in calls}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_four_exercises_of_the_three_kinds(path):
    """Issue 19: at least four exercises per notebook, among them a prediction checked against
    this run, a derivation checked on unseen cases and an investigation of a knob; each is asked
    in the notebook and answered in a solution cell, and each is in the bank with that kind."""
    from helpers import exercises, workbook  # noqa: F401 (importing workbook fills the bank)

    asked, solved = exercise_calls(path, solutions=False), exercise_calls(path, solutions=True)
    own = {k: e.kind for k, e in exercises.BANK.items() if k.startswith(path.name[:2] + ".")}
    assert len(own) >= 4, f"{path.name}: {len(own)} exercises in the bank, the kit asks for 4"
    assert {"predict", "derive", "investigate"} <= set(own.values()), f"{path.name}: {own}"
    assert asked == own, f"{path.name}: asked {asked} but the bank has {own}"
    assert set(solved) == set(own), f"{path.name}: solutions cover {sorted(solved)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_come_last(path):
    if "workbook." not in "\n".join(c.source for c in code_cells(path)):
        pytest.skip("exercises not yet moved to helpers.workbook (issue 19)")
    tags = ["solution" in c.metadata.get("tags", []) for c in code_cells(path)]
    first = tags.index(True) if True in tags else len(tags)
    assert all(tags[first:]), f"{path.name}: a cell after the solutions is not tagged solution"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_links_each_notebook_to_colab(path):
    readme = (ROOT / "README.md").read_text()
    assert f"blob/main/notebooks/{path.name}" in readme


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_code_cell_over_30_lines(path):
    long = [(i, len(c.source.splitlines())) for i, c in enumerate(code_cells(path))]
    long = [(i, n) for i, n in long if n > 30]
    assert not long, f"{path.name}: code cells over 30 lines (index, lines): {long}"


HELPER_MODULES = sorted(p.stem for p in (ROOT / "helpers").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_call_no_private_helper(path):
    sources = "\n".join(c.source for c in code_cells(path))
    private = re.findall(rf"\b(?:{'|'.join(HELPER_MODULES)})\._[a-z]\w*", sources)
    assert not private, (
        f"{path.name} calls private helpers {sorted(set(private))}: make them public"
    )
