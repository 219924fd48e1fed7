"""model.py against transformers' GPT2LMHeadModel: same logits, same loss, the GPT-2 init, attention paths."""

import pytest
import torch

from attention import forward_with_attention
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt2_124m_dirs(tmp_path_factory, random_checkpoint, hub_style_tensors):
    """The real 124M shape with random weights, saved as safetensors by save_pretrained, and as the
    pytorch_model.bin of the hub's GPT-2 repositories (transformers 5 no longer writes pickles itself)."""
    safe = random_checkpoint(tmp_path_factory.mktemp("gpt2-safe"), seed=1)
    pickled = tmp_path_factory.mktemp("gpt2-bin")
    (pickled / "config.json").write_text((safe / "config.json").read_text())
    torch.save(hub_style_tensors(safe, "", ("bias", "masked_bias")), pickled / "pytorch_model.bin")
    return safe, pickled


def test_124m_matches_transformers_from_safetensors_and_pickle(gpt2_124m_dirs, hf_model, assert_same_logits):
    safe, pickled = gpt2_124m_dirs
    reference = hf_model(safe)
    for folder in (safe, pickled):
        model = GPT.from_pretrained(str(folder))
        assert model.config.n_layer == 12 and model.config.n_embd == 768 and model.config.vocab_size == 50257
        assert model.get_num_params(non_embedding=False) == sum(p.numel() for p in reference.parameters())
        assert not model.training and model.transformer.wte.weight.dtype == torch.float32
        assert model.lm_head.weight is model.transformer.wte.weight
        assert_same_logits(model, reference)


def test_small_config_matches_transformers(tmp_path, random_checkpoint, hf_model, assert_same_logits):
    folder = random_checkpoint(tmp_path, n_layer=3, n_head=6, n_embd=96, n_positions=128)
    assert_same_logits(GPT.from_pretrained(str(folder)), hf_model(folder), T=128)


def test_trained_model_matches_transformers(trained, trained_dir, hf_model, assert_same_logits):
    assert_same_logits(trained, hf_model(trained_dir), T=256)


def test_init_matches_gpt2_recipe():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=1000, block_size=64))
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / 8 ** 0.5) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_sdpa_and_manual_attention_agree(trained):
    model = trained
    idx = torch.randint(0, 50257, (2, 100))
    with torch.no_grad():
        sdpa, _ = model(idx, all_logits=True)
        manual, probs = forward_with_attention(model, idx)
    assert (sdpa - manual).abs().max().item() <= 1e-4
    assert probs.shape == (4, 2, 4, 100, 100)


def test_crop_block_size(trained_dir):
    model = GPT.from_pretrained(str(trained_dir))
    idx = torch.randint(0, 50257, (1, 50))
    with torch.no_grad():
        before, _ = model(idx, all_logits=True)
        model.crop_block_size(64)
        after, _ = model(idx, all_logits=True)
    assert model.config.block_size == 64 and torch.equal(before, after)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
