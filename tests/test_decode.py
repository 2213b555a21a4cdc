import pytest
import torch

from helpers import decode


def hf_greedy(model, ids, n, eos=None):
    out = model.generate(
        ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
        eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
    )  # fmt: skip
    return out[:, ids.shape[1] :]


def test_forward_matches_the_model(tiny_llama):
    ids = torch.randint(0, 97, (2, 7))
    cache = decode.KVCache(tiny_llama.config, 2, 10, torch.float32, "cpu")
    ours = decode.forward(tiny_llama, ids, cache, 0)
    torch.testing.assert_close(ours, tiny_llama(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_equal_generate_on_random_llama(tiny_llama, batch):
    ids = torch.randint(0, 97, (batch, 5), generator=torch.Generator().manual_seed(batch))
    ours = decode.greedy_decode(tiny_llama, ids, 12)
    assert torch.equal(ours.tokens, hf_greedy(tiny_llama, ids, 12))
    assert ours.tokens.shape == (batch, 12) and len(ours.step_s) == 11


@pytest.mark.parametrize(
    "prompts",
    [["The capital of France is"], ["def fibonacci(n):"], ["Once upon a time"] * 2],
)
def test_tokens_equal_generate_on_smollm2(smollm2, prompts):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok(prompts, return_tensors="pt").input_ids
    ours = decode.greedy_decode(model, ids, 40, eos_token_id=tok.eos_token_id)
    assert torch.equal(ours.tokens, hf_greedy(model, ids, 40, eos=tok.eos_token_id))


def test_last_position_logits_only(tiny_llama):
    ids = torch.randint(0, 97, (2, 6))
    full = decode.forward(
        tiny_llama, ids, decode.KVCache(tiny_llama.config, 2, 6, torch.float32, "cpu"), 0
    )
    last = decode.forward(
        tiny_llama,
        ids,
        decode.KVCache(tiny_llama.config, 2, 6, torch.float32, "cpu"),
        0,
        all_logits=False,
    )
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-5)


def test_kv_cache_size_is_the_formula(tiny_llama):
    # 2 (K and V) · layers · batch · length · kv_heads · head_dim · bytes
    cache = decode.KVCache(
        tiny_llama.config, batch=3, max_len=11, dtype=torch.float16, device="cpu"
    )
    assert cache.nbytes == 2 * 2 * 3 * 11 * 2 * 16 * 2


def test_timings_are_reported(tiny_llama):
    ticks = iter(range(1000)).__next__  # every clock reading is 1 s after the last
    gen = decode.greedy_decode(tiny_llama, torch.zeros(1, 4, dtype=torch.long), 5, clock=ticks)
    assert gen.ttft_s == 1 and gen.step_s == [1, 1, 1, 1]
    assert gen.tpot_s == 1 and gen.latency_s == 5 and gen.tokens_per_s == 1
    assert gen.row()["new_tokens"] == 5


def test_bad_input():
    with pytest.raises(TypeError, match="Llama-architecture"):
        decode.greedy_decode(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="new_tokens"):
        decode.greedy_decode(None, torch.zeros(1, 2, dtype=torch.long), 0)
