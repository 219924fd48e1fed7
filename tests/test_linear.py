"""linear.py's int8 weights, and bfloat16 weights: what quantize_int8 swaps, that it warns nobody, and that both agree with float32 on
the trained model's greedy steps (loose bounds: int8 and bfloat16 round every product)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from linear import Int8Linear
from model import GPT, GPTConfig
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def heldout_ids(root_dir, trained_dir) -> torch.Tensor:
    text = (root_dir / "assets" / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor(load_tokenizer(trained_dir).encode_ordinary(text))


def test_quantize_int8_swaps_every_linear_and_warns_nobody():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.quantize_int8() is model
        model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert [str(w.message) for w in caught] == []
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.out_features == 101
    assert model.transformer.wte.weight.dtype == torch.float32  # the input embedding stays float32


def test_int8_linear_is_close_to_the_float_product():
    torch.manual_seed(0)
    linear = nn.Linear(256, 300)
    x = torch.randn(3, 7, 256)
    expected = linear(x)
    got = Int8Linear(linear)(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() / expected.abs().max() < 3e-2


def teacher_forced_agreement(model: GPT, reference: GPT, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a = model(ids[None], all_logits=True)[0].argmax(-1)
        b = reference(ids[None], all_logits=True)[0].argmax(-1)
    return (a == b).float().mean().item()


@pytest.mark.parametrize("variant", ["int8", "bfloat16"])
def test_low_precision_agrees_with_float32_on_most_greedy_steps(trained, heldout_ids, variant):
    model = copy.deepcopy(trained)
    model = model.quantize_int8() if variant == "int8" else model.to(torch.bfloat16)
    prompt = heldout_ids[:24][None]
    expected = trained.generate(prompt, 40, temperature=0)[0, 24:]
    got = model.generate(prompt, 40, temperature=0)[0, 24:]
    # Free-running greedy text diverges for good after one flipped near-tie, so the bound on it is loose; the
    # step-by-step check below conditions both on the same text and is the tighter one.
    assert (got == expected).float().mean() >= 0.5
    window = heldout_ids[:trained.config.block_size]
    assert teacher_forced_agreement(model, trained, window) >= 0.85  # measured: int8 93%, bfloat16 98.5%
