"""The quantized KV cache (helpers.kvquant) against known answers: the round-trip error its
scale implies, exact values stored exactly, its bytes, and its decode loop against the float
cache's."""

import pytest
import torch

from helpers import decode, kvquant
from helpers.models import llama_from_config
from helpers.shapes import Shape


def kv(batch=2, heads=3, tokens=16, head_dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 2, tokens)[None, None, :, None]  # tokens of very different size
    return torch.randn(batch, heads, tokens, head_dim, generator=gen) * spread


def test_int8_round_trip_within_half_a_step_per_head_and_token():
    x = kv()
    q, scale = kvquant.quantize_kv(x, "int8")
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 16, 1)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)
    error = (kvquant.dequantize_kv(q, scale) - x).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()  # each token's own step: small tokens stay small


@pytest.mark.skipif(kvquant.fp8_unsupported("cpu") != "", reason="no float8 in this torch")
def test_fp8_round_trip_within_e4m3s_relative_step():
    x = kv()
    q, scale = kvquant.quantize_kv(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    error = (kvquant.dequantize_kv(q, scale) - x).abs()
    # 3 mantissa bits: half an ulp is 2⁻⁴ of the value; below 2⁻⁶ (subnormals) a fixed 2⁻¹⁰
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
    assert (error <= bound).all()


def test_exactly_representable_values_are_stored_exactly():
    q = torch.randint(-127, 128, (1, 2, 5, 8)).float()
    q[..., 0] = 127  # the largest magnitude of every head and token is 127: scale 1
    s = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)  # powers of two: q · s exact in fp32
    x = q * s
    back = kvquant.dequantize_kv(*kvquant.quantize_kv(x, "int8"))
    assert torch.equal(back, x)


def tiny_config(layers):
    return llama_from_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97,
    ).config  # fmt: skip


def test_bytes_per_token_are_what_the_cache_allocates():
    config = tiny_config(layers=3)
    shape = Shape.of(config)
    for kv_dtype in ("int8", None):
        cache = kvquant.QuantizedKVCache(config, 2, 10, torch.float32, "cpu", kv_dtype)
        assert cache.nbytes == 2 * 10 * kvquant.bytes_per_token(shape, kv_dtype, 4)
    float_cache = decode.KVCache(config, 2, 10, torch.float32, "cpu")
    assert float_cache.nbytes == 2 * 10 * kvquant.bytes_per_token(shape, None, 4)
    # int8: 1 byte per value + a 4-byte scale per head per token: (16 + 4) / (16 · 4) of fp32
    assert kvquant.bytes_per_token(shape, "int8") / kvquant.bytes_per_token(shape, None, 4) == (
        pytest.approx((16 + 4) / 64)
    )


def test_bad_kv_dtype_names_the_choices():
    config = tiny_config(layers=1)
    with pytest.raises(ValueError, match="int8"):
        kvquant.QuantizedKVCache(config, 1, 4, torch.float32, "cpu", "int4")


def test_fp8_on_a_device_without_it_names_the_fix(monkeypatch):
    monkeypatch.setattr(kvquant, "fp8_unsupported", lambda device: "no float8 here: use int8")
    with pytest.raises(ValueError, match="kv_dtype='fp8' needs float8.*use int8"):
        kvquant.check_kv_dtype("fp8", "cpu")


@pytest.fixture(scope="module")
def small_llama():
    return llama_from_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                             seed=0).eval()  # fmt: skip


def test_float_storage_decodes_as_the_course_loop(small_llama):
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = kvquant.greedy_decode(small_llama, ids, 12, kv_dtype=None)
    theirs = decode.greedy_decode(small_llama, ids, 12, all_logits=False)
    assert torch.equal(ours.tokens, theirs.tokens)


def test_scoring_in_chunks_equals_one_pass(small_llama):
    """Per-token scales: a chunk is quantized as its tokens one at a time, so reading a text in
    chunks through the cache computes what one pass (and token-by-token decoding) would."""
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    for kv_dtype in (None, "int8"):
        nll_chunks, top_chunks = kvquant.score(small_llama, ids, kv_dtype, chunk=7)
        nll_whole, top_whole = kvquant.score(small_llama, ids, kv_dtype, chunk=64)
        torch.testing.assert_close(nll_chunks, nll_whole, atol=1e-5, rtol=1e-5)
        assert torch.equal(top_chunks, top_whole)
    with torch.no_grad():
        logits = small_llama(ids[:-1].unsqueeze(0)).logits[0]
    expected = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    torch.testing.assert_close(kvquant.score(small_llama, ids, None, chunk=9)[0], expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def exactly_representable(model):
    """The same model with keys 0 and values a fixed integer vector whose largest magnitude in
    every head is 127 (k_proj zero; v_proj zero plus that bias): int8 with per-head per-token
    scales stores both exactly (scale 1), so the quantized cache must change nothing."""
    config = model.config.to_dict() | {"attention_bias": True}
    planted = llama_from_config(**{k: config[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "attention_bias")}, seed=0).eval()  # fmt: skip
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in planted.model.layers:
            attn = layer.self_attn
            for proj in (attn.k_proj, attn.v_proj, attn.q_proj, attn.o_proj):
                proj.bias.zero_()
            attn.k_proj.weight.zero_()
            attn.v_proj.weight.zero_()
            values = torch.randint(-100, 101, attn.v_proj.bias.shape, generator=gen).float()
            values.view(-1, head_dim)[:, 0] = 127
            attn.v_proj.bias.copy_(values)  # integers, largest 127: each scale is exactly 1
    return planted


def test_quantized_cache_decodes_as_the_float_cache_where_values_are_representable(small_llama):
    planted = exactly_representable(small_llama)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    float_cache = kvquant.greedy_decode(planted, ids, 10, kv_dtype=None)
    int8_cache = kvquant.greedy_decode(planted, ids, 10, kv_dtype="int8")
    assert torch.equal(float_cache.tokens, int8_cache.tokens)
    nll_float, _ = kvquant.score(planted, ids[0], None)
    nll_int8, _ = kvquant.score(planted, ids[0], "int8")
    assert torch.equal(nll_float, nll_int8)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_8_bit_caches_stay_close_on_a_random_model(small_llama, kv_dtype):
    if kv_dtype == "fp8" and kvquant.fp8_unsupported("cpu"):
        pytest.skip("no float8 in this torch")
    ids = torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(4))
    nll_float, top_float = kvquant.score(small_llama, ids, None)
    nll_8, top_8 = kvquant.score(small_llama, ids, kv_dtype)
    assert (nll_8 - nll_float).abs().max() < 0.05
    assert (top_8 == top_float).float().mean() > 0.9
    tokens = kvquant.greedy_decode(small_llama, ids[:5].unsqueeze(0), 4, kv_dtype).tokens
    assert tokens.shape == (1, 4)
