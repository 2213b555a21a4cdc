"""The notebook runners' pure parts, tools/run_notebooks.py and tools/gpu_notebooks.py (no
notebook is executed here)."""

import importlib.util
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_notebooks = _tool("run_notebooks")
gpu_notebooks = _tool("gpu_notebooks")

Mem = namedtuple("Mem", "rss")


class FakeProcess:
    def __init__(self, rss, children=(), gone=False):
        self.rss, self.kids, self.gone = rss, list(children), gone

    def children(self, recursive=False):
        out = []
        for kid in self.kids:
            out.append(kid)
            if recursive:
                out += kid.children(recursive=True)
        return out

    def memory_info(self):
        if self.gone:
            raise psutil.NoSuchProcess(pid=1)
        return Mem(self.rss)


def test_tree_rss_sums_every_descendant_but_not_the_root():
    ranks = [FakeProcess(300), FakeProcess(400)]
    kernel = FakeProcess(1000, ranks + [FakeProcess(5, gone=True)])
    launcher = FakeProcess(10_000, [kernel])
    assert run_notebooks.tree_rss(launcher) == 1700


def test_tree_rss_of_a_vanished_root_is_zero():
    class Gone:
        def children(self, recursive=False):
            raise psutil.NoSuchProcess(pid=1)

    assert run_notebooks.tree_rss(Gone()) == 0


def test_tree_rss_sees_a_real_grandchild():
    code = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "'import time; x = bytearray(80 * 2**20); x[::4096] = bytes(len(x[::4096])); "
        "time.sleep(30)'])"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        launcher = psutil.Process(child.pid)
        deadline = time.monotonic() + 20
        while run_notebooks.tree_rss(launcher) < 80 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_notebooks.tree_rss(launcher) >= 80 * 2**20
    finally:
        for proc in psutil.Process(child.pid).children(recursive=True):
            proc.kill()
        child.kill()
        child.wait()


def test_peak_sampler_keeps_the_largest_value():
    values = iter([1, 5, 3] + [2] * 10_000)
    sampler = run_notebooks.PeakSampler(lambda: next(values), interval=0.001)
    sampler.start()
    time.sleep(0.05)
    assert sampler.stop() == 5


def test_select_by_name_part():
    notebooks = [Path("00_your_machine.ipynb"), Path("01_quantization.ipynb")]
    assert run_notebooks.select(notebooks, None) == notebooks
    assert run_notebooks.select(notebooks, ["01"]) == notebooks[1:]
    assert run_notebooks.select(notebooks, ["machine", "quant"]) == notebooks
    with pytest.raises(SystemExit, match="00_your_machine"):
        run_notebooks.select(notebooks, ["99"])


def test_summary_has_one_line_per_notebook():
    rows = [{"notebook": "00_your_machine", "passed": True, "wall_s": 25.0,
             "peak_rss_bytes": 1.5 * 2**30}]  # fmt: skip
    text = run_notebooks.summary(rows)
    assert "00_your_machine" in text and "pass" in text and "1.50 GiB" in text


def test_gpu_slug():
    assert gpu_notebooks.slug("NVIDIA H200") == "h200"
    assert gpu_notebooks.slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
    assert gpu_notebooks.slug("Tesla T4") == "tesla_t4"
    assert gpu_notebooks.slug("") == "cpu"


def test_verdict_rows_are_read_back_from_an_executed_notebook(tmp_path):
    import nbformat
    from IPython.core.formatters import DisplayFormatter

    from helpers import verdicts

    shown = verdicts.table(
        [verdicts.row("TP 2 lowers latency", "13.5 vs 22.0 ms",
                      verdicts.compare("TP 2", 13.5, None, "TP 1", 22.0, None))]
    )  # fmt: skip
    data, metadata = DisplayFormatter().format(shown)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("verdicts.table(rows)")
    cell.outputs = [nbformat.v4.new_output("display_data", data, metadata=metadata)]
    nb.cells += [nbformat.v4.new_markdown_cell("text"), cell]
    path = tmp_path / "04_latency_vs_throughput.ipynb"
    nbformat.write(nb, path)
    (row,) = gpu_notebooks.verdict_rows(path)
    assert row["notebook"] == "04_latency_vs_throughput"
    assert row["verdict"] == verdicts.HOLDS and row["evidence (this run)"] == "13.5 vs 22.0 ms"


def test_install_wheels_without_wheels_only_sets_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert gpu_notebooks.install_wheels(tmp_path / "none", tmp_path / "site") == []
    parts = os.environ["PYTHONPATH"].split(os.pathsep)
    assert parts == [str(gpu_notebooks.ROOT), "/elsewhere"]
    assert sys.path[0] == str(gpu_notebooks.ROOT)
    assert not (tmp_path / "site").exists()


def test_install_wheels_installs_a_carried_wheel(tmp_path, monkeypatch):
    import zipfile

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    files = {
        "tinycarried/__init__.py": "VALUE = 42\n",
        "tinycarried-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinycarried\n"
        "Version: 0.1\n",
        "tinycarried-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files["tinycarried-0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files)
    with zipfile.ZipFile(wheels / "tinycarried-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    installed = gpu_notebooks.install_wheels(wheels, site)
    assert installed == ["tinycarried-0.1-py3-none-any.whl"]
    assert (site / "tinycarried" / "__init__.py").exists()
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    assert sys.path[:2] == [str(site), str(gpu_notebooks.ROOT)]


def test_only_wheels_for_this_python_fit(tmp_path):
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    other = "cp39" if here != "cp39" else "cp38"
    assert gpu_notebooks.fits_here(tmp_path / "nbclient-0.11.0-py3-none-any.whl")
    assert not gpu_notebooks.fits_here(tmp_path / f"rpds_py-1.0-{other}-{other}-win_amd64.whl")


def test_run_past_its_limit_is_stopped_and_fails(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import time; time.sleep(600)"))
    path = tmp_path / "99_slow.ipynb"
    nbformat.write(nb, path)
    row = run_notebooks.run(path, tmp_path, html=False, limit_s=0.5)
    assert row["timed_out"] and not row["passed"] and row["wall_s"] < 30


def test_a_servers_memory_is_counted_apart_from_the_kernels():
    code = (
        "import time; x = bytearray(60 * 2**20); x[::4096] = bytes(len(x[::4096])); time.sleep(30)"
    )
    marked = {**os.environ, run_notebooks.SERVER_MARK: "1"}
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for env in (None, marked)]
    try:
        me = psutil.Process()
        deadline = time.monotonic() + 20
        while min(run_notebooks.split_rss(me)) < 60 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
        kernel, server = run_notebooks.split_rss(me)
        assert kernel >= 60 * 2**20 and server >= 60 * 2**20
        assert kernel + server == pytest.approx(run_notebooks.tree_rss(me), rel=0.05)
    finally:
        for p in [launcher, *procs]:
            p.kill()
            p.wait()


def test_summary_shows_a_servers_memory_apart():
    rows = [{"notebook": "06_real_server", "passed": True, "wall_s": 200.0,
             "peak_rss_bytes": 5.0 * 2**30, "kernel_peak_rss_bytes": 1.0 * 2**30,
             "server_peak_rss_bytes": 4.0 * 2**30}]  # fmt: skip
    text = run_notebooks.summary(rows)
    assert "1.00 GiB" in text and "4.00 GiB" in text and "5.00 GiB" not in text


def test_run_times_table_counts_the_server_apart(tmp_path):
    import pandas as pd

    gib = 2**30
    rows = [
        {"notebook": "00_a", "passed": True, "wall_s": 60.0, "peak_rss_bytes": 1.5 * gib,
         "load_avg_1m_before": 0.1},
        {"notebook": "06_b", "passed": False, "wall_s": 200.0, "peak_rss_bytes": 5.0 * gib,
         "kernel_peak_rss_bytes": 1.25 * gib, "server_peak_rss_bytes": 3.75 * gib,
         "load_avg_1m_before": 0.2},
        {"notebook": "01_c", "passed": True, "wall_s": 90.0, "peak_rss_bytes": 1.25 * gib,
         "kernel_peak_rss_bytes": 1.0 * gib, "server_peak_rss_bytes": 0.0,
         "load_avg_1m_before": 0.1},  # no server: the split's slower sampler missed a spike
    ]  # fmt: skip
    path = tmp_path / "run_times.csv"
    run_notebooks.write_run_times(rows, path)
    table = pd.read_csv(path).set_index("notebook")
    assert table.loc["00_a", ["kernel_peak_gib", "server_peak_gib"]].tolist() == [1.5, 0.0]
    assert table.loc["06_b", ["kernel_peak_gib", "server_peak_gib"]].tolist() == [1.25, 3.75]
    assert table.loc["01_c", ["kernel_peak_gib", "server_peak_gib"]].tolist() == [1.25, 0.0]
    assert table.loc["06_b", "passed"] == False  # noqa: E712 (a stored failure stays one)
    assert table.machine.notna().all() and table.date.notna().all()
