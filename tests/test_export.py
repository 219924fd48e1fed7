"""export.py (and save.py behind it): each format read back by the tool it is for. A Hugging Face folder by
transformers (the weights with nothing missing or unexpected, logits within 1e-4 of ours, AutoTokenizer's ids equal
to ours); a nanoGPT ckpt.pt as nanoGPT's train.py resumes from it, its tensors identical after nanoGPT -> hf ->
nanogpt; a GGUF file read back by the gguf package, and by llama.cpp where llama-cpp-python is installed (its
tokenization and its float32 greedy tokens equal ours). Then the bad inputs, through the command line."""

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from test_tokenizer import TEXTS
from tokenizer import EOT, EOT_ID, CharTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"}
TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json"}
# More text that byte-level BPE pre-tokenizers split differently when they differ at all
SPLIT_TEXTS = [
    "3 33 333 3333 33333 333333 3.3 3..3 3...3",
    "''''''```````\"\"\"\"......!!!!!!?????? ------======= ~~~~",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll, 'D you like it? We'Ve a'lL",
    "ភាសាខ្មែរ हिन्दी العربية עברית ελληνικά русский язык",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (rocket) 😶‍🌫️ ✅ 🦙🦙",
    " " * 40 + "x" + "\n" * 20 + "y   ",
]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def export(run_script):
    """export(*args): export.py run in process: (status, stdout, stderr)."""
    return lambda *args: run_script("export.py", *args)


def exported(result: tuple[int, str, str]) -> str:
    status, out, err = result
    assert status == 0, err
    return err


def nanogpt_checkpoint(folder: Path, model: GPT, dataset: str = "openwebtext") -> Path:
    """folder/ckpt.pt as nanoGPT's train.py saves it from a torch.compile'd model (the '_orig_mod.' prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_args": vars(model.config), "iter_num": 5000,
                "best_val_loss": torch.tensor(2.9), "config": {"dataset": dataset}}, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def transformers_model(folder: Path):
    """GPT2LMHeadModel.from_pretrained(folder), checked to load every weight it has and nothing else: its
    loading report is empty and it logged no warning."""
    from transformers import GPT2LMHeadModel

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True,
                                                      attn_implementation="eager")
    finally:
        logger.removeHandler(handler)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert [r.getMessage() for r in warnings] == []
    return model.eval()


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """A GGUF file's metadata (name -> value) and tensors (name -> the gguf package's tensor)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return ({name: field.contents() for name, field in reader.fields.items()},
            {tensor.name: tensor for tensor in reader.tensors})


# ---------------------------------------------------------------------------------------------------------------
# --to=hf


def test_hf_folder_loads_in_transformers_with_our_logits_and_token_ids(export, trained_dir, trained, tmp_path,
                                                                        assert_same_logits):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert "wrote" in exported(export(f"--init_from={trained_dir}", "--to=hf", f"--out={out}"))
    assert {p.name for p in out.iterdir()} == HF_FILES
    assert_same_logits(trained, transformers_model(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["n_positions"], config["n_ctx"], config["vocab_size"]) == (256, 256, 50257)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOT_ID
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (trained_dir / name).read_bytes()
    ours, theirs = load_tokenizer(trained_dir), AutoTokenizer.from_pretrained(out)
    assert theirs.model_max_length == 256
    for text in TEXTS + SPLIT_TEXTS:
        ids = ours.encode(text, allowed_special={EOT})
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == text


def test_nanogpt_to_hf_to_nanogpt_gives_back_identical_tensors(export, trained, trained_dir, shared_dir,
                                                              tmp_path):
    """The trained model as a nanoGPT checkpoint (no tokenizer files beside it): the hf folder's vocab.json and
    merges.txt are rebuilt from tiktoken's ranks, byte for byte GPT-2's published files; back to nanoGPT, every
    tensor is what it was, and train.py's resume path (init_from='resume') takes the checkpoint."""
    ckpt = nanogpt_checkpoint(tmp_path / "out", trained)
    exported(export(f"--init_from={ckpt}", "--to=hf", f"--out={tmp_path / 'hf'}",
                    f"--tiktoken_file={shared_dir / 'gpt2.tiktoken'}"))
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "hf" / name).read_bytes() == (trained_dir / name).read_bytes()
    exported(export(f"--init_from={tmp_path / 'hf'}", "--to=nanogpt", f"--out={tmp_path / 'back'}"))
    assert {p.name for p in (tmp_path / "back").iterdir()} == {"ckpt.pt"}

    checkpoint = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)
    original = trained.state_dict()
    assert checkpoint["model"].keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(checkpoint["model"][name], tensor), name
    assert checkpoint["model_args"] == {k: v for k, v in vars(trained.config).items()}
    assert checkpoint["iter_num"] == 0 and checkpoint["best_val_loss"] > 1e3  # a fresh run's starting point
    assert isinstance(checkpoint["config"], dict)
    resume_as_nanogpt_does(checkpoint)


def resume_as_nanogpt_does(checkpoint: dict) -> None:
    """nanoGPT train.py's init_from='resume': the model from model_args' six sizes, its state dict loaded
    strictly, the optimizer of its configure_optimizers (decayed matrices, undecayed biases and norms) given the
    saved state; then one training step."""
    model_args = dict(dropout=0.0)
    for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
        model_args[k] = checkpoint["model_args"][k]
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(checkpoint["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-4)
    optimizer.load_state_dict(checkpoint["optimizer"])
    idx = torch.randint(0, model_args["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_hf_export_of_a_hf_folder_holds_the_same_tensors(export, random_checkpoint, hf_model, tmp_path):
    source = random_checkpoint(tmp_path / "src", n_layer=2, n_head=2, n_embd=64, n_positions=64,
                               safe_serialization=False)
    exported(export(f"--init_from={source}", "--to=hf", f"--out={tmp_path / 'hf'}"))
    theirs, original = transformers_model(tmp_path / "hf").state_dict(), hf_model(source).state_dict()
    assert theirs.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(theirs[name], tensor), name


def test_hf_export_of_a_model_without_biases_and_a_padded_vocabulary(export, shared_dir, tmp_path,
                                                                     assert_same_logits):
    """nanoGPT's bias=False and its vocabulary padded to 50304: zero biases (the same function) and GPT-2's
    tokenizer for the first 50257 ids."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, bias=False)).eval()
    ckpt = nanogpt_checkpoint(tmp_path / "out", ours)
    exported(export(f"--init_from={ckpt}", "--to=hf", f"--out={tmp_path / 'hf'}",
                    f"--tiktoken_file={shared_dir / 'gpt2.tiktoken'}"))
    assert_same_logits(ours, transformers_model(tmp_path / "hf"), T=32)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == HF_FILES


def test_hf_export_of_a_model_with_its_own_byte_level_vocabulary(export, random_checkpoint, shared_dir,
                                                                  tmp_path, capsys):
    """A vocab.json of its own in GPT-2's layout (here GPT-2's first 300 ranks): its merges are rebuilt the same
    way, and AutoTokenizer's ids on the exported folder equal ours on the source."""
    from transformers import AutoTokenizer

    from tokenizer import byte_to_unicode, ranks_from_tiktoken_file

    source = random_checkpoint(tmp_path / "src", n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=301)
    capsys.readouterr()  # transformers' progress bar
    printable = byte_to_unicode()
    vocab = {"".join(printable[b] for b in token): rank
             for token, rank in ranks_from_tiktoken_file(shared_dir / "gpt2.tiktoken").items() if rank < 300}
    (source / "vocab.json").write_text(json.dumps({**vocab, EOT: 300}), encoding="utf-8")
    (source / "merges.txt").unlink()
    exported(export(f"--init_from={source}", "--to=hf", f"--out={tmp_path / 'hf'}"))
    merges = (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(merges) == 1 + 300 - 256
    ours, theirs = load_tokenizer(source), AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ours.n_vocab == 301
    for text in TEXTS + SPLIT_TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text, allowed_special={EOT}), text


# ---------------------------------------------------------------------------------------------------------------
# A character-level nanoGPT model: its weights, and not GPT-2's vocabulary


def test_char_model_exports_without_gpt2_tokenizer_files(export, char_checkpoint, tmp_path, assert_same_logits):
    ckpt = char_checkpoint(tmp_path / "out")
    err = exported(export(f"--init_from={ckpt}", "--to=hf", f"--out={tmp_path / 'hf'}"))
    assert "vocabulary is the 65 characters of" in err and "not GPT-2's" in err
    assert "no tokenizer files are written" in err
    assert not TOKENIZER_FILES & {p.name for p in (tmp_path / "hf").iterdir()}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 65 and config["bos_token_id"] is None and config["eos_token_id"] is None
    assert_same_logits(GPT.from_pretrained(str(ckpt)), transformers_model(tmp_path / "hf"), T=32)

    err = exported(export(f"--init_from={tmp_path / 'hf'}", "--to=nanogpt", f"--out={tmp_path / 'back'}"))
    assert "fewer than GPT-2's" in err  # the hf folder alone no longer says what its vocabulary is

    err = exported(export(f"--init_from={ckpt}", "--to=nanogpt", f"--out={tmp_path / 'again'}"))
    assert "meta.pkl is copied beside ckpt.pt" in err
    assert (tmp_path / "again" / "meta.pkl").read_bytes() == (tmp_path / "out" / "meta.pkl").read_bytes()
    checkpoint = torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)
    assert checkpoint["config"]["dataset"] == "shakespeare_char"  # where nanoGPT's sample.py looks for meta.pkl
    assert isinstance(load_tokenizer(tmp_path / "again" / "ckpt.pt"), CharTokenizer)
    original = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in original.items())


def test_char_model_gguf_has_no_vocabulary_and_keeps_unquantizable_rows_f16(export, char_checkpoint, tmp_path):
    ckpt = char_checkpoint(tmp_path / "out")
    err = exported(export(f"--init_from={ckpt}", "--to=gguf", "--gguf_type=q8_0", f"--out={tmp_path / 'c.gguf'}"))
    assert "llama.cpp runs it on token ids only" in err
    fields, tensors = gguf_fields(tmp_path / "c.gguf")
    assert fields["tokenizer.ggml.model"] == "none" and fields["gpt2.vocab_size"] == 65
    assert "tokenizer.ggml.tokens" not in fields
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"  # rows of 64: blocks of 32 divide them
    assert tensors["blk.0.attn_qkv.weight"].tensor_type.name == "F16"  # rows of 16 do not


# ---------------------------------------------------------------------------------------------------------------
# --to=gguf, read back by the gguf package


def test_gguf_carries_gpt2_vocabulary(export, shared_dir, trained_dir, tmp_path):
    """From a nanoGPT checkpoint whose vocabulary nanoGPT padded to 50304: GPT-2's tokens, merges (rebuilt from
    tiktoken's ranks, the published ones) and pre-tokenizer, then unused tokens up to the embedding's size."""
    torch.manual_seed(0)
    ckpt = nanogpt_checkpoint(tmp_path / "out", GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2,
                                                                n_embd=32)))
    out = tmp_path / "m.gguf"
    err = exported(export(f"--init_from={ckpt}", "--to=gguf", f"--out={out}",
                          f"--tiktoken_file={shared_dir / 'gpt2.tiktoken'}"))
    assert "f16" in err  # the default type
    fields, tensors = gguf_fields(out)
    vocab = json.loads((trained_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (trained_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    assert fields["general.architecture"] == "gpt2"
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(50257, 50304)]
    assert fields["tokenizer.ggml.merges"] == merges
    # normal tokens, <|endoftext|> a control token, then the padding unused
    assert fields["tokenizer.ggml.token_type"] == [1] * EOT_ID + [3] + [5] * 47
    for special in ("bos", "eos", "unknown"):
        assert fields[f"tokenizer.ggml.{special}_token_id"] == EOT_ID
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"], fields["gpt2.block_count"],
            fields["gpt2.attention.head_count"], fields["gpt2.attention.layer_norm_epsilon"]) == (32, 32, 1, 2,
                                                                                                 pytest.approx(1e-5))
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tuple(tensors["token_embd.weight"].shape) == (32, 50304)  # ggml's order: the row length first


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_holds_our_weights(export, tmp_path, gguf_type):
    """A model of 100 tokens (no GPT-2 vocabulary to write, so the file reads back fast): the matrices in the
    type asked for, the norms and biases in float32, each tensor under llama.cpp's name."""
    from gguf.quants import dequantize

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=64))
    exported(export(f"--init_from={nanogpt_checkpoint(tmp_path / 'out', model)}", "--to=gguf",
                    f"--gguf_type={gguf_type}", f"--out={tmp_path / 'm.gguf'}"))
    fields, tensors = gguf_fields(tmp_path / "m.gguf")
    assert fields["gpt2.vocab_size"] == 100 and len(tensors) == 2 + 2 * 12 + 2
    ours = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()}
    names = [("token_embd", "wte", True), ("position_embd", "wpe", gguf_type == "f16"), ("output_norm", "ln_f", False)]
    for i in range(2):
        names += [(f"blk.{i}.{theirs}", f"h.{i}.{name}", not name.startswith("ln")) for theirs, name in [
            ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]]
    for theirs, name, matrix in names:
        w, t = ours[f"{name}.weight"], tensors[f"{theirs}.weight"]
        got = dequantize(t.data, t.tensor_type).reshape(w.shape)
        if not matrix or gguf_type == "f32":
            assert t.tensor_type.name == "F32" and np.array_equal(got, w), theirs
        elif gguf_type == "f16":
            assert t.tensor_type.name == "F16" and np.array_equal(got, w.astype(np.float16).astype(np.float32))
        else:  # q8_0: blocks of 32, each a float16 step max|x| / 127 times -127..127: half a step off at most,
            # plus the step's own rounding (2**-11 of it) times 127
            step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert t.tensor_type.name == "Q8_0"
            assert (np.abs(got - w).reshape(-1, 32) <= step * (0.5 + 127 * 2 ** -11)).all(), theirs
        if name not in ("wte", "wpe"):
            assert tensors[f"{theirs}.bias"].tensor_type.name == "F32"
            assert np.array_equal(tensors[f"{theirs}.bias"].data, ours[f"{name}.bias"])


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself, where llama-cpp-python is installed


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                   "llama-cpp-python builds llama.cpp): llama.cpp's own checks skipped")


def test_llama_cpp_tokenizes_as_we_do_and_f32_gives_our_greedy_tokens(llama_cpp, export, trained, trained_dir,
                                                                      tmp_path):
    out = tmp_path / "m.gguf"
    exported(export(f"--init_from={trained_dir}", "--to=gguf", "--gguf_type=f32", f"--out={out}"))
    enc = load_tokenizer(trained_dir)
    # float32 keys and values in its cache too: with its default float16 cache, a near-tie (logits 0.003 apart)
    # can go the other way
    llama = llama_cpp.Llama(str(out), n_ctx=256, n_threads=1, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                            type_v=llama_cpp.GGML_TYPE_F32)
    for text in TEXTS + SPLIT_TEXTS:
        ids = enc.encode(text, allowed_special={EOT})
        assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, text
        assert llama.detokenize(ids, special=True) == text.encode("utf-8")

    heldout = enc.encode((ROOT / "assets" / "heldout.txt").read_text(encoding="utf-8"))
    prompts = torch.tensor([heldout[i:i + 16] for i in range(0, 320, 32)])  # 10 prompts of 16 tokens
    expected = trained.generate(prompts, 32, temperature=0)[:, 16:].tolist()
    for prompt, ours in zip(prompts.tolist(), expected):
        theirs = []
        for token in llama.generate(prompt, top_k=1, temp=0.0, reset=True):
            theirs.append(token)
            if len(theirs) == 32:
                break
        assert theirs == ours


def test_llama_cpp_runs_a_padded_vocabulary_without_biases(llama_cpp, export, shared_dir, tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, bias=False)).eval()
    ckpt = nanogpt_checkpoint(tmp_path / "out", ours)
    exported(export(f"--init_from={ckpt}", "--to=gguf", "--gguf_type=f32", f"--out={tmp_path / 'p.gguf'}",
                    f"--tiktoken_file={shared_dir / 'gpt2.tiktoken'}"))
    llama = llama_cpp.Llama(str(tmp_path / "p.gguf"), n_ctx=32, n_threads=1, verbose=False, logits_all=True,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    assert llama.n_vocab() == 50304
    ids = llama.tokenize(b"Hello world, again", add_bos=False)
    assert ids == [15496, 995, 11, 757]
    llama.eval(ids)
    with torch.no_grad():
        expected = ours(torch.tensor([ids]))[0][0, -1].numpy()
    assert np.abs(llama.scores[len(ids) - 1] - expected).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a message, status 2, no traceback, and nothing written


def refused(result: tuple[int, str, str], message: str) -> None:
    status, out, err = result
    assert status == 2 and out == ""
    assert err.startswith("export.py: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--to=onnx"], "--to=onnx is not a format this exports: --to=hf"),
    ([], "--to=None is not a format this exports"),
    (["--to=gguf", "--gguf_type=q4_0"], "--gguf_type=q4_0 is not one of f32, f16, q8_0"),
    (["--to=hf", "--out="], "--out names what to write"),
    (["--to=nanogpt", "--out=OUT/ckpt.pt"], "--to=nanogpt writes a folder (nanoGPT's out_dir)"),
    (["--to=hf", "--init_from=OUT/nowhere"], "no such file or folder"),
    (["--to=hf", "--tiktoken_file=/no/such.tiktoken"], "tokenizer rank file /no/such.tiktoken does not exist"),
    (["--to=hf", "--forse"], "unknown setting 'forse': did you mean --force?"),
])
def test_bad_settings_and_sources(export, small_dir, tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    out = [f"--out={tmp_path / 'x'}"] if not any(a.startswith("--out=") for a in args) else []
    refused(export(f"--init_from={small_dir}", *out, *args), message)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_the_loader_refuses(export, random_checkpoint, tmp_path, capsys):
    source = random_checkpoint(tmp_path / "src", n_layer=1, n_head=2, n_embd=32, n_positions=32)
    capsys.readouterr()  # transformers' progress bar
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    refused(export(f"--init_from={source}", "--to=gguf", f"--out={tmp_path / 'm.gguf'}"),
            "is not a valid safetensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_existing_out_is_kept_without_force(export, small_dir, tmp_path):
    (tmp_path / "m.gguf").write_text("mine")
    refused(export(f"--init_from={small_dir}", "--to=gguf", f"--out={tmp_path / 'm.gguf'}"),
            "already exists: pass --force to replace it")
    (tmp_path / "hf").mkdir()
    refused(export(f"--init_from={small_dir}", "--to=hf", f"--out={tmp_path / 'hf'}"), "already exists")
    assert (tmp_path / "m.gguf").read_text() == "mine" and list((tmp_path / "hf").iterdir()) == []


def test_force_replaces_a_model_and_nothing_else(export, small_dir, char_checkpoint, tmp_path):
    out = tmp_path / "hf"
    exported(export(f"--init_from={small_dir}", "--to=hf", f"--out={out}"))
    exported(export(f"--init_from={char_checkpoint(tmp_path / 'char')}", "--to=hf", f"--out={out}", "--force"))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 65
    assert not TOKENIZER_FILES & {p.name for p in out.iterdir()}  # the old folder went whole, not file by file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["char", "hf"]  # nothing left aside

    (out / "notes.txt").write_text("mine")
    refused(export(f"--init_from={small_dir}", "--to=hf", f"--out={out}", "--force"),
            "holds more than a model's files (notes.txt): --force replaces only a model folder")
    refused(export(f"--init_from={small_dir}", "--to=gguf", f"--out={out}", "--force"),
            "is a folder, and --to=gguf writes a file")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("to", ["hf", "gguf", "nanogpt"])
def test_a_failed_write_leaves_nothing(export, small_dir, tmp_path, to):
    """A disk that takes no more (here a file size limit: writes past it fail, as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        result = export(f"--init_from={small_dir}", f"--to={to}", f"--out={tmp_path / 'out'}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    refused(result, f"could not write {tmp_path / 'out'}: ")
    assert "Nothing was written under that name" in result[2]
    assert list(tmp_path.iterdir()) == []  # nor a temporary file


def test_ctrl_c_while_writing_leaves_nothing(export, small_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"part")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    status, _, err = export(f"--init_from={small_dir}", "--to=hf", f"--out={tmp_path / 'hf'}")
    assert status == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_a_run_killed_while_writing_leaves_the_old_model_in_place(export, small_dir, tmp_path):
    """SIGKILL halfway through writing the weights, replacing an earlier export with --force: the earlier folder
    is untouched, and the half-written one is under a hidden temporary name only."""
    out = tmp_path / "hf"
    args = ["export.py", f"--init_from={small_dir}", "--to=hf", f"--out={out}", "--force"]
    exported(export(*args[1:]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = ("import os, runpy, signal, sys\n"
            "import safetensors.torch as st\n"
            "real = st.save_file\n"
            "def killed(tensors, path, metadata=None):\n"
            "    real(dict(list(tensors.items())[:3]), path, metadata=metadata)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "st.save_file = killed\n"
            f"sys.argv = {args!r}\n"
            "runpy.run_path('export.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, env={**os.environ,
                                                                                             "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    left = [p.name for p in tmp_path.iterdir() if p.name != "hf"]
    assert len(left) == 1 and left[0].startswith(".hf.partial-")


def test_help_lists_the_settings(export):
    status, out, _ = export("--help")
    assert status == 0 and "--to=None" in out and "--gguf_type='f16'" in out and "--force=False" in out
