"""runtime.py, called directly: the device and dtype a script asks for, a prompt as the ids generation starts from,
the out-of-vocabulary refusal, token bytes, and the memory a batch of samples takes."""

import pytest
import torch

import runtime
from errors import UsageError
from model import GPTConfig
from tokenizer import EOT, EOT_ID, load_tokenizer


def test_auto_dtype_is_bfloat16_only_where_the_chosen_gpu_has_it_natively(two_gpus, monkeypatch):
    assert runtime.pick_dtype("auto", torch.device("cuda:0")) == torch.float16  # emulated bfloat16 does not count
    assert runtime.pick_dtype("auto", torch.device("cuda")) == torch.float16  # the current GPU, the T4
    assert runtime.pick_dtype("auto", torch.device("cuda:1")) == torch.bfloat16  # asked of cuda:1, not the current
    with pytest.raises(UsageError, match=r"Tesla T4 has no native bfloat16 \(compute capability 7.5, under 8.0\): "
                                         r"use --dtype=float16, or float32"):
        runtime.pick_dtype("bfloat16", torch.device("cuda:0"))
    monkeypatch.setattr(torch.version, "hip", "6.0")  # ROCm GPUs compute bfloat16 natively
    assert runtime.pick_dtype("auto", torch.device("cuda:0")) == torch.bfloat16


def test_an_indexed_gpu_becomes_the_current_one(two_gpus):
    """What takes no device (a CUDA event, torch.cuda.synchronize()) acts on the current GPU: --device=cuda:1 makes
    cuda:1 current, where it is picked."""
    assert runtime.pick_device("cuda:1") == torch.device("cuda:1") and two_gpus == [torch.device("cuda:1")]
    assert torch.cuda.current_device() == 1
    runtime.pick_device("cuda")
    runtime.pick_device("cpu")
    assert two_gpus == [torch.device("cuda:1")]  # "cuda" is the current GPU already
    with pytest.raises(UsageError, match="--device=cuda:2 but this machine has 2 CUDA device"):
        runtime.pick_device("cuda:2")


def test_dtype_the_device_cannot_run():
    with pytest.raises(UsageError, match="cannot run float16"):
        runtime.pick_dtype("float16", torch.device("meta"))  # a device that cannot compute at all


def test_prompt_ids_start_from_eot_and_keep_the_end_of_a_long_prompt(trained_dir):
    enc = load_tokenizer(trained_dir)
    config = GPTConfig(block_size=4, vocab_size=50257)
    assert runtime.prompt_ids(enc, "", config, "the prompt") == ([EOT_ID], 1)
    special = enc.encode(f"a{EOT}b", allowed_special={EOT})  # the special token, not its characters
    assert runtime.prompt_ids(enc, f"a{EOT}b", config, "the prompt") == (special, 3)
    words = " one two three four five six"
    ids, length = runtime.prompt_ids(enc, words, config, "the prompt")
    assert length == len(enc.encode(words)) > 4 and ids == enc.encode(words)[-4:]


def test_a_token_outside_the_vocabulary_is_named_with_where_it_came_from(trained_dir):
    enc = load_tokenizer(trained_dir)
    with pytest.raises(UsageError, match="^p.jsonl line 3: the prompt holds token 50256, outside the model's "
                                         "vocabulary of 65: this tokenizer does not fit the model$"):
        runtime.prompt_ids(enc, "", GPTConfig(block_size=8, vocab_size=65), "p.jsonl line 3: the prompt")
    runtime.check_vocabulary([], 65, "an empty text")  # nothing to refuse


def test_token_bytes_of_a_padded_vocabulary(trained_dir):
    enc = load_tokenizer(trained_dir)
    assert runtime.token_bytes(enc, enc.encode(" naïve")) == " naïve".encode()
    assert runtime.token_bytes(enc, [enc.n_vocab + 3]) == "\N{REPLACEMENT CHARACTER}".encode()


def test_kv_cache_bytes_stop_growing_at_the_context():
    config = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=16)
    assert runtime.kv_cache_bytes(config, 3, 5, 4) == 2 * 2 * 8 * 16 * 4  # keys and values, 2 layers, 8 positions
    assert runtime.kv_cache_bytes(config, 3, 10 ** 9, 2) == 2 * 2 * 64 * 16 * 2
    assert runtime.kv_cache_bytes(config, 3, 5, 4, compile=True) == 2 * 2 * 64 * 16 * 4  # static: the context


def test_compiled_batches_are_planned_for_a_static_cache_of_the_whole_context(monkeypatch, capsys):
    """GPT-2 124M, 100 samples of 1 + 20 tokens, 2 GB available: eager caches of 21 positions fit at once;
    compiled, each sample's cache holds 1024 positions, so the samples run in batches that fit."""
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 2 * 10 ** 9)
    config = GPTConfig(vocab_size=50257)
    assert list(runtime.batch_sizes(config, 2, 1, 20, 100, torch.device("cuda"))) == [100]
    sizes = list(runtime.batch_sizes(config, 2, 1, 20, 100, torch.device("cuda"), compile=True))
    per_sample = 2 * 12 * 1024 * 768 * 2 + 6 * 50257 * 4 + 20 * 8  # a static cache, logits and the text
    assert sum(sizes) == 100 and max(sizes) <= int(0.8 * 2e9 // per_sample) < 100
    assert "batches of up to" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 10 ** 6)
    with pytest.raises(UsageError, match=r"use --compile=False \(a compiled cache holds all 1024 positions\)"):
        runtime.batch_sizes(config, 2, 1, 20, 100, torch.device("cuda"), compile=True)


def test_batch_sizes_for_a_hundred_thousand_samples(monkeypatch, capsys):
    """--num_samples=100000 on GPT-2 124M with 8 GB free: even batches that each fit, said in one line."""
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 8 * 10 ** 9)
    config = GPTConfig(vocab_size=50257)
    sizes = list(runtime.batch_sizes(config, 4, 1, 500, 100000, torch.device("cpu")))
    per_sample = 2 * 12 * 501 * 768 * 4 + 6 * 50257 * 4 + 500 * 8  # the KV cache of 501 positions, logits, text
    fit = int(0.8 * 8e9 // per_sample)
    assert sum(sizes) == 100000 and max(sizes) <= fit and len(sizes) == -(-100000 // fit)
    assert max(sizes) - min(sizes) <= 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"drawing them in {len(sizes)} batches of up to {max(sizes):,}" in err


@pytest.mark.gpu
def test_available_memory_on_a_gpu():
    free = runtime.available_memory(torch.device("cuda"))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
