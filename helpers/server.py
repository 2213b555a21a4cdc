"""A real serving engine from a notebook: start it, wait until it is healthy, read its metrics,
stop it and every process it started.

    from helpers import server
    with server.start() as srv:          # vLLM on the course's SmolLM2 (CPU build without a GPU)
        loadgen.run(jobs, srv.url, srv.model)
        srv.metrics()["vllm:num_requests_running"]

vLLM lives in its own environment, `.venv-vllm` (`make vllm`), and runs as a subprocess of a
small *guard* process with its own process group and log file (`build/server/<port>.log`). The
guard watches the notebook's kernel: when the kernel dies (even by SIGKILL) it kills the whole
group, so no server outlives the kernel; `stop()` (also at interpreter exit) does the same at once.
`COURSE_SERVER_URL=http://host:port` points at a server already running instead (SGLang, TGI,
llama.cpp's `llama-server`, a remote vLLM): nothing is started or stopped then.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil

from helpers import BUILD_DIR, checks, loadgen, models
from helpers.server_metrics import (  # noqa: F401 (re-exported: server.parse_metrics, ...)
    GAUGES,
    SERVER_TIMES,
    MetricsSampler,
    info_labels,
    parse_metrics,
    window,
)
from helpers.vllm_flags import (  # noqa: F401 (re-exported: server.serve_command in notebooks)
    GPUS_PER_NODE,
    VLLM_CHECKPOINTS,
    VLLM_DTYPES,
    VLLM_KV_DTYPES,
    VLLM_QUANTIZATION,
    serve_command,
    serve_flags,
)

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
URL_ENV = "COURSE_SERVER_URL"
STORED_ENV = "COURSE_SERVER_STORED"
MAKE_TARGET = "make vllm"
# What a vLLM-CPU server on SmolLM2 holds (API server + engine core + worker, measured ~4.1 GiB
# with a 1 GiB KV cache): `start` refuses to begin with less free memory than this.
NEEDS_BYTES = int(4.5 * 2**30)
LOG_LINES = 12  # log lines an error shows
OOM_SIGNS = (
    "out of memory",
    "outofmemory",
    "cannot allocate memory",
    "memoryerror",
    "insufficient memory",
    "not enough memory",
)

# The guard: leader of its own process group, killed by the kernel if the notebook's kernel dies
# (PR_SET_PDEATHSIG), and a thread that checks the parent every second as a second line; it runs
# the server as its child (same group) and kills the group when the parent is gone.
_GUARD = """
import ctypes, os, signal, subprocess, sys, threading, time
parent = int(sys.argv[1])
try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
def kill_group(*_):
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, kill_group)
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    kill_group()
if os.getppid() != parent:
    sys.exit(1)
threading.Thread(target=watch, daemon=True).start()
code = subprocess.call(sys.argv[2:])
sys.exit(128 - code if code < 0 else code)  # killed by signal N: 128 + N, as a shell says
"""


class ServerError(RuntimeError):
    """The server cannot start or stopped: the message says why and what to do."""


@dataclass
class Server:
    """A running server: `url`, the `model` name it serves, its process (None for an outside
    server given by COURSE_SERVER_URL), its log file and how long it took to become healthy."""

    url: str
    model: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    start_s: float = float("nan")
    command: list[str] = field(default_factory=list)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the server and every process it started: SIGTERM, then SIGKILL after `grace_s`."""
        proc = self.process
        if proc is None or proc.returncode is not None and not group_alive(proc.pid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)  # the guard kills its group at once
        deadline = time.monotonic() + grace_s
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def check_alive(self) -> None:
        """One line if the server has died (out of memory said so when the log or signal does)."""
        if not self.alive():
            raise ServerError(_death(self, "while running"))

    def log_tail(self, lines: int = LOG_LINES) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of the server's processes together (0 for an outside server)."""
        if self.process is None:
            return 0
        return sum(p.memory_info().rss for p in group_processes(self.process.pid))

    def cache_config(self) -> dict[str, str]:
        """vLLM's cache settings as it reports them (`vllm:cache_config_info`'s labels:
        block_size, enable_prefix_caching, cache_dtype, …); {} for another engine."""
        return info_labels(
            httpx.get(f"{self.url}/metrics", timeout=5).text, "vllm:cache_config_info"
        )

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus /metrics, each name summed over its label sets."""
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=5).text)


def group_processes(pgid: int) -> list[psutil.Process]:
    """Live processes of process group `pgid` (zombies left out)."""
    found = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def group_alive(pgid: int) -> bool:
    return bool(group_processes(pgid))


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(
    model_dir: Path | str, port: int, dtype: str = "float32", max_model_len: int = 2048, args=()
) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server from .venv-vllm (`python -m`:
    the CPU build's `vllm` script looks for a distribution named `vllm` and fails). `args` that
    set --dtype or --max-model-len themselves (`serve_flags`) replace those defaults."""
    args = [str(a) for a in args]
    defaults = [
        *([] if "--dtype" in args else ["--dtype", dtype]),
        *([] if "--max-model-len" in args else ["--max-model-len", str(max_model_len)]),
    ]
    return [
        str(VENV / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        *defaults,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


def outside() -> Server | None:
    """The server named by $COURSE_SERVER_URL (checked to answer), or None when it is unset."""
    url = os.environ.get(URL_ENV, "").strip().rstrip("/").removesuffix("/v1")
    if not url:
        return None
    try:
        served = httpx.get(f"{url}/v1/models", timeout=3).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        raise ServerError(
            f"{URL_ENV}={url} does not answer on /v1/models ({type(err).__name__}): "
            f"start that server, or unset {URL_ENV} to start vLLM here"
        ) from None
    return Server(url=url, model=served[0]["id"])


def installed() -> bool:
    """Whether `make vllm` finished: its stamp, not the interpreter (a half-built environment
    has bin/python but no vllm)."""
    return (VENV / ".installed").exists()


def unavailable() -> str:
    """Why no server can be had here ("" when one can): the reason names the fix.
    $COURSE_SERVER_STORED=1 asks for the stored measurements even where a server could run."""
    if os.environ.get(STORED_ENV, "").strip() == "1":
        return f"{STORED_ENV}=1 asks for the stored measurements"
    if os.environ.get(URL_ENV, "").strip():
        return ""
    if not installed():
        return f"vLLM is not installed here (`{MAKE_TARGET}` builds {VENV.name})"
    if (free := psutil.virtual_memory().available) < NEEDS_BYTES:
        return (
            f"a vLLM server needs about {NEEDS_BYTES / 2**30:.1f} GiB free and this machine "
            f"has {free / 2**30:.1f} GiB"
        )
    return ""


def start(
    model_dir: Path | str | None = None,
    port: int | None = None,
    args=(),
    timeout_s: float = 600.0,
    kv_cache_gib: int = 1,
    dtype: str = "float32",
    command: list[str] | None = None,
    health_path: str = "/health",
) -> Server:
    """Start a server (vLLM on the course's SmolLM2 unless `command` is given, with `{port}` in
    it) and wait until `health_path` answers 200, at most `timeout_s`. $COURSE_SERVER_URL, when
    set, is used instead. `args` are extra vLLM flags, e.g. ("--max-num-seqs", 4); `dtype` is
    vLLM's name ("float32" on a CPU; "float16" on a T4, "bfloat16" from Ampere on);
    `kv_cache_gib` sizes a CPU build's KV cache (a GPU build takes --gpu-memory-utilization)."""
    if (srv := outside()) is not None:
        return srv
    timeout_s = checks.positive("timeout_s", timeout_s)
    port = checked_port(port)
    if command is None:
        check_installed()
        model_dir = Path(model_dir) if model_dir else models.prepare_offline()
        command = vllm_command(model_dir, port, dtype=dtype, args=args)
    else:
        command = [str(c).replace("{port}", str(port)) for c in command]
    check_memory()
    srv = launch(command, port, str(model_dir or "server"), kv_cache_gib)
    try:
        srv.start_s = _wait_healthy(srv, health_path, timeout_s)
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            srv.model = httpx.get(f"{srv.url}/v1/models", timeout=5).json()["data"][0]["id"]
    except BaseException:
        srv.stop()
        raise
    return srv


def checked_port(port: int | None) -> int:
    """`port`, or a free one when None; one line when it is taken."""
    port = free_port() if port is None else checks.whole("port", port)
    if not port_free(port):
        raise ServerError(
            f"port {port} is in use (another server, or one left running): "
            "stop it, or call start(port=None) for a free port"
        )
    return port


def check_installed() -> None:
    if not installed():
        raise ServerError(
            f"vLLM is not installed (or its install did not finish): run `{MAKE_TARGET}` "
            f"(it builds {VENV.name}), "
            f"or set {URL_ENV} to a running OpenAI-compatible server"
        )


def check_memory() -> None:
    if (free := psutil.virtual_memory().available) < NEEDS_BYTES:
        raise ServerError(
            f"the server needs about {NEEDS_BYTES / 2**30:.1f} GiB free and this "
            f"machine has {free / 2**30:.1f} GiB: use the stored measurements, or "
            f"{URL_ENV} for a server elsewhere"
        )


def launch(command: list[str], port: int, model: str, kv_cache_gib: int) -> Server:
    """Run `command` under the guard (its own process group, its log in build/server/)."""
    log_path = BUILD_DIR / "server" / f"{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # VLLM_USE_AOT_COMPILE=0: vLLM 0.32's saved AOT graphs fail to load under torch 2.13 ("no
    # attribute 'finalize_loading'"), so every start compiled again; the inductor cache loads.
    # COURSE_SERVER_PROCESS marks its processes: tools/run_notebooks.py counts their memory apart.
    env = {
        "VLLM_USE_AOT_COMPILE": "0",
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "PYTHONUNBUFFERED": "1",
        "COURSE_SERVER_PROCESS": "1",
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _GUARD, str(os.getpid()), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    srv = Server(f"http://127.0.0.1:{port}", model, proc, log_path, command=command)
    atexit.register(srv.stop)
    return srv


def _wait_healthy(srv: Server, health_path: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if srv.process.poll() is not None:
            raise ServerError(_death(srv, "during start"))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{srv.url}{health_path}", timeout=2).status_code == 200:
                return time.monotonic() - t0
        time.sleep(1.0)
    raise ServerError(
        f"the server was not healthy after {timeout_s:.0f} s (a cold compile on a "
        f"busy CPU is slow: raise timeout_s). Last log lines of {srv.log_path}:\n" + srv.log_tail()
    )


def _death(srv: Server, when: str) -> str:
    code, tail = srv.process.returncode, srv.log_tail()
    oom = code in (-signal.SIGKILL, 128 + signal.SIGKILL) or any(
        s in tail.lower() for s in OOM_SIGNS
    )
    if oom:
        return (
            f"the server ran out of memory {when} (exit {code}): it needs about "
            f"{NEEDS_BYTES / 2**30:.1f} GiB; free memory, lower --max-model-len or the KV "
            f"cache (kv_cache_gib), or use {URL_ENV}. Last log lines:\n{tail}"
        )
    return f"the server died {when} (exit code {code}). Last log lines of {srv.log_path}:\n{tail}"


# --- Measuring a load against the server --------------------------------


def measure(
    srv: Server,
    jobs,
    concurrency: int | None = None,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    **run_kwargs,
) -> tuple[dict, pd.DataFrame]:
    """One benchmark point against `srv`: `loadgen.run` (no warm-up: warm the server first)
    with /metrics sampled meanwhile. Returns (one row: the client's summary, the client's mean
    TTFT and ITL, the server's own means over the same window, the gauges' mean and peak,
    and the per-request table)."""
    before = srv.metrics()
    with MetricsSampler(srv.url) as sampler:
        df = loadgen.run(
            jobs,
            srv.url,
            srv.model,
            concurrency=concurrency,
            warmup=0,
            progress=False,
            **run_kwargs,
        )
    srv.check_alive()
    row = {"concurrency": concurrency, **loadgen.summary(df, slo_ttft_s, slo_tpot_s)}
    ok = df[df.error == ""]
    row["client_ttft_mean"] = float(ok.ttft_s.mean())
    row["client_itl_mean"] = float(np.concatenate([*ok.itl_s, np.empty(0)]).mean())
    row["client_latency_mean"] = float(ok.latency_s.mean())
    row.update(window(before, srv.metrics()))
    gauges = sampler.frame()
    for name in GAUGES:
        short = name.removeprefix("vllm:")
        row[f"{short}_mean"], row[f"{short}_max"] = gauges[name].mean(), gauges[name].max()
    return row, df


def refusal(log: str) -> str:
    """The one line in which a server that died says why (its last `...Error: ...` line), or the
    last non-empty log line where none names an error."""
    errors = re.findall(r"^.*?(\w+(?:Error|Exception): .+)$", log, flags=re.MULTILINE)
    lines = [line for line in log.splitlines() if line.strip()]
    return (errors[-1] if errors else lines[-1] if lines else "").strip()


def kv_cache_tokens(log: str) -> float:
    """The KV-cache size vLLM reports in its start log ("KV cache size: 23,296 tokens"); NaN if
    the log has no such line (another engine, or an outside server)."""
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    return float(found[-1].replace(",", "")) if found else float("nan")


def provenance(srv: Server, cpu: str) -> dict[str, str | float]:
    """Columns that say where a stored measurement came from: the machine, the engine and its
    version, the date, and the load average (another program busy on the cores skews it)."""
    versions = sorted(p.name for p in VENV.glob("lib/python*/site-packages/vllm*.dist-info"))
    engine = versions[0].removesuffix(".dist-info").replace("-", " ", 1) if versions else "?"
    load = os.getloadavg()[0]
    busy = "contended" if load > (os.cpu_count() or 1) else "idle"
    return {
        "machine": f"{cpu} ({os.cpu_count()} cores)",
        "engine": engine,
        "date": time.strftime("%Y-%m-%d"),
        "load_avg_1m": round(load, 2),
        "source": f"notebook 06 against {srv.url} ({busy}: load average {load:.1f})",
    }
