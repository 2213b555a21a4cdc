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


def test_throughput_counts_prefill_and_the_whole_batch(tiny_llama):
    readings = iter([0, 3] + [t for s in range(3, 7) for t in (s, s + 1)]).__next__
    gen = decode.greedy_decode(tiny_llama, torch.zeros(2, 4, dtype=torch.long), 5, clock=readings)
    assert gen.ttft_s == 3 and gen.latency_s == 7  # 3 s of prefill, then 4 steps of 1 s
    assert gen.tokens_per_s == 2 * 5 / 7  # not batch ÷ TPOT (2 tokens/s)


def test_decode_one_token_equals_the_sliced_forward(tiny_llama):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    a = decode.KVCache(tiny_llama.config, 2, 9, torch.float32, "cpu")
    b = decode.KVCache(tiny_llama.config, 2, 9, torch.float32, "cpu")
    first = decode.prefill(tiny_llama, ids, a)
    decode.forward(tiny_llama, ids, b, 0)
    token = decode.decode_one_token(tiny_llama, first, a, torch.tensor([5]))
    reference = decode.forward(tiny_llama, first, b, 5)[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(token, reference)
    torch.testing.assert_close(a.keys[1][:, :, :6], b.keys[1][:, :, :6], rtol=0, atol=1e-6)


def test_compiled_tokens_equal_eager(tiny_llama):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    eager = decode.greedy_decode(tiny_llama, ids, 10)
    compiled = decode.greedy_decode(tiny_llama, ids, 10, compiled=True)
    assert compiled.mode == "compiled" and compiled.setup_s > 0
    assert torch.equal(eager.tokens, compiled.tokens)
    again = decode.greedy_decode(tiny_llama, ids, 10, compiled=True)
    assert again.setup_s < compiled.setup_s  # compiled once per shape, then reused


def test_compile_failure_falls_back_to_eager_and_says_so(tiny_llama, monkeypatch):
    def broken(model, cache):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(decode, "_compiled_step", broken)
    ids = torch.randint(0, 97, (1, 4))
    with pytest.warns(decode.CompileFallbackWarning, match="no C\\+\\+ compiler"):
        gen = decode.greedy_decode(tiny_llama, ids, 5, compiled=True)
    assert gen.mode.startswith("eager (compile failed")
    assert torch.equal(gen.tokens, decode.greedy_decode(tiny_llama, ids, 5).tokens)


def test_nan_weight_is_reported_not_decoded(tiny_llama):
    import copy

    broken = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        decode.greedy_decode(broken, torch.zeros(1, 3, dtype=torch.long), 4)


def test_one_token_has_defined_timings(tiny_llama):
    gen = decode.greedy_decode(tiny_llama, torch.zeros(2, 3, dtype=torch.long), 1)
    assert gen.step_s == [] and gen.tpot_s == 0.0
    assert gen.tokens_per_s == pytest.approx(2 / gen.ttft_s)
    assert gen.row()["tpot_q1_s"] == 0.0


def test_bad_input(tiny_llama):
    with pytest.raises(TypeError, match="Llama-architecture"):
        decode.greedy_decode(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="new_tokens"):
        decode.greedy_decode(None, torch.zeros(1, 2, dtype=torch.long), 0)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="whole number"):
        decode.greedy_decode(tiny_llama, ids, 2.5)
    with pytest.raises(ValueError, match="unsqueeze"):
        decode.greedy_decode(tiny_llama, ids[0], 2)
    with pytest.raises(TypeError, match="tensor of token ids"):
        decode.greedy_decode(tiny_llama, [[1, 2, 3]], 2)
    with pytest.raises(ValueError, match="empty"):
        decode.greedy_decode(tiny_llama, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least 2"):
        decode.generate_timing(tiny_llama, ids, 1)


def test_sweep_records_every_point_and_survives_out_of_memory(tiny_llama, monkeypatch):
    real = decode.greedy_decode

    def short_of_memory(model, ids, *args, **kwargs):
        if ids.shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(decode, "greedy_decode", short_of_memory)
    rows = decode.sweep(
        tiny_llama, prompts=[3, 5], batches=[1, 4, 2], new_tokens=4, labels={"dtype": "fp32"}
    )
    assert list(zip(rows.prompt, rows.batch, rows.oom, strict=True)) == [
        (3, 1, False), (3, 4, True), (3, 2, False), (5, 1, False), (5, 4, True), (5, 2, False)
    ]  # fmt: skip
    ok = rows[~rows.oom]
    assert (ok.new_tokens == 4).all() and (ok.dtype == "fp32").all()
    assert (ok.tokens_per_s == ok.batch * 4 / ok.latency_s).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotation_equals_transformers_bit_for_bit(tiny_llama, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(3, 5, 64).to(dtype)
    q, k = torch.randn(3, 4, 5, 16).to(dtype), torch.randn(3, 2, 5, 16).to(dtype)
    cos, sin = tiny_llama.model.rotary_emb(x, torch.arange(5).unsqueeze(0).expand(3, 5))
    cos, sin = cos.to(dtype), sin.to(dtype)
    tables = decode.rotary_tables(cos, sin)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(decode.rotate(q, *tables), expected_q)
    assert torch.equal(decode.rotate(k, *tables), expected_k)


def test_a_cpu_compile_says_so_before_it_starts_once_per_shape(tiny_llama, capsys):
    ids = torch.zeros(1, 3, dtype=torch.long)
    decode.greedy_decode(tiny_llama, ids, 4, compiled=True)
    first = capsys.readouterr().out
    decode.greedy_decode(tiny_llama, ids, 4, compiled=True)
    again = capsys.readouterr().out
    if "compile failed" in decode.greedy_decode(tiny_llama, ids, 4, compiled=True).mode:
        pytest.skip("no compiler here")
    assert "compiling the decode step for batch 1 × 7 positions" in first and "compiled in" in first
    assert again == ""
