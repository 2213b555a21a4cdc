"""deploy.serve (the scheduler on the planner's clock), its published check rows, the engine
presets' host costs, and the `vllm serve` command."""

import json

import pytest

from helpers import deploy, planner, shapes


def test_one_stream_costs_the_planners_prefill_then_its_decode_steps():
    args = dict(model="llama-3-8b", gpu="h100-sxm", dtype="bf16", tp=1)
    s = deploy.serve(**args, input_tokens=256, output_tokens=32, concurrency=1, engine="vllm")
    spec = planner.gpu_spec("h100-sxm", "vllm")
    prefill = planner.step_seconds(**{**args, "gpu": spec}, batch=1, tokens=256, context=256)
    assert s.ttft_mean_s == pytest.approx(prefill, rel=1e-9)  # one chunk: the whole prompt
    decode = [planner.step_seconds(**{**args, "gpu": spec}, batch=1, tokens=1, context=c)
              for c in range(257, 257 + 31)]  # fmt: skip
    assert s.tpot_mean_s == pytest.approx(sum(decode) / 31, rel=1e-9)
    assert s.tokens_per_s == pytest.approx(32 / s.latency_mean_s, rel=1e-6)


def test_the_host_cost_adds_once_per_step():
    args = dict(model="llama-3-8b", gpu="h100-sxm", dtype="bf16", input_tokens=64,
                output_tokens=16, concurrency=4)  # fmt: skip
    slow, fast = deploy.serve(**args, engine="vllm-0.5"), deploy.serve(**args, engine="vllm")
    extra = planner.engines()["vllm-0.5"].step_s - planner.engines()["vllm"].step_s
    assert slow.tpot_mean_s - fast.tpot_mean_s == pytest.approx(extra, rel=1e-6)


def test_a_closed_loop_never_runs_more_than_its_concurrency_and_a_rate_queues():
    args = dict(model="llama-3-8b", gpu="h100-sxm", dtype="bf16", input_tokens=128,
                output_tokens=64)  # fmt: skip
    closed = deploy.serve(**args, concurrency=3)
    assert closed.max_num_seqs == 3
    light = deploy.serve(**args, rate=1.0, requests=40)
    heavy = deploy.serve(**args, rate=1e4, requests=40, max_num_seqs=4)
    assert heavy.ttft_p99_s > 5 * light.ttft_p99_s  # arrivals wait for one of 4 seats


def test_bad_input_gets_one_line_naming_the_fix():
    args = dict(model="llama-3-8b", gpu="h100-sxm", dtype="bf16", input_tokens=8, output_tokens=8)
    with pytest.raises(ValueError, match="one of concurrency"):
        deploy.serve(**args)
    with pytest.raises(ValueError, match="one of concurrency"):
        deploy.serve(**args, concurrency=2, rate=1.0)
    with pytest.raises(ValueError, match="rate"):
        deploy.serve(**args, rate=0)
    with pytest.raises(ValueError, match="engine"):
        deploy.serve(**args, concurrency=1, engine="nope")
    with pytest.raises(ValueError, match="waits in the server's queue"):
        deploy.serve(**args, concurrency=8, max_num_seqs=4)
    with pytest.raises(ValueError, match="no room for a KV cache"):
        deploy.serve(**{**args, "model": "llama-3-70b", "gpu": "rtx-4090"}, concurrency=1)


def test_any_config_json_is_a_model(tmp_path):
    config = {**shapes.ARCHITECTURES["qwen2.5-7b"], "model_type": "qwen2", "head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = shapes.shape_from_config_file(tmp_path)
    assert shape == shapes.Shape.of("qwen2.5-7b")
    assert 7.6e9 < shape.params < 7.7e9  # Qwen2.5-7B's model card: 7.61B
    s = deploy.serve(model=config, gpu="l40s", dtype="bf16", input_tokens=64, output_tokens=8,
                     concurrency=2)  # fmt: skip
    assert s.tpot_p50_s > 0
    with pytest.raises(FileNotFoundError, match="config.json"):
        shapes.shape_from_config_file(tmp_path / "missing")


def test_host_costs_come_from_their_published_rows():
    d = planner.derive_engines().set_index(["engine", "constant"]).value
    assert planner.engines()["vllm"].step_s == d["vllm", "step_s"]
    # vLLM 0.5.3's profile: the host ran (33 + 29) / 38 of a GPU step.
    gpu_step = d["vllm-0.5", "step_s"] * 0.38 / 0.62
    floor = shapes.Shape.of("llama-3-8b").linear_params * 2 / (3350e9 * planner.MEMORY_EFFICIENCY)
    assert gpu_step == pytest.approx(floor + 32 * planner.engines()["production"].layer_s)
    assert 0 < d["vllm", "step_s"] < d["vllm-0.5", "step_s"]  # v0.6's fixes cut the host cost


VERSUS = deploy.versus_published()
# Check rows the prediction misses by more than 25 %, with what the miss shows; strict, so a row
# that starts to fit gets its note revisited.
KNOWN_MISSES = {
    ("nim-benchmarking", 5000, 50, "ttft_ms"): (
        "50 streams of 5,000-token prompts: the planner sums a prefill chunk's bytes and FLOPs "
        "(no overlap) and shares each 8,192-token step with 49 decodes, so TTFT comes out ~28 % "
        "high while ITL at the same point is within 4 %"
    ),
}


def _case(r):
    reason = KNOWN_MISSES.get((r.source, r.input, r.concurrency, r.metric))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(r, marks=marks, id=f"{r.source}-{r.model}-in{r.input}-c{r.concurrency}-"
                        f"{r.metric}")  # fmt: skip


@pytest.mark.parametrize("row", [_case(r) for r in VERSUS.itertuples()])
def test_published_serving_rows_within_25_percent(row):
    assert row.predicted == pytest.approx(row.published, rel=0.25)


def test_no_check_row_feeds_a_constant():
    t = planner.published_serving_runs()
    derived = " ".join(planner.derive_engines().derivation)
    assert "833.4 ms" in derived  # the calibration row
    for r in t[t.role == "check"].itertuples():
        assert f"{r.value:.1f} ms" not in derived, f"check row {r.source} {r.metric} was used"
    assert set(VERSUS.source) <= set(t[t.role == "check"].source)
