"""Notebook 02 writes the KV-cache formula and the serving-memory sum itself; they must give the
known answers and agree with `helpers.shapes`, which the planner and the calculator use."""

import re
from pathlib import Path

import nbformat
import pytest
import torch

from helpers import shapes, widgets
from helpers.planner import RUNTIME_RESERVE_BYTES, predict
from tests.notebook_defs import definitions

nb = definitions("02_memory_and_buffers")
NOTEBOOK = next((Path(__file__).resolve().parent.parent / "notebooks").glob("02_*.ipynb"))


def test_kv_cache_known_answers():
    llama_2_7b = shapes.Shape.of("llama-2-7b")  # 32 layers, 32 KV heads of 128: MHA
    assert nb.kv_cache_bytes(llama_2_7b, 1, 1, 2) == 2 * 32 * 4096 * 2 == 524_288  # per token
    assert nb.kv_cache_bytes(llama_2_7b, 1, 4096, 2) == 2 * 2**30  # 2 GiB for 4096 tokens
    llama_3_8b = shapes.Shape.of("llama-3-8b")  # 8 KV heads: a quarter of Llama-2-7B's
    assert nb.kv_cache_bytes(llama_3_8b, 4, 8192, 2) == 2 * 32 * 4 * 8192 * 8 * 128 * 2
    smollm2 = shapes.Shape.of("smollm2-135m")  # 30 layers, 3 KV heads of 64
    assert nb.kv_cache_bytes(smollm2, 1, 1, 2) == 2 * 30 * 3 * 64 * 2 == 23_040


@pytest.mark.parametrize("name", sorted(shapes.ARCHITECTURES))
@pytest.mark.parametrize("batch, context, value_bytes", [(1, 1, 2), (8, 4096, 2), (3, 77, 4)])
def test_kv_cache_equals_the_helper(name, batch, context, value_bytes):
    shape = shapes.Shape.of(name)
    assert nb.kv_cache_bytes(shape, batch, context, value_bytes) == shapes.kv_cache_bytes(
        shape, batch, context, value_bytes
    )


@pytest.mark.parametrize("name", sorted(shapes.ARCHITECTURES))
@pytest.mark.parametrize("precision", shapes.PRECISIONS)
def test_serving_sum_equals_the_helper(name, precision):
    shape = shapes.Shape.of(name)
    weight, value = shapes.WEIGHT_BYTES[precision], shapes.VALUE_BYTES[precision]
    last = nb.serving_bytes(shape, 8, 4096, weight, value)
    assert last == shapes.serving_memory(shape, 8, 4096, weight, value)
    every = nb.serving_bytes(shape, 2, 512, weight, value, logit_positions=512)
    assert every == shapes.serving_memory(shape, 2, 512, weight, value, all_logits=True)


def test_llama_2_7b_serving_sum_known_answer():
    parts = nb.serving_bytes(shapes.Shape.of("llama-2-7b"), 1, 4096, 2, 2)
    assert parts["weights"] == 6_738_415_616 * 2  # 13.48 GB in fp16
    # per token 5·4096 + 2·32·128 + 3·11008 = 61,696; per position 3·128 rotary values
    assert parts["activations"] == (4096 * 61_696 + 4096 * 384) * 2
    assert parts["logits"] == 32000 * 2  # the last position's scores only


@pytest.mark.parametrize("precision", shapes.PRECISIONS)
def test_calculator_counts_weights_as_the_planner(precision):
    """Section 7 says the calculator counts the weights (int4 included) as the planner does."""
    llama = shapes.Shape.of("llama-2-7b")
    value = shapes.VALUE_BYTES[precision]
    parts = widgets.memory_parts("llama-2-7b", precision, batch=1, context=4096)
    p = predict(model="llama-2-7b", dtype=precision, batch=1, prompt_tokens=4095, new_tokens=1)
    others = RUNTIME_RESERVE_BYTES + shapes.kv_cache_bytes(llama, 1, 4096, value)
    others += shapes.activation_bytes(llama, 1, 4095, value)
    assert parts["weights"] == pytest.approx(p.memory_per_gpu_bytes - others, abs=1)


def test_activations_known_answers():
    """The derived live tensors of one layer, counted by hand for SmolLM2 (hidden 576, MLP 1536,
    3 KV heads of 64, 9 heads): what notebook 02 measured op by op (7,872 values per token)."""
    smollm2 = shapes.Shape.of("smollm2-135m")
    per_token = 2 * 576 + 576 + 576 + 2 * 3 * 64 + 576 + 3 * 1536  # = 7,872
    assert per_token == 7872
    assert nb.layer_peak_bytes(smollm2, 1, 512, 4) == (512 * 7872 + 512 * 3 * 64) * 4
    assert nb.layer_peak_bytes(smollm2, 2, 32, 2) == (2 * 32 * 7872 + 32 * 192) * 2
    # a materialized score matrix (heads, T, T) and its softmax: 2·9·T per token beside
    # the attention-time tensors (5·576 + 384 + 576 = 3,840); it passes the MLP's 7,872 at T = 224
    assert nb.layer_peak_bytes(smollm2, 1, 224, 4, True) == nb.layer_peak_bytes(smollm2, 1, 224, 4)
    with_scores = (512 * (3840 + 18 * 512) + 512 * 192) * 4
    assert nb.layer_peak_bytes(smollm2, 1, 512, 4, True) == with_scores
    for scores in (False, True):  # the helper (planner, calculator) counts the same at TP 1
        expected = nb.layer_peak_bytes(smollm2, 1, 512, 4, scores)
        assert shapes.activation_bytes(smollm2, 1, 512, 4, 1, scores) == expected
    # TP 3 splits heads and MLP: 3·576 + (2·576 + 384)/3 + 1536 = 3,776 per token
    assert shapes.activation_bytes(smollm2, 1, 10, 2, tp=3) == (10 * 3776 + 10 * 192) * 2


def test_request_peak_known_answers():
    """After the last layer: the residual, then norm and scores at the kept positions."""
    smollm2 = shapes.Shape.of("smollm2-135m")
    end = nb.logits_peak_bytes(smollm2, 2, 512, 4, 512)
    assert end == (2 * (512 * 576 + 512 * (576 + 49152)) + 2 * 512 * 64) * 4
    kv = 2 * 30 * 2 * 514 * 3 * 64 * 4
    assert nb.request_peak_bytes(smollm2, 2, 512, 4, 512, 2) == kv + end  # every logit: the end
    layer = nb.layer_peak_bytes(smollm2, 2, 512, 4)
    assert nb.request_peak_bytes(smollm2, 2, 512, 4, 1, 2) == kv + layer  # last only: a layer


def test_growing_cache_prediction_known_answers():
    """Section 5: growing from P to P + N tokens copies Σ 2(t + 1) tokens' bytes (read + write),
    N(N + 1) from an empty cache; the extra time adds one fault per fresh page."""
    for prompt, new in [(0, 1), (0, 32), (96, 32), (7, 5)]:
        by_steps = sum(2 * (t + 1) for t in range(prompt, prompt + new))
        assert nb.growing_copied_bytes(1, prompt, new) == by_steps
    assert nb.growing_copied_bytes(3, 0, 10) == 10 * 11 * 3
    assert nb.growing_copied_bytes(23_040, 96, 32) == 32 * 225 * 23_040  # SmolLM2, 16-bit
    assert nb.growing_extra_s(8e9, 8e9, 0, 1e-6) == pytest.approx(1.0)  # copies only
    assert nb.growing_extra_s(0, 8e9, 1000, 2e-6) == pytest.approx(2e-3)  # faults only
    assert nb.growing_extra_s(4e9, 8e9, 500, 1e-6) == pytest.approx(0.5 + 5e-4)


def test_generate_scores_only_the_last_prompt_position(tiny_llama):
    """The notebook says transformers' `generate` keeps the last position's logits at prefill
    (transformers 5); a plain forward pass scores every position."""
    rows = []
    hook = tiny_llama.lm_head.register_forward_hook(lambda m, i, out: rows.append(out.shape[1]))
    try:
        ids = torch.randint(0, 97, (2, 7))
        tiny_llama.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
        assert rows == [1, 1, 1]  # prefill and each step: one position
        rows.clear()
        tiny_llama(ids)
        assert rows == [7]
    finally:
        hook.remove()


def test_cells_hold_the_idea_not_the_plumbing():
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    code = [c.source for c in cells if c.cell_type == "code"]
    assert max(len(s.splitlines()) for s in code) <= 30
    assert not re.search(r"\b(memory|decode|shapes|widgets|plots)\._\w", "\n".join(code))
    sections = re.split(r"^## ", "\n".join(c.source for c in cells), flags=re.M)
    for section in sections[1:]:
        if re.match(r"[1-7]\.", section):  # each numbered section but the verdicts ends so
            assert "**Takeaway:**" in section, section.splitlines()[0]


def test_int8_kv_cell_equals_the_helper():
    from helpers import kvquant

    x = torch.randn(2, 3, 9, 64) * torch.logspace(-2, 1, 9)[None, None, :, None]
    q, scale = nb.quantize_kv_int8(x)
    hq, hscale = kvquant.quantize_kv(x, "int8")
    assert torch.equal(q, hq) and torch.equal(scale, hscale)
    assert ((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_int8_kv_bytes_cell_is_what_the_cache_allocates(tiny_llama):
    from helpers import kvquant

    shape = shapes.Shape.of(tiny_llama.config)
    cache = kvquant.QuantizedKVCache(tiny_llama.config, 3, 11, torch.float32, "cpu", "int8")
    assert nb.int8_kv_bytes(shape, 3, 11) == cache.nbytes
    assert nb.int8_kv_bytes(shape, 1, 1) == kvquant.bytes_per_token(shape, "int8")
