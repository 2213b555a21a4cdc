"""The process launcher: run a function on N ranks from a notebook, and never leave one behind.

`launch(fn, world_size, ...)` starts N fresh processes (spawn), joins them into one process group
(gloo on CPU, NCCL on GPUs) and returns each rank's result. A fresh process cannot import what a
notebook cell defined, so `launch` carries a function defined in the notebook (module `__main__`)
to the ranks as its source code, with the notebook's modules, functions and values it uses (see
`NotebookFunction`); functions in a module (like those in `helpers.tp_workers`) go by name.

The launcher watches every rank: the moment one raises, exits or is killed without a result, every
rank is stopped (with any processes it started) and the error says which rank, how it ended and
what usually causes that. A rank also ends by itself when the process that launched it dies.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import dis
import importlib
import inspect
import linecache
import os
import pickle
import signal
import socket
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import checks
from helpers.memory import peak_rss_bytes


class WorkerError(RuntimeError):
    pass


class Results(list):
    """What `launch` returns: each rank's result, in rank order, and what each rank measured."""

    def __init__(self, results, peaks):
        super().__init__(results)
        self.peak_rss_bytes: list[int] = list(peaks)  # each rank's peak resident memory


# the process-group backends a launch can use (not quant_backends.BACKENDS, which are quantizers)
COLLECTIVE_BACKENDS = ("gloo", "nccl")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_world(world_size: int, backend: str) -> tuple[int, str]:
    """(world_size, backend) checked: a whole number of ranks, a known backend, GPUs for NCCL."""
    world_size = checks.whole("world_size", world_size)
    backend = checks.choice("backend", backend, COLLECTIVE_BACKENDS)
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if world_size > gpus:
            raise ValueError(
                f"NCCL needs one GPU per rank: {world_size} ranks but {gpus} GPU(s). "
                f"Use world_size ≤ {gpus}, or backend='gloo' to run the ranks on the CPU."
            )
    return world_size, backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Functions written in a notebook cell ----------------------------------------------------


def _in_notebook(obj) -> bool:
    return getattr(obj, "__module__", None) == "__main__"


class NotebookFunction:
    """A function defined in a notebook (or any `__main__`), carried to other processes as source.

    Spawned ranks cannot import a notebook, so pickling such a function by name fails there
    ("Can't get attribute"). This keeps its source instead, with what its body uses from the
    notebook: modules (re-imported by name), other notebook functions (their source too) and
    plain values (pickled). `launch` wraps notebook functions in it by itself; call it directly
    to check early that a function can travel: `launch.NotebookFunction(my_worker)`.
    A function defined inside another function (a closure) or a class cannot travel this way:
    put it in a .py module instead.
    """

    def __init__(self, fn: Callable):
        self.name = getattr(fn, "__name__", repr(fn))
        self.sources: dict[str, str] = {}  # name → source, this function and those it calls
        self.modules: dict[str, str] = {}  # global name → module to import
        self.values: dict[str, object] = {}  # global name → pickled with this object
        self._collect(fn)

    def _collect(self, fn) -> None:
        fn = inspect.unwrap(fn)
        if not inspect.isfunction(fn) or fn.__name__ == "<lambda>":
            raise TypeError(
                f"{fn!r} defined in the notebook cannot be sent to other processes: write it "
                "as a `def` at the top level of a cell, or put it in a .py module"
            )
        if fn.__closure__:
            raise TypeError(
                f"{fn.__name__} is defined inside another function (it uses "
                f"{', '.join(fn.__code__.co_freevars)} from there): define it at the top level of "
                "a cell and pass those values as arguments to launch"
            )
        try:
            source = textwrap.dedent(inspect.getsource(fn))
        except (OSError, TypeError) as err:
            raise TypeError(
                f"the source of {fn.__name__} cannot be read ({err}), so it cannot be sent to "
                "the ranks: put it in a .py module and import it"
            ) from None
        self.sources[fn.__name__] = source
        for name in sorted(_global_names(fn.__code__) | _decorator_names(source)):
            if name not in fn.__globals__ or name in self.sources or name == fn.__name__:
                continue
            value = fn.__globals__[name]
            if inspect.ismodule(value):
                self.modules[name] = value.__name__
            elif inspect.isfunction(value) and _in_notebook(value):
                self._collect(value)
            elif _in_notebook(value):
                raise TypeError(
                    f"{self.name} uses {name}, a class (or instance) defined in the notebook, "
                    "which other processes cannot rebuild: put the class in a .py module"
                )
            else:
                try:
                    pickle.dumps(value)
                except Exception as err:
                    raise TypeError(
                        f"{self.name} uses the notebook variable {name!r}, which cannot be sent "
                        f"to other processes ({type(err).__name__}: {err}): pass what it needs "
                        "as an argument to launch, or create it inside the function"
                    ) from None
                self.values[name] = value

    def build(self) -> Callable:
        """Re-create the function in this process (what each rank does before calling it)."""
        namespace = {"__name__": "__notebook__", "__builtins__": __builtins__}
        namespace.update({k: importlib.import_module(m) for k, m in self.modules.items()})
        namespace.update(self.values)
        for name, source in self.sources.items():
            filename = f"<notebook: {name}>"  # so that tracebacks show the source lines
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            exec(compile(source, filename, "exec"), namespace)
        return namespace[self.name]

    def __call__(self, *args, **kwargs):
        return self.build()(*args, **kwargs)


def _global_names(code) -> set[str]:
    """Names the code (and code nested in it) reads as globals; attribute names are not."""
    loads = ("LOAD_GLOBAL", "LOAD_NAME")
    names = {i.argval for i in dis.get_instructions(code) if i.opname in loads}
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _global_names(const)
    return names


def _decorator_names(source: str) -> set[str]:
    tree = ast.parse(source)
    return {
        node.id
        for top in tree.body
        for decorator in getattr(top, "decorator_list", [])
        for node in ast.walk(decorator)
        if isinstance(node, ast.Name)
    }


# --- The launcher ---------------------------------------------------------------------------

_LOAD_HINT = (
    "Likely cause: the worker or one of its arguments is defined in the notebook (__main__), "
    "which a new process cannot import. Put it in a .py module, or write the worker as a plain "
    "`def` at the top level of a cell (launch sends such functions as source) and pass objects "
    "of notebook-defined classes as plain tensors or numbers."
)

_SIGNAL_CAUSES = {
    "SIGKILL": "most often the operating system's out-of-memory killer: use smaller sizes or "
    "fewer ranks (Binder and Colab have little memory)",
    "SIGSEGV": "a crash inside native code (a library or driver bug)",
    "SIGABRT": "a library aborted (its message is in the terminal that runs Jupyter)",
    "SIGBUS": "a memory-mapped file or shared memory ran out (e.g. a full /dev/shm)",
    "SIGTERM": "stopped from outside",
}


def _set_parent_death_signal() -> None:
    """Linux: have the kernel kill this process if the process that launched it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


# What a rank runs first, before it imports torch or this module (seconds on a busy machine):
# a kernel killed in those seconds would otherwise orphan its ranks, which run to the end. The
# spawned process unpickles its target by name, and `exec` (a builtin) imports nothing: so the
# rank takes its own process group, sets the parent-death signal, leaves at once if the parent
# is already gone, and starts a thread that checks the parent every second while it runs (where
# the signal does not exist, or was lost); only then does it import helpers.launch and run
# `_worker`.
_RANK_BOOT = """
import ctypes, os, signal, sys, threading, time
if hasattr(os, "setpgid"):
    os.setpgid(0, 0)
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
def _parent_gone():
    return os.getppid() != parent_pid
def _watch():
    while not _parent_gone():
        time.sleep(1.0)
    if hasattr(os, "killpg"):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(1)
if _parent_gone():
    os._exit(1)
threading.Thread(target=_watch, name="parent-watch", daemon=True).start()
from helpers.launch import _worker
_worker(*worker_args)
"""


def _worker(rank, world_size, port, backend, payload, conn) -> None:
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)  # a process group of its own: stopping the group stops what it started
    _set_parent_death_signal()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        fn, args = pickle.loads(payload)
        if isinstance(fn, NotebookFunction):
            fn = fn.build()
    except BaseException:
        conn.send(("error", f"{traceback.format_exc()}\n{_LOAD_HINT}"))
        return
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
        )
        result = fn(rank, world_size, *args)
        # plain pickle copies tensors into bytes (no shared memory outliving this process)
        message = ("ok", pickle.dumps((result, peak_rss_bytes())))
    except BaseException:
        message = ("error", traceback.format_exc())
    conn.send(message)
    conn.close()
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


class _RankEnded(Exception):
    def __init__(self, rank: int):
        self.rank = rank


def launch(fn: Callable, world_size: int, *args, backend: str | None = None, timeout: float = 180):
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return results by rank
    (a list, whose `.peak_rss_bytes` holds each rank's peak resident memory).

    `fn` may live in a module or in the notebook itself (sent as source: `NotebookFunction`).
    If a rank raises, exits or is killed, every rank (and whatever it started) is stopped at once
    and a `WorkerError` says which rank and how; `timeout` (s) bounds the whole run.
    """
    world_size, backend = check_world(world_size, backend or default_backend())
    timeout = checks.positive("timeout", timeout)
    if not callable(fn):
        raise TypeError(f"launch needs a function fn(rank, world_size, ...), got {fn!r}")
    if _in_notebook(fn) and not isinstance(fn, NotebookFunction):
        fn = NotebookFunction(fn)
    try:
        payload = pickle.dumps((fn, args))
    except Exception as err:
        raise TypeError(
            f"the worker or its arguments cannot be sent to other processes "
            f"({type(err).__name__}: {err}): pass tensors, numbers, strings and lists, and "
            "define the worker with `def` at the top level of a cell or in a .py module"
        ) from None
    procs = []
    try:
        return _run(procs, payload, world_size, backend, port=free_port(), timeout=timeout)
    except _RankEnded as ended:
        raise WorkerError(
            f"rank {ended.rank} of {world_size} {_how_it_ended(procs[ended.rank])}; "
            "every rank was stopped."
        ) from None


def _run(procs, payload, world_size, backend, port, timeout):
    ctx = mp.get_context("spawn")
    readers, finished = [], False
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            boot = {
                "parent_pid": os.getpid(),
                "worker_args": (rank, world_size, port, backend, payload, writer),
            }
            proc = ctx.Process(
                target=exec, name=f"tp-rank-{rank}", daemon=True, args=(_RANK_BOOT, boot)
            )
            procs.append(proc)
            readers.append(reader)
            proc.start()
            writer.close()  # this process keeps only the reading end: a dead rank reads as EOF
        out = _collect(procs, readers, timeout)
        finished = True
    finally:
        _stop(procs, wait_s=5 if finished else 0)
        for reader in readers:
            reader.close()
    ranks = range(world_size)
    return Results([out[r][0] for r in ranks], [out[r][1] for r in ranks])


def _collect(procs, readers, timeout: float) -> dict[int, tuple]:
    """Each rank's (result, peak RSS); raise as soon as one fails, ends without a result, or
    the time is up. Waits on the pipes and on the processes themselves, so nothing is missed."""
    world_size = len(procs)
    out, pending = {}, set(range(world_size))
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"ranks {sorted(pending)} of {world_size} did not finish within {timeout:.0f} s "
                "(a rank waiting in a collective that another rank never calls hangs like this); "
                "every rank was stopped"
            )
        ready = set(
            wait([readers[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=left)
        )
        for rank in sorted(pending):
            reader = readers[rank]
            if reader in ready or procs[rank].sentinel in ready:
                if not reader.poll():  # exited and wrote nothing
                    raise _RankEnded(rank)
                try:
                    status, value = reader.recv()
                except EOFError:
                    raise _RankEnded(rank) from None
                if status == "error":
                    raise WorkerError(f"rank {rank} of {world_size} failed:\n{value}")
                out[rank] = pickle.loads(value)
                pending.discard(rank)
    return out


def _stop(procs, wait_s: float = 0) -> None:
    """End every rank and every process it started (its process group), within ~2 s.

    Ranks that finished get `wait_s` to exit by themselves first. Each group is signalled before
    its leader is reaped, so its id cannot have been reused by an unrelated process.
    """
    deadline = time.monotonic() + wait_s
    running = [p.sentinel for p in procs if p.pid is not None]
    while running and (left := deadline - time.monotonic()) > 0:
        for sentinel in wait(running, timeout=left):
            running.remove(sentinel)
    for p in procs:
        if p.pid is None:
            continue
        if hasattr(os, "killpg"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        p.kill()  # a rank that had not yet made its own group
    for p in procs:
        if p.pid is not None:
            p.join(timeout=2)


def _how_it_ended(proc) -> str:
    code = proc.exitcode
    if code is None:
        return "closed its connection while still running"
    if code < 0:
        name = signal.Signals(-code).name
        cause = _SIGNAL_CAUSES.get(name, "a signal from outside")
        return f"was killed by {name} ({cause})"
    return (
        f"exited with code {code} without a result: the function called os._exit(), or the "
        "process crashed while starting (its output is in the terminal that runs Jupyter)"
    )
