"""Bad checkpoints, class by class: config.json and nanoGPT's model_args, safetensors files, sharded indexes and
competing weight files, pickles, and tensors of the wrong kind. Each case builds a damaged checkpoint, and
GPT.from_pretrained must raise a LoadError (a UsageError: one paragraph, exit status 2 in the scripts) whose
message names the file and the problem. sample.py end to end: a damaged model is named as the problem even
where the tokenizer would fail too, and no traceback reaches the user."""

import io
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from errors import UsageError
from load import LoadError, expected_shapes, read_checkpoint
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
DELETE = object()  # a config value that means: leave the key out


def linked_model(folder: Path, source: Path, *leave_out: str) -> Path:
    """folder, holding links to the files of the model in source except those named: each case then writes its
    own damaged file beside the intact others, without copying the weights."""
    folder.mkdir(exist_ok=True)
    for file in source.iterdir():
        if file.name not in leave_out:
            (folder / file.name).symlink_to(file)
    return folder


def with_config(folder: Path, source: Path, **changes) -> Path:
    config = json.loads((source / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    linked_model(folder, source, "config.json")
    (folder / "config.json").write_text(json.dumps(config))  # NaN is written as JSON's NaN, which json reads
    return folder


def with_file(name: str, content: bytes) -> Callable[[Path, Path], Path]:
    """A case: the model with the file `name` replaced by content."""
    def build(folder: Path, source: Path) -> Path:
        linked_model(folder, source, name, "model.safetensors" if name.endswith(".bin") else "")
        (folder / name).write_bytes(content)
        return folder
    return build


def with_tensors(change: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    """A case: the model's own tensors, changed in place by change, saved again as model.safetensors."""
    def build(folder: Path, source: Path) -> Path:
        tensors = load_file(source / "model.safetensors")
        change(tensors)
        linked_model(folder, source, "model.safetensors")
        save_file(tensors, folder / "model.safetensors")
        return folder
    return build


def set_tensor(name: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(name, value)


def poisoned(value: float) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors["transformer.h.1.mlp.c_fc.bias"] = tensors["transformer.h.1.mlp.c_fc.bias"].clone()
        tensors["transformer.h.1.mlp.c_fc.bias"][3] = value
    return change


def small_safetensors() -> bytes:
    return save({"a": torch.ones(4), "b": torch.zeros(2, 3)})


def with_header(edit: Callable[[dict], None]) -> bytes:
    """small_safetensors with its JSON header edited."""
    raw = small_safetensors()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def duplicate_entry(header: dict) -> None:
    header["b"] = dict(header["a"])  # two names, one byte range


def overlapping_entries(header: dict) -> None:
    header["b"]["data_offsets"] = [8, 32]


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:4e2f0b2e8b3c5d7f3d1b1c8e9a0f6e5d4c3b2a19"
               b"08f7e6d5c4b3a29180f7e6d5\nsize 548105171\n")
WEB_PAGE = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"


def torch_saved(value: object, legacy: bool = False) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"torch-saved-{os.getpid()}.bin"
    torch.save(value, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.unlink()
    return data


def shifted_record() -> bytes:
    """A torch.save archive whose second tensor's local header claims 64 more bytes of padding: torch.load would
    read that tensor 64 bytes late, silently."""
    data = bytearray(torch_saved({"a": torch.arange(64.0), "b": torch.arange(64.0, 128.0)}))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        at = next(info.header_offset for info in archive.infolist() if info.filename.endswith("/data/1"))
    extra_length = struct.unpack("<H", data[at + 28:at + 30])[0]
    data[at + 28:at + 30] = struct.pack("<H", extra_length + 64)
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------------
# config.json


CONFIG_CASES = [
    ("not_json", with_file("config.json", b'{"model_type": "gpt2", n_layer: 2}'), r"config.json is not JSON text"),
    ("empty", with_file("config.json", b""), r"config.json is empty"),
    ("blank", with_file("config.json", b"  \n"), r"config.json is empty"),
    ("a_list", with_file("config.json", b"[2, 2, 64]"), r"config.json holds a JSON list, not an object"),
    ("not_utf8", with_file("config.json", b'{"model_type": "gpt2\xe9"}'), r"config.json is not JSON text.*utf-8"),
    ("deeply_nested", with_file("config.json", b"[" * 100000), r"config.json is not JSON text"),
    ("no_model_type", lambda f, s: with_config(f, s, model_type=DELETE), r"config.json describes a model without"),
    ("missing_n_layer", lambda f, s: with_config(f, s, n_layer=DELETE), r"config.json lacks n_layer"),
    ("missing_sizes", lambda f, s: with_config(f, s, n_head=DELETE, vocab_size=DELETE),
     r"config.json lacks vocab_size, n_head"),
    ("string", lambda f, s: with_config(f, s, n_head="2"), r"config.json: n_head is '2', not a whole number"),
    ("float", lambda f, s: with_config(f, s, n_embd=64.0), r"config.json: n_embd is 64.0, not a whole number"),
    ("boolean", lambda f, s: with_config(f, s, n_layer=True), r"config.json: n_layer is True, not a whole number"),
    ("null", lambda f, s: with_config(f, s, vocab_size=None), r"config.json: vocab_size is None, not a whole"),
    ("nan", lambda f, s: with_config(f, s, n_positions=math.nan), r"config.json: n_positions is nan, not a whole"),
    ("zero", lambda f, s: with_config(f, s, n_head=0), r"config.json: n_head is 0, not a whole number of at least"),
    ("negative", lambda f, s: with_config(f, s, n_layer=-2), r"config.json: n_layer is -2"),
    ("million_layers", lambda f, s: with_config(f, s, n_layer=10**6),
     r"config.json gives n_layer=1000000, but the weights in .*model.safetensors hold 2 blocks"),
    ("absurd_width", lambda f, s: with_config(f, s, n_embd=2**40),
     r"do not fit the config in .*config.json: mis-shaped: .*\(expected \(50257, 1099511627776\)\)"),
    ("absurd_vocabulary", lambda f, s: with_config(f, s, vocab_size=10**12),
     r"mis-shaped: .*transformer.wte.weight \(50257, 64\) \(expected \(1000000000000, 64\)\)"),
    ("wrong_context", lambda f, s: with_config(f, s, n_positions=1024),
     r"mis-shaped: transformer.wpe.weight \(64, 64\) \(expected \(1024, 64\)\)"),
    ("heads_do_not_divide", lambda f, s: with_config(f, s, n_head=3),
     r"config.json: n_embd \(64\) is not a multiple of n_head \(3\)"),
    ("other_architecture", lambda f, s: with_config(f, s, model_type="llama"), r"describes a 'llama' model"),
    ("other_epsilon", lambda f, s: with_config(f, s, layer_norm_epsilon=1e-6), r"layer_norm_epsilon"),
]


def in_place_of(name: str, what: str) -> Callable[[Path, Path], Path]:
    """A case: a folder, or a symbolic link to nothing (what="broken_link"), where the file `name` should be."""
    def build(folder: Path, source: Path) -> Path:
        linked_model(folder, source, name)
        if what == "folder":
            (folder / name).mkdir()
        else:
            (folder / name).symlink_to(folder / "blobs" / "0123abcd")
        return folder
    return build


CONFIG_CASES += [
    ("a_folder", in_place_of("config.json", "folder"), r"config.json is a folder where a file should be"),
    ("broken_link", in_place_of("config.json", "broken_link"),
     r"config.json is a symbolic link to .*blobs/0123abcd, which does not exist"),
]


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT's ckpt.pt


def nanogpt_checkpoint(model_args: object = None, model: object = None, whole: object = None) -> Callable:
    """A case: a small nanoGPT checkpoint, with model_args, model or the whole saved object replaced."""
    def build(folder: Path, source: Path) -> Path:
        config = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, bias=False, dropout=0.0)
        args = vars(config) if model_args is None else model_args(vars(config))
        state = GPT(config).state_dict() if model is None else model
        folder.mkdir()
        torch.save({"model": state, "model_args": args} if whole is None else whole, folder / "ckpt.pt")
        return folder / "ckpt.pt"
    return build


def args_with(**changes) -> Callable[[dict], dict]:
    return lambda args: {k: v for k, v in {**args, **changes}.items() if v is not DELETE}


NANOGPT_CASES = [
    ("model_args_a_list", nanogpt_checkpoint(model_args=lambda args: list(args.values())),
     r"ckpt.pt \(its model_args\) is a list, not a dict"),
    ("missing_n_embd", nanogpt_checkpoint(model_args=args_with(n_embd=DELETE)), r"model_args\) lacks n_embd"),
    ("string_n_layer", nanogpt_checkpoint(model_args=args_with(n_layer="2")), r"n_layer is '2', not a whole number"),
    ("bias_not_bool", nanogpt_checkpoint(model_args=args_with(bias="no")), r"bias is 'no', not True or False"),
    ("missing_bias", nanogpt_checkpoint(model_args=args_with(bias=DELETE)), r"bias is missing, not True or False"),
    ("nan_dropout", nanogpt_checkpoint(model_args=args_with(dropout=math.nan)), r"dropout is nan, not a number"),
    ("million_layers", nanogpt_checkpoint(model_args=args_with(n_layer=10**6)),
     r"model_args\) gives n_layer=1000000, but the weights in .*ckpt.pt hold 2 blocks"),
    ("not_a_dict", nanogpt_checkpoint(whole=[torch.zeros(2)]), r"ckpt.pt is not a nanoGPT checkpoint"),
    ("model_a_list", nanogpt_checkpoint(model=[torch.zeros(2)]), r"ckpt.pt \(its 'model'\) holds a list"),
    ("model_empty", nanogpt_checkpoint(model={}), r"ckpt.pt \(its 'model'\) holds an empty dict"),
    ("integer_weights", nanogpt_checkpoint(model={"transformer.wte.weight": torch.zeros(40, 16, dtype=torch.int32)}),
     r"ckpt.pt: the tensor transformer.wte.weight is int32, not floating point"),
]


# ---------------------------------------------------------------------------------------------------------------
# Weight files: safetensors, indexes, competing files, pickles, tensors


def sharded(weight_map: object, shards: dict[str, bytes]) -> Callable[[Path, Path], Path]:
    """A case: the model's config beside an index with this weight_map and these shard files."""
    def build(folder: Path, source: Path) -> Path:
        linked_model(folder, source, "model.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        for name, data in shards.items():
            (folder / name).write_bytes(data)
        return folder
    return build


def split_shards(folder: Path, source: Path) -> Path:
    """The model's tensors in two shards, but the token embedding in both."""
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    first, second = names[:len(names) // 2] + ["transformer.wte.weight"], names[len(names) // 2:]
    linked_model(folder, source, "model.safetensors")
    save_file({n: tensors[n] for n in first}, folder / "a.safetensors")
    save_file({n: tensors[n] for n in second}, folder / "b.safetensors")
    weight_map = {**{n: "a.safetensors" for n in first}, **{n: "b.safetensors" for n in second}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def two_candidates(folder: Path, source: Path) -> Path:
    linked_model(folder, source, "model.safetensors")
    (folder / "model_v0.safetensors").symlink_to(source / "model.safetensors")
    (folder / "model_v1.safetensors").symlink_to(source / "model.safetensors")
    return folder


def untied_head(tensors: dict) -> None:
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0


WEIGHT_CASES = [
    ("safetensors_longer_than_file", with_file("model.safetensors", small_safetensors()[:-5]),
     r"model.safetensors is not a valid safetensors file .*truncated or damaged; download it again"),
    ("safetensors_huge_header", with_file("model.safetensors", struct.pack("<Q", 2**60) + small_safetensors()[8:]),
     r"model.safetensors is not a valid safetensors file \(its header claims 1,152,921,504,606,846,976 bytes, "
     r"more than the whole file's"),
    ("safetensors_overlapping", with_file("model.safetensors", with_header(overlapping_entries)),
     r"model.safetensors is not a valid safetensors file \(.*invalid offset"),
    ("safetensors_duplicate", with_file("model.safetensors", with_header(duplicate_entry)),
     r"model.safetensors is not a valid safetensors file"),
    ("safetensors_header_not_json", with_file("model.safetensors", struct.pack("<Q", 6) + b"{nope}"),
     r"model.safetensors is not a valid safetensors file"),
    ("safetensors_five_bytes", with_file("model.safetensors", small_safetensors()[:5]),
     r"model.safetensors is not a valid safetensors file"),
    ("safetensors_empty", with_file("model.safetensors", b""), r"model.safetensors is empty \(0 bytes\)"),
    ("safetensors_lfs_pointer", with_file("model.safetensors", LFS_POINTER),
     r"model.safetensors is a git-LFS pointer.*\(548,105,171 bytes\).*git lfs pull"),
    ("safetensors_web_page", with_file("model.safetensors", WEB_PAGE),
     r"not a valid safetensors file \(it is text, beginning '<!DOCTYPE html>"),
    ("safetensors_a_folder", in_place_of("model.safetensors", "folder"),
     r"model.safetensors is a folder where a file should be"),
    ("safetensors_broken_link", in_place_of("model.safetensors", "broken_link"),
     r"model.safetensors is a symbolic link to .*blobs/0123abcd, which does not exist"),
    ("index_missing_shard", sharded({"transformer.wte.weight": "model-00001-of-00002.safetensors",
                                     "transformer.wpe.weight": "model-00002-of-00002.safetensors"},
                                    {"model-00001-of-00002.safetensors": small_safetensors()}),
     r"index.json names shards that are not in .*: model-00002-of-00002.safetensors"),
    ("index_without_weight_map", sharded(None, {}), r"index.json has no weight_map"),
    ("index_weight_map_a_list", sharded(["model.safetensors"], {}), r"index.json has no weight_map"),
    ("index_not_json", with_file("model.safetensors.index.json", b"{'weight_map':"),
     r"model.safetensors.index.json is not JSON text"),
    ("tensor_in_two_shards", split_shards, r"the tensor transformer.wte.weight is both in .*a.safetensors and in "
                                           r".*b.safetensors"),
    ("two_candidates", two_candidates, r"holds 2 weight files \(model_v0.safetensors, model_v1.safetensors\) and "
                                       r"no index"),
    ("bin_empty", with_file("pytorch_model.bin", b""), r"pytorch_model.bin is empty"),
    ("bin_lfs_pointer", with_file("pytorch_model.bin", LFS_POINTER), r"pytorch_model.bin is a git-LFS pointer"),
    ("bin_web_page", with_file("pytorch_model.bin", WEB_PAGE),
     r"pytorch_model.bin is not a PyTorch checkpoint: it is text, beginning '<!DOCTYPE html>"),
    ("bin_garbage", with_file("pytorch_model.bin", bytes(range(7, 256)) * 4),
     r"pytorch_model.bin is not a PyTorch checkpoint: it is binary data beginning 07 08 09"),
    ("bin_truncated_zip", with_file("pytorch_model.bin", torch_saved({"a": torch.ones(100)})[:300]),
     r"pytorch_model.bin is a damaged zip archive"),
    ("bin_truncated_legacy", with_file("pytorch_model.bin", torch_saved({"a": torch.ones(100)}, legacy=True)[:200]),
     r"pytorch_model.bin is truncated or damaged"),
    ("bin_shifted_record", with_file("pytorch_model.bin", shifted_record()),
     r"pytorch_model.bin is a damaged zip archive .*local header of .*data/1 is damaged"),
    ("bin_safetensors_inside", with_file("pytorch_model.bin", small_safetensors()),
     r"pytorch_model.bin is not a PyTorch checkpoint: it is a safetensors file"),
    ("bin_plain_pickle", with_file("pytorch_model.bin", pickle.dumps({"wte.weight": [0.0, 1.0]})),
     r"pytorch_model.bin is a plain Python pickle, not a file torch.save wrote"),
    ("bin_empty_dict", with_file("pytorch_model.bin", torch_saved({})), r"pytorch_model.bin holds an empty dict"),
    ("bin_a_list", with_file("pytorch_model.bin", torch_saved([torch.ones(2)])), r"pytorch_model.bin holds a list"),
    ("bin_not_tensors", with_file("pytorch_model.bin", torch_saved({"wte.weight": [1.0], 3: torch.ones(1)})),
     r"pytorch_model.bin holds entries that are not named tensors \('wte.weight', 3\)"),
    ("int64_tensor", with_tensors(set_tensor("transformer.h.0.ln_1.weight", torch.ones(64, dtype=torch.int64))),
     r"model.safetensors: the tensor transformer.h.0.ln_1.weight is int64, not floating point"),
    ("bool_tensor", with_tensors(set_tensor("transformer.ln_f.bias", torch.ones(64, dtype=torch.bool))),
     r"the tensor transformer.ln_f.bias is bool, not floating point"),
    ("complex_tensor", with_tensors(set_tensor("transformer.ln_f.weight", torch.ones(64, dtype=torch.complex64))),
     r"the tensor transformer.ln_f.weight is complex64, not floating point"),
    ("nan_weight", with_tensors(poisoned(math.nan)),
     r"model.safetensors: the tensor transformer.h.1.mlp.c_fc.bias holds 1 NaN or infinite values"),
    ("infinite_weight", with_tensors(poisoned(-math.inf)), r"transformer.h.1.mlp.c_fc.bias holds 1 NaN or infinite"),
    ("untied_head", with_tensors(untied_head), r"lm_head.weight differs from the token embedding"),
]


def safetensors_file_alone(folder: Path, source: Path) -> Path:
    return linked_model(folder, source) / "model.safetensors"


def not_a_model_folder(folder: Path, source: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("weights to follow")
    return folder


def broken_link_as_the_model(folder: Path, source: Path) -> Path:
    folder.mkdir()
    (folder / "gpt2-local").symlink_to(folder / "moved-away")
    return folder / "gpt2-local"


WEIGHT_CASES += [
    ("init_from_a_broken_link", broken_link_as_the_model, r"gpt2-local is a symbolic link to .*moved-away, which "
                                                          r"does not exist"),
    ("safetensors_file_alone", safetensors_file_alone, r"model.safetensors is a safetensors file alone, without "
                                                       r"the config.json"),
    ("no_model_files", not_a_model_folder, r"is not a model folder: .* it holds notes.txt"),
]


@pytest.mark.parametrize("build, message", [pytest.param(build, message, id=f"{group}-{name}")
                                            for group, cases in [("config", CONFIG_CASES),
                                                                 ("nanogpt", NANOGPT_CASES),
                                                                 ("weights", WEIGHT_CASES)]
                                            for name, build, message in cases])
def test_bad_checkpoint_is_refused_with_a_message(tmp_path, small_dir, build, message):
    path = build(tmp_path / "model", small_dir)
    with pytest.raises(LoadError, match=message) as refused:
        GPT.from_pretrained(str(path))
    assert isinstance(refused.value, UsageError)
    assert str(tmp_path / "model") in str(refused.value)  # the message names the file (or the folder)


# ---------------------------------------------------------------------------------------------------------------
# What does load: half precision as float32, the one weight file a folder means


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_float32(tmp_path, small_dir, dtype):
    tensors = {name: t.to(dtype) for name, t in load_file(small_dir / "model.safetensors").items()}
    linked_model(tmp_path, small_dir, "model.safetensors")
    save_file(tensors, tmp_path / "model.safetensors")
    model = GPT.from_pretrained(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    weight = tensors["transformer.h.0.attn.c_attn.weight"].float().t()  # Conv1D's (in, out) as Linear's
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, weight)


def test_bfloat16_nanogpt_checkpoint_loads_as_float32(tmp_path):
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
    trained = GPT(config).to(torch.bfloat16)
    torch.save({"model": trained.state_dict(), "model_args": vars(config)}, tmp_path / "ckpt.pt")
    model = GPT.from_pretrained(str(tmp_path / "ckpt.pt"))
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    assert torch.equal(model.transformer.wte.weight, trained.transformer.wte.weight.float())
    assert model.lm_head.weight is model.transformer.wte.weight


def other_weights(source: Path) -> dict:
    return {name: t + 1.0 for name, t in load_file(source / "model.safetensors").items()}


def test_canonical_file_wins_over_a_stray_one(tmp_path, small_dir):
    linked_model(tmp_path, small_dir)
    save_file(other_weights(small_dir), tmp_path / "model_v0.safetensors")
    loaded = read_checkpoint(tmp_path)[1]
    assert torch.equal(loaded["transformer.wpe.weight"], load_file(small_dir / "model.safetensors")[
        "transformer.wpe.weight"])


def test_index_wins_over_a_stray_file(tmp_path, small_dir):
    linked_model(tmp_path, small_dir, "model.safetensors")
    tensors = load_file(small_dir / "model.safetensors")
    save_file(tensors, tmp_path / "model-00001-of-00001.safetensors")
    save_file(other_weights(small_dir), tmp_path / "model.safetensors")  # a stray, though canonically named
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(read_checkpoint(tmp_path)[1]["transformer.wpe.weight"], tensors["transformer.wpe.weight"])


def test_one_weight_file_of_another_name_loads(tmp_path, small_dir):
    linked_model(tmp_path, small_dir, "model.safetensors")
    (tmp_path / "gpt2-finetuned.safetensors").symlink_to(small_dir / "model.safetensors")
    assert read_checkpoint(tmp_path)[0]["n_layer"] == 2


@pytest.mark.parametrize("dropout", [math.nan, -0.1, 1.0, "0.1", None])
def test_override_dropout_must_be_a_probability(small_dir, dropout):
    with pytest.raises(ValueError, match=r"override_args\['dropout'\] must be a number from 0 to below 1"):
        GPT.from_pretrained(str(small_dir), override_args={"dropout": dropout})


@pytest.mark.parametrize("bias", [True, False])
def test_expected_shapes_are_model_py_state_dict(bias):
    """load.py derives the shapes from the config without importing model.py: held here to model.py's own."""
    config = GPTConfig(block_size=24, vocab_size=50, n_layer=3, n_head=4, n_embd=32, bias=bias)
    with torch.device("meta"):
        model = GPT(config)
    assert expected_shapes(vars(config)) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# sample.py end to end


def run_sample(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("GPT2_TIKTOKEN_FILE", None)
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def config_only(folder: Path, source: Path) -> Path:
    """config.json and nothing else: no weights, and no vocab.json for a tokenizer either."""
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    return folder


@pytest.mark.parametrize("build, message", [
    pytest.param(config_only, r"model has config.json but no weights", id="no_weights_no_tokenizer"),
    pytest.param(with_file("config.json", b"[]"), r"config.json holds a JSON list", id="config_a_list"),
    pytest.param(with_file("model.safetensors", LFS_POINTER), r"git-LFS pointer.*git lfs pull", id="lfs_pointer"),
    pytest.param(with_file("pytorch_model.bin", WEB_PAGE), r"pytorch_model.bin is not a PyTorch checkpoint",
                 id="web_page_bin"),
])
def test_sample_py_names_the_broken_model(tmp_path, small_dir, build, message):
    path = build(tmp_path / "model", small_dir)
    result = run_sample(f"--init_from={path}", "--max_new_tokens=2", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith("sample.py: error: ")
    assert re.search(message, result.stderr), result.stderr


# ---------------------------------------------------------------------------------------------------------------
# init_from names nothing that can be found: empty, or in a home folder that cannot be found


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_init_from_is_named_as_empty(run_script, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # Path("") is the current folder: a model here must not be loaded in its place
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LoadError, match="init_from is empty"):
        GPT.from_pretrained(name)
    status, out, err = run_script("sample.py", f"--init_from={name}")
    assert (status, out) == (2, "") and "Traceback" not in err
    assert err.startswith("sample.py: error: init_from is empty") and "a local model folder" in err


@pytest.fixture
def no_home(monkeypatch):
    """A process whose home cannot be found: HOME unset and no entry in the user database, as in a container run
    under a user id of its own. huggingface_hub, imported then, keeps '~' in its cache path."""
    import pwd

    from huggingface_hub import constants

    def no_such_user(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_such_user)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "~/.cache/huggingface/hub")


@pytest.mark.parametrize("name, message", [
    ("~nosuchuser-of-this-test/model", "cannot tell which folder '~nosuchuser-of-this-test/model' means: there is no "
                                       "user 'nosuchuser-of-this-test' on this machine: give the model's path in full"),
    ("~/model", "cannot tell which folder '~/model' means: HOME is not set, and the system's user database gives "
                "this user no home folder: set HOME, or give the model's path in full"),
    ("gpt2", "'openai-community/gpt2' is a Hugging Face hub model, and huggingface_hub keeps its downloads in "
             "~/.cache/huggingface/hub, in a home folder that cannot be found: HOME is not set"),
    ("someone/their-gpt2", "'someone/their-gpt2' is a Hugging Face hub model"),
])
def test_a_home_that_cannot_be_found(run_script, no_home, tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match=re.escape(message)):
        GPT.from_pretrained(name)
    status, out, err = run_script("sample.py", f"--init_from={name}")
    assert (status, out) == (2, "") and "Traceback" not in err
    assert err.startswith(f"sample.py: error: {message}")
    if not name.startswith("~"):
        assert "Set HF_HOME (or HOME) to a folder for its cache, or give the model's folder as a full path" in err
