"""Issue 22: reliability, round 2 — each test is one finding: the call, and its error or value.

No evidence made of NaN (verdicts, planner, serving summaries), files written whole and read
defensively (ceilings, the model cache), one line naming the fix at every entry point. The
property test throwing random bad values at every public function is test_reliability_props.py.
"""

import contextlib
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from helpers import bench, models, planner, roofline, serving, verdicts
from helpers.decode import greedy_decode
from helpers.verdicts import FAILS, HOLDS, NOT_MEASURED

REPO = Path(__file__).resolve().parent.parent

# --- verdicts: never "holds" on evidence that is not there ------------------------------------


def test_nan_spreads_are_not_measured_not_holds():
    nan = (math.nan, math.nan)
    assert verdicts.compare("a", 1.0, nan, "b", 5.0, nan).verdict == NOT_MEASURED  # "holds" before
    assert verdicts.compare("a", 1.0, (0.9, math.nan), "b", 5.0, None).verdict == NOT_MEASURED
    assert verdicts.compare("a", 1.0, None, "b", None, None).verdict == NOT_MEASURED


def test_reversed_or_malformed_spreads_are_refused():
    with pytest.raises(ValueError, match=r"spread_a is \(3, 1\), high before low: pass \(low, hi"):
        verdicts.compare("a", 2.0, (3.0, 1.0), "b", 9.0, (8.0, 10.0))  # "held" before
    with pytest.raises(ValueError, match=r"spread_b must be a \(low, high\) pair.*\(1, 2, 3\)"):
        verdicts.compare("a", 2.0, None, "b", 2.0, (1, 2, 3))
    with pytest.raises(TypeError, match="spread_a must be a \\(low, high\\) pair"):
        verdicts.compare("a", 2.0, 0.5, "b", 2.0, None)


@pytest.mark.parametrize("bad", ["12", [1.0, 2.0], np.array([1.0, 2.0]), True])
def test_non_numeric_values_are_refused(bad):
    with pytest.raises(TypeError, match=r"^(a|value) must be (a|one) number"):
        verdicts.compare("a", bad, None, "b", 2.0, None)
    with pytest.raises(TypeError, match="value must be"):
        verdicts.at_most("x", bad, 2.0)


def test_inf_is_not_a_measurement():
    with pytest.raises(ValueError, match="value is inf: a measurement is finite"):
        verdicts.close_to("x", math.inf, 1.0, 0.1)


def test_monotonic_given_a_dict_says_so_instead_of_judging_its_keys():
    with pytest.raises(TypeError, match=r"values is a dict \(monotonic would judge its keys\)"):
        verdicts.monotonic("tokens/s", {1: 30.0, 2: 20.0, 4: 10.0}, decreasing=False)
    with pytest.raises(TypeError, match=r"values\[1\] must be a number"):
        verdicts.monotonic("tokens/s", [1.0, "2"])
    assert verdicts.monotonic("x", pd.Series([3.0, 2.0, 1.0])).verdict == HOLDS


def test_close_to_a_target_of_zero_is_decided_not_unmeasured():
    assert verdicts.close_to("x", 5.0, 0, 0.1).verdict == FAILS  # "not measured here" before
    assert verdicts.close_to("x", 0.0, 0, 0.1).verdict == HOLDS
    assert verdicts.close_to("x", None, 0, 0.1).verdict == NOT_MEASURED
    assert verdicts.close_to("x", 1.0, math.nan, 0.1).verdict == NOT_MEASURED
    with pytest.raises(ValueError, match="rel_tol must be a fraction ≥ 0"):
        verdicts.close_to("x", 1.0, 1.0, -0.1)


def test_rows_take_decisions_only():
    with pytest.raises(TypeError, match="decision must be a verdicts.Decision"):
        verdicts.row("claim", "evidence", "holds")
    assert verdicts.ms(None) == "not measured"


# --- planner: no engine fitted to nothing, the same checks in every function ------------------

ROWS = [{"batch": b, "prompt": 128, "new_tokens": 16, "tpot_s": 0.01 + 0.001 * b} for b in (1, 8)]


def test_calibrate_refuses_identical_rows():
    same = [dict(ROWS[0]) for _ in range(3)]  # a plausible engine and a NumPy warning before
    with pytest.raises(ValueError, match="the 3 measured rows all predict the same work"):
        planner.calibrate(same, model="llama-2-7b", gpu="h100-sxm", dtype="fp16")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.01, 0.0, None])
def test_calibrate_refuses_a_row_that_is_not_a_time_naming_it(bad):
    rows = [*ROWS, {"batch": 64, "prompt": 128, "new_tokens": 16, "tpot_s": bad}]
    with pytest.raises(ValueError, match=r"measured row 2 \(batch 64\) has tpot_s=.*drop that row"):
        planner.calibrate(rows, model="llama-2-7b", gpu="h100-sxm", dtype="fp16")  # NaN engine


def test_calibrate_names_missing_columns_and_takes_dtype_names_as_predict_does():
    with pytest.raises(ValueError, match=r"measured lacks the column\(s\) \['tpot_s'\]"):
        planner.calibrate([{"batch": 1, "prompt": 1, "new_tokens": 2}] * 2, model="llama-2-7b",
                          gpu="h100-sxm", dtype="fp16")  # fmt: skip
    upper = planner.calibrate(ROWS, model="llama-2-7b", gpu="h100-sxm", dtype="BF16")  # KeyError
    assert upper == planner.calibrate(ROWS, model="llama-2-7b", gpu="h100-sxm", dtype="bf16")


def test_a_t4_has_no_bf16():
    with pytest.raises(ValueError, match="gpu 't4' has no native bf16.*use dtype='fp16'"):
        planner.predict(gpu="t4", dtype="bf16")  # fp16's numbers before, without a word
    with pytest.raises(ValueError, match="no native bf16"):
        planner.step_seconds(model="llama-2-7b", gpu="T4", dtype="bf16", batch=1, tokens=1,
                             context=1)  # fmt: skip
    assert planner.predict(gpu="t4", dtype="fp16").tpot_s > 0


@pytest.mark.parametrize(
    ("tp", "error", "message"),
    [
        (3, ValueError, "TP degree 3 does not divide the 32 attention heads"),  # a time before
        (0, ValueError, "tp must be at least 1, got 0"),  # ZeroDivisionError before
        (1.5, TypeError, "tp must be a whole number"),
    ],
)
def test_step_seconds_checks_tp_as_predict_does(tp, error, message):
    with pytest.raises(error, match=message):
        planner.step_seconds(model="llama-2-7b", gpu="h100-sxm", dtype="fp16", tp=tp, batch=1,
                             tokens=1, context=8)  # fmt: skip
    with pytest.raises(error, match=message):
        planner.predict(model="llama-2-7b", gpu="h100-sxm", tp=tp)


def fake_ceilings():
    return types.SimpleNamespace(matmul_flops={"fp32": 1e11}, read_bandwidth=2e10,
                                 step_overhead_s=1e-3, layer_overhead_s=1e-5)  # fmt: skip


def test_a_measured_machine_has_no_link_for_tp_2():
    spec = planner.spec_from_ceilings(fake_ceilings())
    with pytest.raises(ValueError, match=r"tp=2 needs a link between devices, and gpu 'this mac"):
        planner.predict(model="llama-2-7b", gpu=spec, dtype="fp32", tp=2)  # TypeError before
    assert set(planner.candidates("llama-2-7b", spec, gpus=2, dtypes=("fp32",)).tp) == {1}
    with pytest.raises(TypeError, match=r"ceilings must be roofline.Ceilings"):
        planner.spec_from_ceilings({"read_bandwidth": 1e9})


# --- serving: a clock that lies stops the run; nothing served says so ------------------------


def reqs(spec, vocab=97):
    gen = torch.Generator().manual_seed(0)
    return [serving.Request(torch.randint(0, vocab, (p,), generator=gen), n, a) for p, n, a in spec]


TWO = [(4, 3, 0.0), (6, 2, 0.5)]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (None, TypeError, r"clock returned None at step 0 \(Step\(seqs=1.*must `return`"),
        (math.nan, ValueError, r"clock returned nan s at step 0 .*finite time ≥ 0"),
        (-0.01, ValueError, r"clock returned -0.01 s at step 0"),
        ("1", TypeError, r"clock returned '1' at step 0.*a number"),
    ],
)
def test_a_virtual_clock_that_returns_no_time_fails_at_that_step(value, error, message):
    with pytest.raises(error, match=message):  # a negative TPOT or an all-NaN summary before
        serving.run(None, reqs(TWO), clock=lambda step: value)


def test_the_step_at_which_a_clock_fails_is_named():
    with pytest.raises(
        ValueError, match=r"clock returned nan s at step 1 \(Step\(seqs=1, tokens=1"
    ):
        serving.run(None, reqs(TWO), clock=lambda step: 0.1 if step.tokens > 1 else math.nan)


def all_rejected():
    with pytest.warns(UserWarning, match="1 request"):
        return serving.run(None, reqs([(10, 20, 0.0)]), block_size=2, kv_blocks=1,
                           clock=lambda s: 1.0)  # fmt: skip


@pytest.mark.parametrize("read", [serving.summary, serving.littles_law, serving.kv_usage,
                                  lambda df: serving.goodput(df, 1.0, 1.0)])  # fmt: skip
def test_a_run_that_served_nothing_says_so(read):
    with pytest.raises(ValueError, match=r"no request was served \(1 rejected: needs 15 KV blocks"):
        read(all_rejected())  # eleven NaN figures, or an IndexError, before


def test_one_request_instead_of_a_list():
    (one,) = reqs([(4, 2, 0.0)])
    with pytest.raises(
        TypeError, match=r"requests is one serving.Request: pass a list.*\[request\]"
    ):
        serving.run(None, one, clock=lambda s: 1.0)


def test_a_live_arrival_beyond_an_hour_asks_about_milliseconds(tiny_llama):
    with pytest.raises(ValueError, match=r"arrives at 5000 s, over an hour.*in milliseconds\?"):
        serving.run(tiny_llama, reqs([(4, 2, 0.0), (4, 2, 5000.0)]))  # slept 5000 s before
    far = serving.run(None, reqs([(4, 2, 0.0), (4, 2, 5000.0)]), clock=lambda s: 1.0)
    assert far.finish_s.max() > 5000  # a virtual clock jumps: no question asked


def test_a_kv_budget_that_cannot_be_allocated_is_estimated_first(tiny_llama):
    with pytest.raises(ValueError, match=r"kv_blocks=100000000 needs .* of KV cache.*lower kv_bl"):
        serving.run(tiny_llama, reqs([(4, 2, 0.0)]), kv_blocks=10**8)  # allocator error before


def test_fit_step_time_given_the_request_table_names_the_step_log():
    df = serving.run(None, reqs(TWO), clock=lambda s: 1.0)
    with pytest.raises(TypeError, match=r"pass its step log, df.attrs\['steps'\]"):
        serving.fit_step_time(df)  # AttributeError before


@pytest.mark.parametrize("bad_id", [97, 200, -100])
def test_token_ids_outside_the_vocabulary_are_named(tiny_llama, bad_id):
    (r,) = reqs([(4, 2, 0.0)])
    ids = r.prompt_ids.clone()
    ids[1] = bad_id
    with pytest.raises(ValueError, match=rf"requests\[0\].prompt_ids holds token id {bad_id}, "
                                         r"outside the model's vocabulary 0…96"):  # fmt: skip
        serving.run(tiny_llama, [serving.Request(ids, 2)], clock=lambda s: 1.0)  # IndexError


def test_poisson_trace_with_the_default_vocabulary_and_a_small_model_is_caught(tiny_llama):
    trace = serving.poisson_trace(1.0, 2, scale=1 / 64)  # ids up to 49151
    with pytest.raises(ValueError, match=r"vocab=97"):
        serving.run(tiny_llama, trace, clock=lambda s: 1.0)
    assert max(int(r.prompt_ids.max()) for r in serving.poisson_trace(1.0, 5, vocab=50)) < 50


def test_greedy_decode_past_the_context_is_refused_as_serving_refuses_it(tiny_llama):
    ids = torch.zeros(1, 2040, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"2040 prompt \+ 20 new = 2060 positions; the model's con"
    ):
        greedy_decode(tiny_llama, ids, 20)  # decoded on before


# --- ceilings: written whole, read defensively ------------------------------------------------


def sample_ceilings():
    return roofline.Ceilings(device="cpu", matmul_flops={"fp32": 1e11, "bf16": 5e10},
                             read_bandwidth=2e10, copy_bandwidth=1e10, step_overhead_s=1e-3,
                             machine=roofline.machine_key(torch.device("cpu")))  # fmt: skip


def test_ceilings_are_written_whole_and_read_back(tmp_path):
    path = sample_ceilings().save(tmp_path / "c.json")
    assert roofline.Ceilings.load(path) == sample_ceilings()
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary left behind


def test_an_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = sample_ceilings().save(tmp_path / "c.json")
    before = path.read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(roofline.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_ceilings().save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["c.json"]


NEWER = '{"device": "cpu", "matmul_flops": {}, "read_bandwidth": 1, "copy_bandwidth": 1, "x": 3}'


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", r"cannot be read \(it is empty\)"),
        ('{"device": "cpu", "matmul_fl', r"cannot be read \("),  # half written
        (NEWER, r"was written by another version"),
        ('{"device": "cpu"}', r"was written by another version"),
        ("[1, 2]", r"was written by another version"),
    ],
)
def test_a_file_that_cannot_be_read_is_measured_again_saying_why(tmp_path, monkeypatch, capsys,
                                                                text, why):  # fmt: skip
    path = tmp_path / "ceilings_cpu_x.json"
    path.write_text(text)
    with pytest.raises(roofline.CeilingsFileError, match=why):
        roofline.Ceilings.load(path)  # JSONDecodeError or TypeError: unexpected keyword before
    monkeypatch.setattr(roofline, "saved_path", lambda device: path)
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device, preset: "frame")
    monkeypatch.setattr(roofline, "measure_overhead", lambda device: {})
    monkeypatch.setattr(roofline, "overhead_fields", lambda frames: {})
    rebuilt = classmethod(lambda cls, df, device, overhead: sample_ceilings())
    monkeypatch.setattr(roofline.Ceilings, "from_frame", rebuilt)
    got = roofline.load_or_measure(torch.device("cpu"), preset=None)
    assert got == sample_ceilings() and roofline.Ceilings.load(path) == got  # rebuilt, saved
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "measuring the ceilings again" in err


def test_peak_of_a_dtype_not_measured_names_the_measured_ones():
    with pytest.raises(
        ValueError, match=r"Unknown dtype 'int8' for these ceilings; measured: \['bf"
    ):
        sample_ceilings().peak("int8")  # KeyError before
    assert sample_ceilings().peak("BF16") == 5e10


# --- bench and device names ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "message"),
    [
        (torch.ones(3), {}, TypeError, r"fn must be a function to time, got Tensor: pass e.g. lam"),
        (lambda: None, {"device": "gpu"}, ValueError, r"Unknown device 'gpu'.*\(a GPU is 'cuda'"),
        (lambda: None, {"repeats": 2.5}, TypeError, "repeats must be a whole number, got 2.5"),
        (lambda: None, {"warmup": -1}, ValueError, "warmup must be at least 0, got -1"),
        (lambda: None, {"before_each": 3}, TypeError, "before_each must be a function or None"),
    ],
)
def test_measure_names_what_it_cannot_time(fn, kwargs, error, message):
    with pytest.raises(error, match=message):
        bench.measure(fn, **kwargs)


def test_measure_takes_device_names_as_users_write_them():
    assert bench.measure(lambda: None, device=" CPU ", repeats=3.0).samples.__len__() == 3


# --- the model cache and loader ---------------------------------------------------------


def test_course_cache_with_a_tilde_or_relative_path_is_expanded_and_printed(tmp_path, monkeypatch,
                                                                            capsys):  # fmt: skip
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(models.CACHE_ENV, "~/.cache/llm-serving-course")  # as %env sets it
    assert models.cache_dir() == tmp_path / ".cache" / "llm-serving-course"  # ./~/.cache before
    assert f"resolves to {tmp_path / '.cache' / 'llm-serving-course'}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(models.CACHE_ENV, "cache-here")
    assert models.offline_dir() == tmp_path / "cache-here" / models.OFFLINE_NAME
    models.cache_dir()
    assert capsys.readouterr().err.count("resolves to") == 1  # once per value, not per call


def test_an_interrupted_conversion_is_cleaned_on_the_next_start(tmp_path, monkeypatch, capsys):
    target = tmp_path / models.OFFLINE_NAME
    leftover = tmp_path / f"{models.OFFLINE_NAME}.tmp-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(models, "verify_offline", lambda folder: "")  # the cache itself is fine
    assert models._prepare_in_subprocess(target) == target
    assert not leftover.exists()  # stayed until the next conversion before
    assert "Removed 1 temporary folder(s)" in capsys.readouterr().err


def test_a_cuda_model_without_a_gpu_gets_pick_devices_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA was requested but torch sees no CUDA GPU"):
        models.load_smollm2(device="cuda", source="random")  # AssertionError: not compiled before
    with pytest.raises(RuntimeError, match="CUDA was requested"):
        models.llama_from_config("smollm2-135m", device="CUDA")


# --- tensor-parallel ranks never outlive the kernel that launched them -------------------------

SLOW_WORKER = """
import pathlib, time
def run(rank, world, folder):
    pathlib.Path(folder, f"rank{rank}").write_text("running")
    time.sleep(120)
"""


def rank_processes(parent: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [c for c in parent.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    return []


def gone(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.status() == psutil.STATUS_ZOMBIE
    return True


@pytest.mark.parametrize("when", ["starting", "running"])
def test_ranks_end_when_the_launching_kernel_is_killed(tmp_path, when):
    (tmp_path / "slow_worker.py").write_text(SLOW_WORKER)
    script = (
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(tmp_path)!r}]\n"
        "import slow_worker\nfrom helpers import tp\n"
        f"tp.launch(slow_worker.run, 2, {str(tmp_path)!r}, backend='gloo', timeout=170)\n"
    )
    kernel = subprocess.Popen([sys.executable, "-c", script])
    parent, ranks = psutil.Process(kernel.pid), []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ranks = rank_processes(parent) or ranks
            started = len(list(tmp_path.glob("rank*"))) == 2
            if len(ranks) == 2 and (when == "starting" or started):
                break
            time.sleep(0.02)
        assert len(ranks) == 2, "the ranks did not start"
        kernel.kill()  # as a kernel restart or the OOM killer would, mid-launch
        kernel.wait()
        end = time.monotonic() + 15
        while time.monotonic() < end and not all(gone(r) for r in ranks):
            time.sleep(0.1)
        assert all(gone(r) for r in ranks), f"orphaned ranks outlived the kernel ({when})"
    finally:
        for r in ranks:
            with contextlib.suppress(psutil.Error):
                r.kill()
        kernel.kill()


# --- issue 22's findings in memory and exercises ----------------------------------------------


def test_a_trial_that_returns_false_is_refused_not_read_as_a_fit():
    from helpers import memory

    with pytest.raises(TypeError, match="signals 'does not fit' by raising"):
        memory.largest_fitting(lambda n: n < 10, limit=64)
    assert memory.largest_fitting(lambda n: None, limit=8).largest == 8


def test_weight_bytes_of_a_loaded_wrapper_names_its_model():
    from types import SimpleNamespace

    from helpers import memory

    loaded = SimpleNamespace(model=torch.nn.Linear(4, 4), tokenizer=None)
    with pytest.raises(TypeError, match=r"pass its \.model"):
        memory.weight_bytes(loaded)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        memory.param_count("smollm2")


@pytest.mark.parametrize("bad", ["42", [42], np.array([1.0, 2.0]), torch.ones(3), True])
def test_check_refuses_what_is_not_one_number_in_one_line(bad):
    from helpers.exercises import check

    with pytest.raises(TypeError, match="the answer must be one number"):
        check("floor (ms)", bad, 12.0)


def test_check_takes_a_one_element_array_or_tensor():
    from helpers.exercises import check

    assert check("floor (ms)", np.array([12.0]), 12.0)
    assert check("floor (ms)", torch.tensor(12.0), 12.0)
