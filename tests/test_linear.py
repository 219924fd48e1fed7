"""linear.py's int8 and float16 weights, and bfloat16 weights: what quantize_int8 and quantize_fp16 swap, that they
warn nobody, and that each agrees with float32 on the trained model's greedy steps (loose bounds: every one of them
rounds every product)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from linear import Fp16Linear, Int8Linear
from model import GPT, GPTConfig
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def heldout_ids(root_dir, trained_dir) -> torch.Tensor:
    text = (root_dir / "assets" / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor(load_tokenizer(trained_dir).encode_ordinary(text))


@pytest.mark.parametrize("kind,cls", [("int8", Int8Linear), ("fp16", Fp16Linear)])
def test_quantize_swaps_every_linear_and_warns_nobody(kind, cls):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert getattr(model, f"quantize_{kind}")() is model
        model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert [str(w.message) for w in caught] == []
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, cls) for m in model.modules()) == 2 * 4 + 1  # 4 per block, and the LM head
    assert isinstance(model.lm_head, cls) and model.lm_head.out_features == 101
    assert model.transformer.wte.weight.dtype == torch.float32  # the input embedding stays float32


@pytest.mark.parametrize("cls,bound", [(Int8Linear, 3e-2), (Fp16Linear, 1e-3)])  # measured: 1e-2, 2e-4
def test_low_precision_linear_is_close_to_the_float_product(cls, bound):
    torch.manual_seed(0)
    linear = nn.Linear(256, 300)
    x = torch.randn(3, 7, 256)
    expected = linear(x)
    got = cls(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert 0 < (got - expected).abs().max() / expected.abs().max() < bound


def test_fp16_linear_rounds_only_the_weights():
    """The whole error is the float16 rounding of the weights: the sums are float32, as in float64 over them."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 300)
    x = torch.randn(5, 256)
    rounded = x.double() @ linear.weight.detach().half().double().t() + linear.bias.detach().double()
    assert torch.allclose(Fp16Linear(linear)(x).double(), rounded, rtol=0, atol=1e-5)
    assert not torch.allclose(linear(x).double(), rounded, rtol=0, atol=1e-5)  # the rounding is visible


def teacher_forced_agreement(model: GPT, reference: GPT, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a = model(ids[None], all_logits=True)[0].argmax(-1)
        b = reference(ids[None], all_logits=True)[0].argmax(-1)
    return (a == b).float().mean().item()


@pytest.mark.parametrize("variant", ["int8", "fp16", "bfloat16"])
def test_low_precision_agrees_with_float32_on_most_greedy_steps(trained, heldout_ids, variant):
    model = copy.deepcopy(trained)
    model = model.to(torch.bfloat16) if variant == "bfloat16" else getattr(model, f"quantize_{variant}")()
    prompt = heldout_ids[:24][None]
    expected = trained.generate(prompt, 40, temperature=0)[0, 24:]
    got = model.generate(prompt, 40, temperature=0)[0, 24:]
    # Free-running greedy text diverges for good after one flipped near-tie, so the bound on it is loose; the
    # step-by-step check below conditions both on the same text and is the tighter one.
    assert (got == expected).float().mean() >= 0.5
    window = heldout_ids[:trained.config.block_size]
    assert teacher_forced_agreement(model, trained, window) >= 0.85  # measured: int8 93%, fp16 100%, bfloat16 98.5%
