import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.colors as mcolors
import pandas as pd
import psutil
import pytest
import torch
import torch.distributed as dist

from helpers import launch, plots, plots_machine, plots_parallel, shapes, tp, tp_workers

torch.manual_seed(0)


def rank_samples(rank, world):
    samples = [[1.0, 5.0, 2.0], [3.0, 2.0, 2.0]][rank]
    return tp.slowest(samples, torch.device("cpu")), tp.fastest(samples, torch.device("cpu"))


def test_slowest_and_fastest_keep_each_runs_extreme_rank():
    high, low = [3.0, 5.0, 2.0], [1.0, 2.0, 2.0]
    assert launch.launch(rank_samples, 2, backend="gloo") == [(high, low)] * 2


PLANTED_WAIT_S, PLANTED_COLLECTIVE_S = 0.3, 0.1


def planted_layer(rank, world):
    """Rank 1's compute takes PLANTED_WAIT_S longer; the collective itself sleeps a known time."""

    def compute():
        time.sleep(PLANTED_WAIT_S * rank)
        return torch.ones(4)

    def collective(out):
        dist.all_reduce(out)
        time.sleep(PLANTED_COLLECTIVE_S)

    return tp.timed_parts(compute, collective, torch.device("cpu"), repeats=3, warmup=1)


def test_the_collective_is_timed_alone_and_the_wait_for_a_slow_rank_is_skew():
    times = launch.launch(planted_layer, 2, backend="gloo")[0]
    assert set(times) == {"total", "compute", "skew", "comm"}
    for run in range(3):
        assert times["skew"][run] == pytest.approx(PLANTED_WAIT_S, abs=0.09)
        assert PLANTED_COLLECTIVE_S <= times["comm"][run] < PLANTED_COLLECTIVE_S + 0.09
        assert times["compute"][run] >= PLANTED_WAIT_S  # the slowest rank's
        # the real layer waits for the slow rank once, then pays the collective
        assert times["total"][run] >= PLANTED_WAIT_S + PLANTED_COLLECTIVE_S


def test_allreduce_times_report_median_and_quartiles():
    (rows, _) = launch.launch(tp_workers.allreduce_times, 2, [64, 4096], 3, 1, backend="gloo")
    assert [r["bytes"] for r in rows] == [64, 4096]
    for r in rows:
        assert 0 < r["q1_s"] <= r["seconds"] <= r["q3_s"] and r["world"] == 2


def test_mlp_times_reports_every_part_with_its_spread():
    rows = launch.launch(tp_workers.mlp_times, 2, [(32, 64)], [1, 4], 5, 1, backend="gloo")[0]
    assert [(r["tp"], r["batch"]) for r in rows] == [(2, 1), (2, 4)]
    for r in rows:
        for part in ("total", "compute", "skew", "comm"):
            assert 0 <= r[f"{part}_q1_s"] <= r[f"{part}_s"] <= r[f"{part}_q3_s"], part
        assert r["weight_bytes"] == 3 * 32 * 64 * 4 and r["message_bytes"] == r["batch"] * 32 * 4


def test_mlp_sweep_has_a_row_per_point():
    frame = tp_workers.mlp_sweep(
        [(16, 32), (8, 16)], [1, 2], worlds=(1, 2), backend="gloo", repeats=2
    )
    points = list(zip(frame.tp, frame.hidden, frame.batch, strict=True))
    assert points == [(t, h, b) for t in (1, 2) for h in (16, 8) for b in (1, 2)]


def test_held_bytes_counts_the_linears_tp_splits(tiny_llama):
    layer = tiny_llama.model.layers[0]
    linears = [
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.v_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_proj,
        layer.mlp.up_proj,
        layer.mlp.down_proj,
    ]
    per_layer = sum(m.weight.numel() for m in linears) * 4  # fp32
    held = tp_workers.held_bytes(tiny_llama)
    assert held["linears"] == per_layer * len(tiny_llama.model.layers)
    assert held["all"] == sum(p.numel() for p in tiny_llama.parameters()) * 4


def test_a_sharded_llama_matches_and_holds_half_the_split_weights(tiny_llama):
    ids = torch.randint(0, 97, (1, 5))
    frame = tp_workers.llama_tp_check(tiny_llama, ids, new_tokens=3, world=2, backend="gloo")
    assert len(frame) == 4 and frame["greedy tokens identical"].all()
    assert frame["max |logit difference|"].max() < 1e-4
    held, half = frame["split linears held (bytes)"], frame["split linears unsharded ÷ tp (bytes)"]
    assert (held == half).all()


def fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("planted failure")
    time.sleep(30)  # rank 0 would wait: the launcher must stop it


def sleeps(rank, world):
    time.sleep(60)


def test_failing_worker_surfaces_and_nothing_outlives_it():
    start = time.perf_counter()
    with pytest.raises(launch.WorkerError, match=r"rank 1 of 2 failed(.|\n)*planted failure"):
        launch.launch(fails_on_rank_1, 2, backend="gloo")
    assert time.perf_counter() - start < 20  # rank 0's 30 s sleep was cut short
    assert multiprocessing.active_children() == []


def killed_on_rank_1(rank, world, folder):
    """Rank 0 starts a child of its own and waits; rank 1 is killed as the OOM killer would."""
    if rank == 0:
        child = subprocess.Popen(["sleep", "60"])
        (Path(folder) / "grandchild").write_text(str(child.pid))
        time.sleep(60)
    while not (Path(folder) / "grandchild").exists():
        time.sleep(0.05)
    (Path(folder) / "death").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_killed_rank_is_reported_at_once_and_every_process_ends(tmp_path):
    with pytest.raises(
        launch.WorkerError, match=r"rank 1 of 2 was killed by SIGKILL \(.*out-of-memory"
    ):
        launch.launch(killed_on_rank_1, 2, str(tmp_path), backend="gloo")
    cleanup_s = time.time() - float((tmp_path / "death").read_text())
    print(f"killed rank reported and every process ended {cleanup_s:.2f} s after its death")
    assert cleanup_s < 3, f"reported {cleanup_s:.1f} s after the rank died"
    assert multiprocessing.active_children() == []
    assert gone(int((tmp_path / "grandchild").read_text()))  # rank 0's own child too


def exits_quietly(rank, world):
    os._exit(3)


def test_a_rank_exiting_without_a_result_is_reported():
    with pytest.raises(
        launch.WorkerError, match=r"rank 0 of 1 exited with code 3 without a result"
    ):
        launch.launch(exits_quietly, 1, backend="gloo", timeout=60)
    assert multiprocessing.active_children() == []


NOTEBOOK_CELL = """
import torch
import torch.distributed as dist

OFFSET = 10.0


def contribution(rank):
    return torch.tensor([rank + OFFSET])


@torch.inference_mode()
def sum_of_ranks(rank, world, scale):
    x = contribution(rank) * scale
    dist.all_reduce(x)
    return x.item()
"""


def notebook_function(tmp_path, name):
    """A function as a notebook cell defines it: module __main__, source known only by file."""
    cell = tmp_path / "cell.py"
    cell.write_text(NOTEBOOK_CELL)
    namespace = {"__name__": "__main__"}
    exec(compile(NOTEBOOK_CELL, str(cell), "exec"), namespace)
    return namespace[name]


def test_a_function_written_in_the_notebook_runs_on_the_ranks(tmp_path):
    fn = notebook_function(tmp_path, "sum_of_ranks")
    assert fn.__module__ == "__main__"
    assert launch.launch(fn, 2, 2.0, backend="gloo") == [42.0, 42.0]  # (10 + 11) · 2 on each rank
    shipped = launch.NotebookFunction(fn)
    assert set(shipped.sources) == {"sum_of_ranks", "contribution"}
    assert shipped.modules == {"torch": "torch", "dist": "torch.distributed"}
    assert shipped.values == {"OFFSET": 10.0}


def test_what_cannot_travel_is_named_before_launch():
    with pytest.raises(TypeError, match="inside another function"):
        offset = 1

        def closure(rank, world):
            return rank + offset

        closure.__module__ = "__main__"
        launch.launch(closure, 2, backend="gloo")
    with pytest.raises(TypeError, match="cannot be sent to other processes"):
        launch.launch(fails_on_rank_1, 2, lambda: 0, backend="gloo")  # a lambda as an argument
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        launch.launch(fails_on_rank_1, 0)
    with pytest.raises(ValueError, match=r"Unknown backend 'mpi'; use one of \['gloo', 'nccl'\]"):
        launch.launch(fails_on_rank_1, 2, backend="mpi")
    with pytest.raises(TypeError, match="TP degree must be a whole number"):
        shapes.check_tp_degree(1.5, heads=8, kv_heads=8, intermediate=64)


class DefinedInTheNotebook:
    """Stands for a class a notebook cell defines: the ranks cannot import it."""


def identity(rank, world, obj):
    return obj


def test_an_argument_the_ranks_cannot_rebuild_names_the_cause(monkeypatch):
    monkeypatch.setattr(DefinedInTheNotebook, "__module__", "__main__")
    monkeypatch.setattr(
        sys.modules["__main__"], "DefinedInTheNotebook", DefinedInTheNotebook, raising=False
    )
    start = time.perf_counter()
    with pytest.raises(
        launch.WorkerError, match=r"Can't get attribute(.|\n)*Put it in a \.py module"
    ):
        launch.launch(identity, 1, DefinedInTheNotebook(), backend="gloo")
    assert time.perf_counter() - start < 20
    assert multiprocessing.active_children() == []


def test_timeout_stops_every_rank():
    with pytest.raises(TimeoutError, match="did not finish"):
        launch.launch(sleeps, 2, backend="gloo", timeout=8)
    assert multiprocessing.active_children() == []


def test_bad_degrees_are_refused_before_launch():
    with pytest.raises(
        ValueError, match=r"does not divide the 9 attention heads; use one of \[1, 3\]"
    ):
        shapes.check_tp_degree(2, heads=9, kv_heads=3, intermediate=1536)
    with pytest.raises(ValueError, match="KV heads"):
        shapes.check_tp_degree(4, heads=32, kv_heads=2, intermediate=1024)
    with pytest.raises(ValueError, match="backend='gloo'"):
        launch.check_world(torch.cuda.device_count() + 1, "nccl")


def test_alpha_beta_fit_recovers_known_parameters():
    alpha, beta = 25e-6, 1 / 50e9
    sizes = [2**k for k in range(10, 28, 2)]
    times = [alpha + beta * n for n in sizes]
    a, b = tp.fit_alpha_beta(sizes, times)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    assert (
        shapes.allreduce_bus_bytes(1000, 2) == 1000 and shapes.allreduce_bus_bytes(1000, 4) == 1500
    )


def test_decode_communication_is_a_sliver_of_the_weight_bytes():
    """Llama-2-7B fp16 at batch 1 sends < 1% of the bytes it reads (its cost is latency)."""
    llama = shapes.Shape.of("llama-2-7b")
    for t in (2, 4, 8):
        sent = 2 * llama.layers * shapes.allreduce_bus_bytes(llama.hidden * 2, t)
        assert sent / (llama.params * 2 / t) < 0.01


def test_the_llama_in_notebook_03_splits_2_or_4_ways_not_8():
    for t in (1, 2, 4):
        assert shapes.check_tp_degree(t, heads=8, kv_heads=4, intermediate=768) == t
    with pytest.raises(ValueError, match="KV heads; use one of \\[1, 2, 4\\]"):
        shapes.check_tp_degree(8, heads=8, kv_heads=4, intermediate=768)


def test_the_launcher_is_still_reachable_from_tp():
    assert tp.launch is launch.launch and tp.WorkerError is launch.WorkerError
    assert tp.NotebookFunction is launch.NotebookFunction
    assert launch.COLLECTIVE_BACKENDS == ("gloo", "nccl") and not hasattr(tp, "BACKENDS")


def test_explain_miss_names_the_part_that_missed_most():
    # predicted 1.5 + 0.5 = 2 ms; the matmuls took 1.6 ms, the all-reduce 2.4 ms: comm missed
    text = tp.explain_miss(4.1e-3, 2e-3, 1.6e-3, 1.5e-3, 2.4e-3, 0.5e-3, 0.2e-3)
    assert text.startswith("measured 4.1 ms vs predicted 2 ms (+105%)")
    assert "the rest 0.1 ms vs 0, beside 0.2 ms of skew" in text
    assert text.endswith("the all-reduce, 1.9 ms more than predicted.")
    text = tp.explain_miss(1e-3, 2e-3, 0.7e-3, 1.5e-3, 0.3e-3, 0.5e-3, 0.0)
    assert "(-50%)" in text and "the matmuls" in text and "0.8 ms less than predicted" in text


def test_the_parts_of_a_miss_add_up_to_the_whole_miss():
    gaps = tp.miss_by_part(4.1e-3, 1.6e-3, 1.5e-3, 2.4e-3, 0.5e-3)
    assert sum(gaps.values()) == pytest.approx(4.1e-3 - (1.5e-3 + 0.5e-3))
    assert tp.largest_miss(gaps) == "comm" and gaps["rest"] == pytest.approx(0.1e-3)


# --- Notebook 02 and 03's figures (issue 19): one colour per entity, readable ticks, keys off the
# data


def _layers_frame():
    rows = []
    for degree in (1, 2):
        for batch in (1, 16):
            t = 1e-3 * batch / degree
            parts = {"total": t, "comm": 2e-4 * (degree > 1), "skew": 5e-5 * (degree > 1)}
            row = {"tp": degree, "hidden": 512, "batch": batch}
            for part, s in parts.items():
                row |= {f"{part}_s": s, f"{part}_q1_s": s * 0.9, f"{part}_q3_s": s * 1.1}
            rows.append(row)
    return pd.DataFrame(rows)


def test_tp_compute_vs_comm_colours_the_all_reduce_as_every_figure_does():
    layers = _layers_frame()
    predicted = layers[layers.tp == 1].set_index(["hidden", "batch"]).total_s * 1e3 / 2
    fig = plots_parallel.tp_compute_vs_comm(layers, predicted, 2, "gloo")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if hasattr(c, "patches")]  # not the error bars
    colour = {c.get_label(): mcolors.to_hex(c.patches[0].get_facecolor()) for c in bars}
    want = {
        "TP 1 total": plots.style("tp", "TP 1"),
        "TP 2 total": plots.style("tp", "TP 2"),
        "TP 2: its all-reduce": plots.style("collective", "all-reduce"),
        "TP 2: skew": plots.style("collective", "skew"),
    }
    for label, look in want.items():
        assert colour[label] == mcolors.to_hex(look["color"]), label
    assert ax.get_legend() is None and fig.legends  # the key is the figure's, below the panels


def test_tp_planner_puts_its_key_outside_both_panels():
    scaling = pd.DataFrame(
        [
            {"α": name, "tp": t, "tpot_ms": 10 / t + a, "tokens_per_s_per_gpu": 1000 / t}
            for name, a in (("gpt-fast-class: α = 4 µs", 0.1), ("a PCIe box (assumed)", 1.0))
            for t in (1, 2, 4, 8)
        ]
    )
    fig = plots_parallel.tp_planner(scaling, [1, 2, 4, 8])
    assert all(ax.get_legend() is None for ax in fig.axes) and fig.legends
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["1", "2", "4", "8"]
    lines = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert lines["a PCIe box (assumed)"] == plots.style("engine", "pcie box")["color"]


def test_kv_cache_growth_labels_only_the_contexts():
    contexts = [256, 512, 1024, 2048, 4096, 8192]
    curves = pd.DataFrame(
        {
            f"{k}, batch {b}": [c * b * (3 if k == "MHA" else 1) / 1e6 for c in contexts]
            for b in (1, 8)
            for k in ("GQA", "MHA")
        },
        index=pd.Index(contexts, name="context (tokens)"),
    )
    fig = plots_machine.kv_cache_growth(curves, 0.5, "title")
    ax = fig.axes[0]
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown == [f"{c:,}" for c in contexts]
    assert not [t for t in ax.get_xminorticklabels() if t.get_text()]  # no "3×10³4×10³"
    gqa, mha = (line for line in ax.get_lines() if line.get_label().endswith("batch 8"))
    assert gqa.get_color() == mha.get_color() and gqa.get_linestyle() != mha.get_linestyle()
