import math

import pytest
import torch

from helpers import memory, quant

torch.manual_seed(0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_exactly_representable_values_round_trip(symmetric):
    # multiples of one step that span the full range come back exactly
    w = torch.tensor([[-127.0, -3.0, 0.0, 5.0, 127.0, 64.0, -64.0, 1.0]]) / 32
    if not symmetric:
        w = torch.tensor([[0.0, 3.0, 255.0, 17.0, 128.0, 1.0, 2.0, 200.0]]) / 16
    torch.testing.assert_close(quant.fake_quantize(w, bits=8, granularity="tensor",
                                                   symmetric=symmetric), w)  # fmt: skip


def test_absmax_per_channel_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different size
    q, scale, _ = quant.quantize(w, bits=8, granularity="channel")
    error = (quant.dequantize(q, scale, 0, w.shape) - w).abs()
    half_step = scale.reshape(-1, 1) / 2
    assert (error <= half_step * (1 + 1e-6)).all()


def test_groups_beat_one_scale_when_there_are_outliers():
    w = torch.randn(32, 512) * 0.02
    w[3, 17] = 8.0  # one planted outlier stretches the per-tensor (and its row's) scale
    err = {g: (quant.fake_quantize(w, bits=4, granularity=g, group_size=64) - w).pow(2).mean()
           for g in ("tensor", "channel", "group")}  # fmt: skip
    assert err["group"] < err["channel"] < err["tensor"]


def test_error_shrinks_with_more_bits():
    w = torch.randn(16, 128)
    errors = [(quant.fake_quantize(w, bits=b) - w).abs().mean() for b in (2, 3, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_quantized_linear_sizes_equal_the_formula():
    linear = torch.nn.Linear(256, 96, bias=False)
    int8 = quant.Int8WeightOnlyLinear(linear)
    assert (
        memory.weight_bytes(int8, include_buffers=True) == 96 * 256 * 1 + 96 * 2
    )  # int8 values + one bf16 scale per row
    int4 = quant.Int4WeightOnlyLinear(linear, group_size=64)
    groups = 256 // 64
    assert (
        memory.weight_bytes(int4, include_buffers=True) == 96 * 256 // 2 + groups * 96 * 2 * 2
    )  # nibbles + scale & zero


def test_quantized_linears_compute_the_dequantized_product():
    linear = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(3, 128)
    w8 = quant.fake_quantize(linear.weight.detach(), bits=8, granularity="channel")
    y8 = quant.Int8WeightOnlyLinear(linear, compute_dtype=torch.float32)(x)
    torch.testing.assert_close(y8, x @ w8.T, rtol=1e-4, atol=1e-4)
    # int4: each group of 64 spans [min, max] in 15 equal steps
    g = linear.weight.detach().reshape(64, 2, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    w4 = (lo + torch.round((g - lo) / step) * step).reshape(64, 128)
    y4 = quant.Int4WeightOnlyLinear(linear, group_size=64)(x)
    torch.testing.assert_close(y4, x @ w4.T, rtol=0.02, atol=0.02)  # bf16 activations and scales


class UniformModel(torch.nn.Module):
    """Predicts every token of a vocabulary of V with probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        return type("Out", (), {"logits": logits})()


class KnowsTheAnswer(UniformModel):
    """Puts probability p on the true next token (read from the known sequence), the rest evenly."""

    def __init__(self, vocab, p, sequence):
        super().__init__(vocab)
        self.p, self.sequence = p, sequence

    def forward(self, input_ids):
        n = input_ids.shape[1]
        start = next(i for i in range(len(self.sequence)) if torch.equal(
            self.sequence[i : i + n], input_ids[0]))  # fmt: skip
        probs = torch.full((1, n, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs[0, torch.arange(n), self.sequence[start + 1 : start + n + 1]] = self.p
        return type("Out", (), {"logits": probs.log()})()


def test_perplexity_closed_forms():
    ids = torch.randint(0, 50, (300,))
    assert quant.perplexity(UniformModel(50), ids, window=64) == pytest.approx(50)
    ids = torch.arange(200) % 37  # a sequence whose windows are unambiguous to locate
    ids = torch.cat([ids, torch.tensor([0])])
    model = KnowsTheAnswer(37, 0.25, ids)
    assert quant.perplexity(model, ids[:150], window=37) == pytest.approx(1 / 0.25)


def test_agreement_and_kl():
    ref = torch.randn(10, 20)
    assert quant.agreement_and_kl(ref, ref) == (1.0, pytest.approx(0, abs=1e-6))
    flat = torch.zeros(10, 20)
    agree, kl = quant.agreement_and_kl(ref, flat)
    expected = (torch.softmax(ref, -1) * (torch.log_softmax(ref, -1) + math.log(20))).sum(-1).mean()
    assert kl == pytest.approx(expected.item(), rel=1e-4)


def test_unsupported_backends_say_why():
    model, note = quant.load_backend("nf4 (bitsandbytes)", None, torch.device("cpu"))
    assert model is None and note == "unsupported here: bitsandbytes needs a CUDA GPU"
    with pytest.raises(ValueError, match=r"Unknown backend 'int3'; use one of \[.*'bf16'"):
        quant.load_backend("int3", None, torch.device("cpu"))
    model, note = quant.load_backend("NF4 (bitsandbytes)", None, "cpu")  # any case, a device name
    assert model is None and "CUDA" in note


def test_int8_dynamic_is_skipped_on_cpus_without_int8_dot_products(monkeypatch):
    from helpers import quant

    backend = quant.BACKENDS["int8 dynamic (torchao)"]
    monkeypatch.setattr(quant, "cpu_has_int8_dot_product", lambda: False)
    assert "VNNI" in backend.why_unsupported(torch.device("cpu"))
    monkeypatch.setattr(quant, "cpu_has_int8_dot_product", lambda: True)
    assert backend.why_unsupported(torch.device("cpu")) == quant._torchao(torch.device("cpu"))
