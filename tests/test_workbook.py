"""Exercises with hidden answers (issue 19): every exercise in the bank fails with None and with a
wrong answer, passes with its solution, and never prints its expected value on a miss."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

from helpers import exercises, workbook

ROOT = Path(__file__).resolve().parent.parent

# Planted notebook numbers and their known answers, worked out by hand (not by the bank's code).
COMPUTE = {
    # 135e6 parameters × 2 bytes ÷ 20 GB/s = 13.5 ms
    "00.bf16-floor": (dict(params=135e6, bandwidth=20e9), 13.5),
}
PREDICT = {"00.matmuls-batch-4": (dict(measured=12.0), 12.0)}


def right_critical_batch(peak_flops, bandwidth, bytes_per_weight):
    return peak_flops * bytes_per_weight / (2 * bandwidth)


def wrong_critical_batch(peak_flops, bandwidth, bytes_per_weight):
    return peak_flops / bandwidth  # forgets bytes per weight and the 2 FLOPs


DERIVE = {"00.critical-batch": (right_critical_batch, wrong_critical_batch)}


def test_every_exercise_has_a_known_answer_here():
    """Notebook 00's exercises are tested in this file; each other notebook's in
    tests/test_workbook_NN.py, which lists the keys it tests in TESTED."""
    tested = set(COMPUTE) | set(PREDICT) | set(DERIVE) | set(INVESTIGATE)
    for path in sorted(Path(__file__).parent.glob("test_workbook_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tested |= set(module.TESTED)
    missing = set(exercises.BANK) - tested
    assert not missing, f"add known answers for {sorted(missing)} to tests/test_workbook_NN.py"
    assert tested <= set(exercises.BANK), (
        f"tested but not in the bank: {tested - set(exercises.BANK)}"
    )


@pytest.mark.parametrize("key", sorted(COMPUTE))
def test_compute_exercises(key, capsys):
    given, known = COMPUTE[key]
    assert not workbook.answer(key, None, **given)
    assert not workbook.answer(key, known * 1.5, **given)
    out = capsys.readouterr().out
    assert f"{known:.4g}" not in out and "Hint:" in out  # a hint, never the answer
    assert workbook.answer(key, known, **given) is True  # a plain bool, shown as True


def test_a_unit_slip_is_named_in_the_hint(capsys):
    given, known = COMPUTE["00.bf16-floor"]
    assert not workbook.answer("00.bf16-floor", known / 1e3, **given)  # seconds, not ms
    assert "unit prefix" in capsys.readouterr().out


@pytest.mark.parametrize("key", sorted(PREDICT))
def test_predict_exercises(key):
    given, known = PREDICT[key]
    assert not workbook.predict(key, None, **given)
    assert not workbook.predict(key, known * 2, **given)
    assert workbook.predict(key, known * 1.2, **given)  # inside the stated ±25 %


def test_a_prediction_passes_inside_the_measured_spread():
    assert not workbook.predict("00.matmuls-batch-4", 16.0, measured=12.0)
    assert workbook.predict("00.matmuls-batch-4", 16.0, measured=12.0, spread=0.4)


def test_a_prediction_against_a_failed_measurement_is_refused():
    with pytest.raises(ValueError, match="rerun"):
        workbook.predict("00.matmuls-batch-4", 1.0, measured=float("nan"))


@pytest.mark.parametrize("key", sorted(DERIVE))
def test_derive_exercises(key, capsys):
    right, wrong = DERIVE[key]
    assert not workbook.derive(key, None)
    assert not workbook.derive(key, wrong)
    assert not workbook.derive(key, lambda **kw: 1 / 0)  # a crash is reported, not raised
    assert "raised" in capsys.readouterr().out
    assert not workbook.derive(key, lambda **kw: None)  # the exercise's stub, untouched
    assert "returns None" in capsys.readouterr().out
    assert workbook.derive(key, right)
    with pytest.raises(TypeError, match="the function itself"):
        workbook.derive(key, right(1e12, 1e9, 2))


def layer_result(per_layer_s, layers=(1, 8, 16, 30), fixed_s=1e-3):
    steps = [fixed_s + per_layer_s * n for n in layers]
    return {"layers": list(layers), "step_s": steps, "per_layer_s": per_layer_s}


INVESTIGATE = {"00.per-layer-cost": (layer_result(100e-6), dict(notebook_slope_s=110e-6))}


def test_investigate_per_layer_cost():
    result, given = INVESTIGATE["00.per-layer-cost"]
    key = "00.per-layer-cost"
    assert not workbook.investigate(key, None, **given)
    assert not workbook.investigate(key, layer_result(100e-6, layers=(1, 2, 3)), **given)
    assert not workbook.investigate(key, {**result, "per_layer_s": 50e-6}, **given)  # not the slope
    assert not workbook.investigate(key, layer_result(400e-6), **given)  # 4× the notebook's fit
    assert workbook.investigate(key, result, **given)


def test_wrong_kind_and_unknown_key_name_the_fix():
    with pytest.raises(ValueError, match="exercises.derive"):
        workbook.answer("00.critical-batch", 1.0)
    with pytest.raises(KeyError, match="00.bf16-floor"):
        workbook.answer("00.no-such", 1.0)
    with pytest.raises(TypeError, match="one number"):
        workbook.answer("00.bf16-floor", "13.5", params=1, bandwidth=1)


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_handout_leaves_out_solutions_and_keeps_the_exercises():
    handout = load_tool("handout")
    path = sorted(handout.ROOT.glob("notebooks/00_*.ipynb"))[0]
    notebook = nbformat.read(path, as_version=4)
    copy = handout.handout(notebook)
    assert any(handout.is_solution(c) for c in notebook.cells)
    assert not any(handout.is_solution(c) for c in copy.cells)
    assert "workbook.answer" in "\n".join(c.source for c in copy.cells)  # exercises stay
    assert len(notebook.cells) > len(copy.cells)  # the original is unchanged


def test_published_pages_open_with_the_machine_and_date(tmp_path):
    publish = load_tool("publish_executed")
    page = tmp_path / "00_x.html"
    page.write_text("<html><head></head><body class='jp'>numbers</body></html>")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    text = publish.publish(page, out_dir, "Test CPU, 2 cores").read_text()
    assert text.index("Test CPU, 2 cores") > text.index("<body class='jp'>")
    assert text.index("Executed on") < text.index("numbers")
    with pytest.raises(ValueError, match="nbconvert"):
        page.write_text("no body")
        publish.publish(page, out_dir, "x")


@pytest.mark.parametrize(
    "bad", ["13.5", [13.5], (13.5,), {"ms": 13.5}, "np-pair", "tensor-pair"], ids=repr
)
def test_an_answer_that_is_not_one_number_names_the_expected_type(bad):
    import numpy as np
    import torch

    bad = {"np-pair": np.array([13.5, 1.0]), "tensor-pair": torch.tensor([13.5, 1.0])}.get(
        bad if isinstance(bad, str) else "", bad
    )
    given, _ = COMPUTE["00.bf16-floor"]
    named = r"must be one number \(in the unit the question names\), got "
    with pytest.raises(TypeError, match=named) as raised:
        workbook.answer("00.bf16-floor", bad, **given)
    assert "\n" not in str(raised.value)  # one line


def test_one_number_in_an_array_or_tensor_is_accepted():
    import numpy as np
    import torch

    given, known = COMPUTE["00.bf16-floor"]
    for value in (np.float64(known), np.array([known]), torch.tensor(known)):
        assert workbook.answer("00.bf16-floor", value, **given) is True
