"""load.py: every checkpoint layout loads to the same model, and every bad input gets a message naming it."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from load import LoadError
from model import GPT, GPTConfig


@pytest.mark.parametrize("prefix, buffers", [("", ("bias",)), ("transformer.", ("bias", "masked_bias"))])
def test_hub_layouts_load(tmp_path, small_dir, prefix, buffers, hf_model, assert_same_logits, hub_style_tensors):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text((small_dir / "config.json").read_text())
    save_file(hub_style_tensors(small_dir, prefix, buffers), folder / "model.safetensors")
    assert_same_logits(GPT.from_pretrained(str(folder)), hf_model(small_dir))


def test_sharded_safetensors_load(tmp_path, small_dir, hf_model, assert_same_logits):
    hf_model(small_dir).save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_logits(GPT.from_pretrained(str(tmp_path)), hf_model(small_dir))


def test_nanogpt_checkpoint_round_trip(tmp_path):
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.1)
    torch.manual_seed(0)
    trained = GPT(config).eval()
    # As nanoGPT's train.py writes it from a torch.compile'd model.
    state = {"_orig_mod." + k: v for k, v in trained.state_dict().items()}
    torch.save({"model": state, "model_args": vars(config), "iter_num": 5, "best_val_loss": torch.tensor(2.5),
                "config": {"dataset": "shakespeare_char", "compile": True}}, tmp_path / "ckpt.pt")
    for source in (tmp_path / "ckpt.pt", tmp_path):
        loaded = GPT.from_pretrained(str(source), override_args={"dropout": 0.0})
        assert loaded.config.dropout == 0.0 and loaded.config.bias is False
        idx = torch.randint(0, 100, (2, 32))
        with torch.no_grad():
            assert torch.equal(loaded(idx, all_logits=True)[0], trained(idx, all_logits=True)[0])


@pytest.mark.parametrize("quantize", [None, "int8", "fp16"])
@pytest.mark.parametrize("kind", ["safetensors", "pickle", "nanogpt"])
def test_a_loaded_model_holds_no_mapping_of_its_files(tmp_path, small_dir, hf_model, kind, quantize):
    """Every tensor is copied out of the file's mapping: a model that kept views of it held the file's pages in
    its resident memory (GPT-2 124M's int8 run: 6 MB, one whole-file mapping per float32 tensor kept) and would
    die of SIGBUS if the file were rewritten while it runs."""
    import gc

    if not Path("/proc/self/maps").exists():
        pytest.skip("Linux's /proc/self/maps lists a process's mappings")
    if kind == "nanogpt":
        config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
        torch.save({"model": GPT(config).state_dict(), "model_args": vars(config)}, tmp_path / "ckpt.pt")
        weights = tmp_path / "ckpt.pt"
    else:
        hf_model(small_dir).save_pretrained(tmp_path)
        weights = tmp_path / "model.safetensors"
        if kind == "pickle":
            torch.save(hf_model(small_dir).state_dict(), tmp_path / "pytorch_model.bin")
            weights.unlink()
            weights = tmp_path / "pytorch_model.bin"
    model = GPT.from_pretrained(str(tmp_path), quantize=quantize)
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(weights))]
    assert mapped == [], mapped
    assert model.transformer.wpe.weight.untyped_storage().nbytes() == model.transformer.wpe.weight.nbytes  # its own


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each gets a message that names the problem and the way out.


def test_unknown_model_name():
    with pytest.raises(LoadError, match="unknown model 'gpt3'.*gpt2-medium.*local model folder"):
        GPT.from_pretrained("gpt3")


def test_missing_local_path():
    with pytest.raises(LoadError, match="no such file or folder: ./nowhere/ckpt.pt"):
        GPT.from_pretrained("./nowhere/ckpt.pt")


def test_override_args_only_dropout(small_dir):
    with pytest.raises(ValueError, match="only 'dropout'"):
        GPT.from_pretrained(str(small_dir), override_args={"n_layer": 3})


def run_python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_hub_unreachable_and_nothing_cached(tmp_path):
    result = run_python("from model import GPT\nGPT.from_pretrained('gpt2')", tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert "could not fetch 'openai-community/gpt2' from the Hugging Face hub" in result.stderr
    assert "--init_from=path/to/gpt2" in result.stderr


def test_hub_name_served_from_cache_offline(tmp_path, small_dir):
    """The hub path for real: a name resolved through huggingface_hub's cache layout, with no network."""
    repo = tmp_path / "hf" / "hub" / "models--openai-community--gpt2"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        (snapshot / name).write_bytes((small_dir / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from model import GPT\nm = GPT.from_pretrained('gpt2')\nprint(m.config.n_layer, m.config.block_size)")
    result = run_python(code, tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "64"]


def test_empty_local_folder_shadowing_hub_name(tmp_path):
    (tmp_path / "gpt2").mkdir()
    result = run_python("from model import GPT\nGPT.from_pretrained('gpt2')", tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert "'gpt2' is taken as the local folder" in result.stderr and "holds no weights" in result.stderr
    assert "'openai-community/gpt2'" in result.stderr


def test_folder_without_weights(tmp_path, small_dir):
    with pytest.raises(LoadError, match="is not a model folder.*config.json with model.safetensors"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text((small_dir / "config.json").read_text())
    with pytest.raises(LoadError, match="has config.json but no weights"):
        GPT.from_pretrained(str(tmp_path))


def test_config_not_gpt2(tmp_path, small_dir):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes((small_dir / "model.safetensors").read_bytes())
    with pytest.raises(LoadError, match="describes a 'llama' model, not GPT-2"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text((small_dir / "config.json").read_text().replace(
        '"gelu_new"', '"relu"'))
    with pytest.raises(LoadError, match="activation_function.*relu"):
        GPT.from_pretrained(str(tmp_path))


def test_missing_unexpected_and_misshaped_tensors(tmp_path, small_dir, hub_style_tensors):
    tensors = hub_style_tensors(small_dir, "transformer.", ())
    del tensors["transformer.h.1.ln_2.bias"]
    tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    tensors["transformer.wpe.weight"] = torch.zeros(32, 64)
    (tmp_path / "config.json").write_text((small_dir / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(LoadError) as error:
        GPT.from_pretrained(str(tmp_path))
    message = str(error.value)
    assert "missing: transformer.h.1.ln_2.bias" in message
    assert "unexpected: transformer.h.0.attn.rotary.weight" in message
    assert "mis-shaped: transformer.wpe.weight (32, 64) (expected (64, 64))" in message


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_pickle_that_would_run_code_is_refused(tmp_path, writer):
    global MARKER
    MARKER = str(tmp_path / "code-ran")
    checkpoint = {"model_args": {}, "model": RunsCode()}
    if writer == "torch.save":
        torch.save(checkpoint, tmp_path / "ckpt.pt")
    else:
        (tmp_path / "ckpt.pt").write_bytes(pickle.dumps(checkpoint))
    with pytest.raises(LoadError, match="refused to load .*ckpt.pt.*could run code"):
        GPT.from_pretrained(str(tmp_path / "ckpt.pt"))
    assert not Path(MARKER).exists()
