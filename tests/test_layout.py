"""The layout of `helpers/`: layers that import one way (issue 12, docs/ARCHITECTURE.md)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
MODULES = sorted(p.stem for p in HELPERS.glob("*.py") if p.stem != "__init__")

# Lower layers never import higher ones: facts (pure arithmetic, no torch) → measurement →
# engine → probes of this machine → the lab (what only notebooks use).
LAYERS = {
    "facts": {
        "prediction",
        "checks",
        "shapes",
        "planner",
        "engines",
        "stepcost",
        "verdicts",
        "explain",
        "explain_server",
        "stepmodel",
        "serving_metrics",
    },
    "measurement": {
        "device",
        "bench",
        "memory",
        "memory_readings",
        "memory_search",
        "memory_timing",
        "noise",
        "loadgen",
        "fake_server",
        "server_metrics",
    },
    "engine": {
        "models",
        "decode",
        "quant",
        "quant_linears",
        "quant_backends",
        "tp",
        "tp_workers",
        "launch",
        "serving",
        "paged",
        "workloads",
        "server",
        "vllm_flags",
        "deploy",
        "calibrate",
        "kvquant",
    },
    "probes": {"overhead", "roofline", "profile"},
    "lab": {
        "plots",
        "plots_machine",
        "plots_parallel",
        "widgets",
        "exercises",
        "workbook",
        "workbook_one_device",
        "workbook_serving",
    },
}
RANK = {module: i for i, names in enumerate(LAYERS.values()) for module in names}


def helper_imports(module: str, top_level_only: bool) -> set[str]:
    """The helpers modules `module` imports (at the top level, or anywhere in it)."""
    tree = ast.parse((HELPERS / f"{module}.py").read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module == "helpers":
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
    return found


def test_every_module_has_a_layer():
    assert set(MODULES) == set(RANK), f"place {set(MODULES) ^ set(RANK)} in LAYERS and the docs"


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_the_layers(module):
    for imported in helper_imports(module, top_level_only=True):
        assert RANK[imported] <= RANK[module], f"{module} (layer {RANK[module]}) imports {imported}"


@pytest.mark.parametrize("module", MODULES)
def test_no_helpers_import_hidden_inside_a_function(module):
    source = (HELPERS / f"{module}.py").read_text()
    main_block = source.split('if __name__ == "__main__":')[0]  # a script's own imports are fine
    tree = ast.parse(main_block)
    top = helper_imports(module, top_level_only=True)
    everywhere = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("helpers"):
                    everywhere.add(ast.unparse(inner))
    assert not everywhere, f"{module} imports inside a function: {everywhere} (top: {top})"


def test_the_import_graph_has_no_cycle():
    graph = {m: helper_imports(m, top_level_only=False) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError(f"import cycle: {' → '.join(path + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for n in graph[m]:
                visit(n, path + [m])
            state[m] = "done"

    for m in MODULES:
        visit(m, [])


def test_the_facts_layer_runs_without_torch():
    code = (
        "import sys; import helpers.checks, helpers.shapes, helpers.planner, helpers.verdicts; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "facts imported torch"


def test_the_architecture_page_names_every_module_in_its_layer():
    rows = {}
    page = (HELPERS.parent / "docs" / "ARCHITECTURE.md").read_text()
    for line in page.splitlines():
        if m := re.match(r"\| \d\. (\w+) \| ([^|]+) \|", line):
            rows[m[1]] = set(re.findall(r"`(\w+)`", m[2]))
    assert rows.keys() == LAYERS.keys()
    for layer, names in LAYERS.items():
        assert rows[layer] == names, f"{layer}: page and LAYERS differ by {rows[layer] ^ names}"
