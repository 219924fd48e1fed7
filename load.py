"""
Loading GPT-2 checkpoints: names, folders and files in; GPTConfig's arguments and a state dict in our names out.

Every checkpoint format lives here: hub names and repo ids (through huggingface_hub's cache), Hugging Face folders
(safetensors, sharded or not, and pytorch_model.bin), and nanoGPT's ckpt.pt. Nothing here knows the network's
math, and nothing imports model.py: GPT.from_pretrained hands build_pretrained the way to make its network.

Nothing in a checkpoint is trusted. The config's values are checked for type and range, then against the shapes
of the weights, before anything is built; each weight file is checked for what it really is (a git-LFS pointer, a
web page, a truncated download) before it is parsed; tensors must be floating point and finite. Every refusal is
a LoadError naming the file, what is wrong with it and what to do.
"""

import ctypes
import functools
import json
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn

from errors import UsageError
from linear import quantized_from


HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some checkpoints store per block
CONFIG_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")  # GPTConfig's fields
SIZES = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")  # nanoGPT's model_args names of the sizes
HF_SIZES = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")  # the same in a Hugging Face config.json
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded checkpoints' indexes
CANONICAL_NAMES = ("model.safetensors", "pytorch_model.bin")  # the weight file of an unsharded checkpoint
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip archive
TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # the older format opens with this number
LFS_POINTER = b"version https://git-lfs"  # a git-LFS pointer file, what a clone without git-lfs leaves


class LoadError(UsageError):
    """A checkpoint could not be loaded; the message says why and what to do instead."""


def build_pretrained(name_or_path: str, override_args: Optional[dict], make_model: Callable[[dict], nn.Module],
                     quantize: Optional[str]) -> nn.Module:
    """GPT.from_pretrained's building: the model that make_model(config_args) makes on the meta device (no memory,
    no init), then its tensors read from the checkpoint one at a time, each in the layout the model holds it in:
    with quantize ("int8" or "fp16"), every Linear rounded as its weight is read (linear.quantized_from), so the
    float32 model is never whole in memory. The head is tied to the token embedding, as GPT-2's is."""
    config_args, checkpoint = read_pretrained(name_or_path, override_args)
    with torch.device("meta"):
        model = make_model(config_args)
    read = set()
    if quantize is not None:
        def read_to_round(name: str, rows: Optional[slice]) -> torch.Tensor:
            hand_back_freed_memory()  # the float32 copies of the tensors rounded before this one
            return checkpoint.read(name, rows)

        read = quantized_from(model, read_to_round, quantize)
    # The rest in float32 (a tied pair read once).
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta and name not in read and name != "lm_head.weight":
            state[name] = checkpoint.read(name, like=t)
    model.load_state_dict(state, assign=True, strict=False)
    if quantize is None:  # assign=True left the head on the meta device: tie it again
        model.lm_head.weight = model.transformer.wte.weight
    hand_back_freed_memory()
    return model


def read_pretrained(name_or_path: str, override_args: Optional[dict] = None) -> tuple[dict, "Checkpoint"]:
    """GPT.from_pretrained's reading: resolve the name, check the files; the GPTConfig arguments and the checked
    checkpoint, whose tensors are read as the model asks for them."""
    override_args = dict(override_args or {})
    if set(override_args) - {"dropout"}:
        raise ValueError(f"override_args may set only 'dropout', got {sorted(override_args)}")
    if "dropout" in override_args and not is_dropout(override_args["dropout"]):
        raise ValueError(f"override_args['dropout'] must be a number from 0 to below 1, got "
                         f"{override_args['dropout']!r}")
    config_args, checkpoint = open_checkpoint(resolve_checkpoint(str(name_or_path)))
    config_args.update(override_args)
    return config_args, checkpoint


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local path as given, else a hub name or repo id fetched into (or found in) huggingface_hub's cache."""
    if not name_or_path.strip():  # Path("") is the current folder: an empty setting would load whatever is here
        raise LoadError(f"init_from is empty{' (only spaces)' if name_or_path else ''}: name the model to load: one "
                        f"of {', '.join(HUB_NAMES)}, a Hugging Face hub repo id such as 'openai-community/gpt2', a "
                        f"local model folder, or a nanoGPT ckpt.pt")
    problem = home_problem(name_or_path)
    if problem is not None:
        fix = "give the model's path in full" if name_or_path[1:2].strip("/" + os.sep) else \
            "set HOME, or give the model's path in full"
        raise LoadError(f"cannot tell which folder '{name_or_path}' means: {problem}: {fix}")
    path = Path(name_or_path).expanduser()
    if path.is_symlink() and not path.exists():
        check_file(path)  # refuses the broken link, saying so
    if path.exists():
        if path.is_dir() and not _has_weights(path) and (name_or_path in HUB_NAMES or name_or_path.count("/") == 1):
            repo = HUB_NAMES.get(name_or_path, name_or_path)
            raise LoadError(
                f"'{name_or_path}' is taken as the local folder {path.resolve()}, which holds no weights. It hides "
                f"the hub model of that name: remove or rename the folder, or ask for the hub repository by its "
                f"full id ('{repo}') from a directory without such a folder.")
        if path.is_dir() and (name_or_path in HUB_NAMES or name_or_path.count("/") == 1):
            warnings.warn(f"'{name_or_path}' loaded from the local folder {path.resolve()}, not from the hub; "
                          f"rename the folder to reach the hub model", stacklevel=3)
        return path
    if name_or_path.endswith((".pt", ".bin", ".safetensors")) or name_or_path.startswith((".", "/", "~")):
        raise LoadError(f"no such file or folder: {name_or_path}")
    if name_or_path not in HUB_NAMES and name_or_path.count("/") != 1:
        raise LoadError(f"unknown model '{name_or_path}': use one of {', '.join(HUB_NAMES)}, a Hugging Face hub "
                        f"repo id such as 'openai-community/gpt2', a local model folder, or a nanoGPT ckpt.pt")
    return download_from_hub(HUB_NAMES.get(name_or_path, name_or_path))


def download_from_hub(repo_id: str) -> Path:
    """Fetch config, tokenizer files and weights (safetensors, else the pickle) through huggingface_hub's cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    problem = home_problem(constants.HF_HUB_CACHE)
    if problem is not None:  # huggingface_hub would stop in pathlib's RuntimeError
        raise LoadError(f"'{repo_id}' is a Hugging Face hub model, and huggingface_hub keeps its downloads in "
                        f"{constants.HF_HUB_CACHE}, in a home folder that cannot be found: {problem}. Set HF_HOME "
                        f"(or HOME) to a folder for its cache, or give the model's folder as a full path")
    wanted = ["config.json", "generation_config.json", "vocab.json", "merges.txt"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=wanted + ["*.safetensors", "*.safetensors.index.json"]))
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo_id, allow_patterns=wanted + ["pytorch_model*.bin",
                                                                              "pytorch_model.bin.index.json"]))
    except RepositoryNotFoundError:
        raise LoadError(f"the Hugging Face hub has no model '{repo_id}' (or it is private): check the name") from None
    except HFValidationError as e:
        raise LoadError(f"'{repo_id}' is not a valid hub repo id or local path: {e}") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise LoadError(
            f"could not fetch '{repo_id}' from the Hugging Face hub and it is not in the local cache ({type(e).__name__}). "
            f"Connect once to download it (it is cached for later offline use), or pass a local folder that "
            f"holds config.json and model.safetensors, e.g. --init_from=path/to/gpt2") from None
    return folder


def home_problem(path: str) -> Optional[str]:
    """Why the home folder that path starts with (~ or ~user) cannot be found, or None where it can or there is none
    (pathlib's expanduser raises a bare RuntimeError there; os.path's leaves the ~ as it is)."""
    if not path.startswith("~") or not os.path.expanduser(path).startswith("~"):
        return None
    user = path[1:].split("/")[0].split(os.sep)[0]
    if user:
        return f"there is no user '{user}' on this machine"
    return "HOME is not set, and the system's user database gives this user no home folder"


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or (folder / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------------------------------
# Which files a checkpoint is, and reading them into a checked state dict


def check_checkpoint(path: Path) -> None:
    """The cheap checks of a resolved checkpoint, reading no weights: its config is valid and its weight files
    are there and are what their names say. sample.py runs them before it looks for a tokenizer, so that a
    broken model folder is reported as such, not as a missing tokenizer."""
    config_file, weight_files = locate_checkpoint(path)
    if config_file is not None:
        config_from_hf(config_file)
    for file in weight_files:
        if file.suffix == ".safetensors":
            safetensors_names(file)
        else:
            torch_file_kind(file)


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """The GPTConfig arguments and the whole state dict (our names and layout, float32) of a Hugging Face folder or
    a nanoGPT checkpoint."""
    config_args, checkpoint = open_checkpoint(path)
    return config_args, checkpoint.state_dict()


def open_checkpoint(path: Path) -> tuple[dict, "Checkpoint"]:
    """The GPTConfig arguments and the checkpoint's tensors, listed and checked against each other before any is
    read or anything is built from them."""
    config_file, weight_files = locate_checkpoint(path)
    if config_file is None:
        config_args, tensors = read_nanogpt_checkpoint(weight_files[0])
        config_source = f"{weight_files[0]} (its model_args)"
    else:
        config_args, tensors = config_from_hf(config_file), hf_tensors(weight_files)
        config_source = str(config_file)
    checkpoint = Checkpoint(tensors)
    weights_source = weight_files[0] if len(weight_files) == 1 else path
    check_state_dict(config_args, checkpoint.shapes, config_source, str(weights_source))
    return config_args, checkpoint


def locate_checkpoint(path: Path) -> tuple[Optional[Path], list[Path]]:
    """The config file (None for nanoGPT's ckpt.pt, which holds its own) and the weight files to read."""
    if not path.is_dir():
        check_file(path)
        if path.suffix == ".safetensors":
            raise LoadError(f"{path} is a safetensors file alone, without the config.json that describes it: pass "
                            f"the folder that holds both (--init_from={path.parent})")
        return None, [path]
    if os.path.lexists(path / "config.json"):  # lexists: a broken link is there, and is refused as one
        return path / "config.json", hf_weight_files(path)
    if os.path.lexists(path / "ckpt.pt"):
        return None, [path / "ckpt.pt"]
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise LoadError(f"{path} is not a model folder: it needs config.json with model.safetensors or "
                    f"pytorch_model.bin (Hugging Face layout), or a nanoGPT ckpt.pt; it holds {found}")


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: the shards its index names, else its canonical weight file, else
    its one weight file. Several candidates and no index to choose are refused, never merged."""
    for name in INDEX_NAMES:
        if os.path.lexists(folder / name):
            return index_shards(folder / name)
    for name in CANONICAL_NAMES:
        if os.path.lexists(folder / name):
            return [folder / name]
    candidates = sorted({*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")})
    if len(candidates) > 1:
        raise LoadError(f"{folder} holds {len(candidates)} weight files ({', '.join(p.name for p in candidates)}) "
                        f"and no index naming which to read, nor a {' or '.join(CANONICAL_NAMES)}: keep only the "
                        f"model's own weights there (or its index, if they are shards of one checkpoint)")
    if not candidates:
        raise LoadError(f"{folder} has config.json but no weights: it needs model.safetensors or pytorch_model.bin")
    return candidates


def index_shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, each of them present."""
    index_data = read_json(index)
    weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise LoadError(f"{index} has no weight_map naming the shard file of each tensor: it is damaged or not a "
                        f"checkpoint index; restore it from the model's repository")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not os.path.lexists(shard)]
    if missing:
        raise LoadError(f"{index} names shards that are not in {index.parent}: {', '.join(missing)}. The download "
                        f"is incomplete: fetch the missing files (or the whole model) again")
    return shards


# ---------------------------------------------------------------------------------------------------------------
# Configs: a Hugging Face config.json or nanoGPT's model_args, checked value by value


def config_from_hf(config_file: Path) -> dict:
    """A Hugging Face config.json as GPTConfig's arguments (GPT-2's options only)."""
    hf = read_json(config_file)
    if not isinstance(hf, dict):
        raise LoadError(f"{config_file} holds a JSON {type(hf).__name__}, not an object of settings: it is not a "
                        f"model config; restore it from the model's repository")
    if hf.get("model_type") != "gpt2":
        what = f"a {hf['model_type']!r:.40} model" if "model_type" in hf else "a model without a model_type"
        raise LoadError(f"{config_file} describes {what}, not GPT-2 (model_type 'gpt2'); this code runs only GPT-2's "
                        f"architecture")
    if "n_positions" not in hf and "n_ctx" in hf:  # configs of transformers 2.x may name the context n_ctx only
        hf["n_positions"] = hf["n_ctx"]
    check_sizes(hf, HF_SIZES, str(config_file))
    unsupported = {k: hf[k] for k, ok in [
        ("activation_function", ("gelu_new", "gelu_pytorch_tanh")), ("scale_attn_by_inverse_layer_idx", (False,)),
        ("reorder_and_upcast_attn", (False,)), ("scale_attn_weights", (True,)), ("add_cross_attention", (False,)),
        ("layer_norm_epsilon", (1e-5,)), ("tie_word_embeddings", (True,)),
    ] if k in hf and hf[k] not in ok}
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported["n_inner"] = hf["n_inner"]
    if unsupported:
        raise LoadError(f"{config_file} asks for what GPT-2 does not do and this code does not run: {unsupported}")
    return dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)


def config_from_nanogpt(model_args: object, file: Path) -> dict:
    """nanoGPT's model_args as GPTConfig's arguments (its other keys, if any, are not GPTConfig's)."""
    source = f"{file} (its model_args)"
    if not isinstance(model_args, dict):
        raise LoadError(f"{source} is a {type(model_args).__name__}, not a dict of GPTConfig's arguments: the "
                        f"checkpoint is damaged or was not written by nanoGPT's train.py")
    check_sizes(model_args, SIZES, source)
    if type(model_args.get("bias")) is not bool:
        got = repr(model_args["bias"])[:60] if "bias" in model_args else "missing"
        raise LoadError(f"{source}: bias is {got}, not True or False: the checkpoint is damaged")
    if not is_dropout(model_args.get("dropout", 0.0)):
        raise LoadError(f"{source}: dropout is {model_args['dropout']!r:.60}, not a number from 0 to below 1: the "
                        f"checkpoint is damaged")
    return {k: v for k, v in model_args.items() if k in CONFIG_KEYS}


def check_sizes(values: dict, keys: tuple[str, ...], source: str) -> None:
    """Each size is present and a whole number of at least 1 (JSON's true, 12.0, "12", null and NaN are not), and
    the width splits evenly into heads. Whether the sizes fit the weights is check_state_dict's to say."""
    missing = [k for k in keys if k not in values]
    if missing:
        raise LoadError(f"{source} lacks {', '.join(missing)}: it is incomplete or not a GPT-2 config; restore it "
                        f"from where the model came from")
    for key in keys:
        value = values[key]
        if type(value) is not int or value < 1:  # type(), not isinstance: a bool is an int to isinstance
            raise LoadError(f"{source}: {key} is {value!r:.60}, not a whole number of at least 1: the file is "
                            f"damaged or not a GPT-2 config; restore it from where the model came from")
    if values["n_embd"] % values["n_head"]:
        raise LoadError(f"{source}: n_embd ({values['n_embd']}) is not a multiple of n_head ({values['n_head']}), "
                        f"so the width cannot be split into heads: the file is damaged or not a GPT-2 config")


def is_dropout(value: object) -> bool:
    return type(value) in (int, float) and 0 <= value < 1  # NaN compares false


# ---------------------------------------------------------------------------------------------------------------
# Files: what is really there, before a parser is trusted with it


def check_file(file: Path) -> None:
    """Refuse, saying which, a folder, a broken symbolic link or nothing where a file must be."""
    if file.is_symlink() and not file.exists():
        raise LoadError(f"{file} is a symbolic link to {os.readlink(file)}, which does not exist (an interrupted "
                        f"download leaves such links in huggingface_hub's cache): download the model again")
    if file.is_dir():
        raise LoadError(f"{file} is a folder where a file should be: put the file itself there")
    if not file.is_file():
        raise LoadError(f"{file} does not exist or is not a regular file")


def read_bytes(file: Path, limit: int = -1) -> bytes:
    check_file(file)
    try:
        with open(file, "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise LoadError(f"cannot read {file}: {e.strerror or e}") from None


def read_json(file: Path) -> object:
    data = read_bytes(file)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = "is empty" if not data.strip() else f"is not JSON text ({e})"
    raise LoadError(f"{file} {problem}: it is damaged or not the model's file; restore it from the model's "
                    f"repository (or download the model again)")


def weight_file_head(file: Path) -> bytes:
    """A weight file's first bytes, after refusing an empty file and a git-LFS pointer in its place."""
    head = read_bytes(file, 256)
    if not head:
        raise LoadError(f"{file} is empty (0 bytes): the download or copy was cut short; download it again")
    if head.startswith(LFS_POINTER):
        size = re.search(rb"\nsize (\d+)", head)
        raise LoadError(f"{file} is a git-LFS pointer, a small text file that stands for the real weights"
                        f"{f' ({int(size[1]):,} bytes)' if size else ''}: the repository was cloned without git-lfs. "
                        f"Run `git lfs install` and then `git lfs pull` in it, or download the file itself")
    return head


def describe_content(head: bytes) -> str:
    """What a file holds, from its first bytes: for the message that refuses it."""
    if head.startswith(ZIP_MAGIC):
        return "a zip archive"
    if head[8:9] == b"{":
        return "a safetensors file"
    if head[:1] == b"\x80":
        return "a Python pickle"
    text = head[:60].decode("utf-8", errors="ignore")
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        return f"text, beginning {text.strip()[:40]!r}"
    return f"binary data beginning {head[:8].hex(' ')}"


# ---------------------------------------------------------------------------------------------------------------
# Safetensors


def safetensors_names(file: Path) -> list[str]:
    """The tensor names of a safetensors file, once safetensors has checked its header against the file (every
    tensor's bytes inside it, none overlapping, none left over)."""
    from safetensors import SafetensorError, safe_open

    head = weight_file_head(file)
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        header_size, file_size = int.from_bytes(head[:8].ljust(8, b"\0"), "little"), file.stat().st_size
        if file_size < 8:
            reason = f"it is {file_size} bytes long, too short to hold even the header's length"
        elif head[8:9] != b"{":  # the header is JSON text right after its 8-byte length
            reason = f"it is {describe_content(head)}"
        elif 8 + header_size > file_size:
            reason = f"its header claims {header_size:,} bytes, more than the whole file's {file_size:,}"
        else:
            reason = str(e)
        raise LoadError(f"{file} is not a valid safetensors file ({reason}): it is truncated or damaged; download "
                        f"it again") from None


def safetensors_tensors(file: Path) -> Iterator[tuple[str, "Stored"]]:
    """Each tensor of a safetensors file, listed from its header; read later, each through a mapping of its own
    that closes once the tensor (or the rows asked for) is copied out, so the file's pages are never held in
    memory beside the model being built."""
    from safetensors import SafetensorError, safe_open

    def read(name: str, rows: Optional[slice]) -> torch.Tensor:
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        except SafetensorError as e:
            raise LoadError(f"{file}: cannot read the tensor {name} ({e}): the file is damaged; download it "
                            f"again") from None

    names = safetensors_names(file)
    with safe_open(file, framework="pt") as f:
        for name in names:
            part = f.get_slice(name)
            shape = tuple(part.get_shape())
            dtype = (part[0:0] if shape else part[...]).dtype  # no data read but a scalar's
            yield name, Stored(file, shape, dtype, functools.partial(read, name))


# ---------------------------------------------------------------------------------------------------------------
# Pickles: torch.save's zip archive (or its older format), read as tensors and plain data only


def load_pickle(file: Path) -> object:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused unrun, and a
    file that is not torch.save's at all is named for what it is."""
    mmap = torch_file_kind(file) == "zip"  # mapping keeps the tensors out of memory until used; zip files allow it
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(e).split("\n")[0]
        if "global" not in reason.lower():
            raise LoadError(f"{file} is damaged: its pickle is not one torch.save writes ({reason}); download it "
                            f"again") from None
        raise LoadError(f"refused to load {file}: it is a pickle that holds more than tensors and plain data, and "
                        f"unpickling it could run code ({reason}). Load it only if you trust it, and convert it to "
                        f"safetensors.") from None
    except Exception as e:  # torch's readers fail on a damaged file with many exception types, all meaning that
        raise LoadError(f"{file} is truncated or damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        f"download it again") from None


def torch_file_kind(file: Path) -> str:
    """'zip' or 'legacy': which of torch.save's formats the file is, once checked as far as that format allows.
    Anything else is refused, named for what it is (a plain pickle that would import code is said to be one)."""
    head = weight_file_head(file)
    if head.startswith(ZIP_MAGIC):
        check_torch_zip(file)
        return "zip"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "legacy"
    if head[:1] == b"\x80":  # a pickle, protocol 2 or later, but not torch.save's
        imports = pickle_imports(file)
        if imports:
            raise LoadError(f"refused to load {file}: it is a plain Python pickle that imports {', '.join(imports)}, "
                            f"and unpickling it could run code. Load it only if you trust it, and convert it to "
                            f"safetensors.")
        raise LoadError(f"{file} is a plain Python pickle, not a file torch.save wrote: save the weights with "
                        f"torch.save or as safetensors")
    raise LoadError(f"{file} is not a PyTorch checkpoint: it is {describe_content(head)}. The download went wrong or "
                    f"another file took its name (a web page saved in place of the weights?): download it again")


def check_torch_zip(file: Path) -> None:
    """torch.load finds each record's bytes through its local zip header and checks no CRC, so one damaged byte
    there, or in the pickle that says which record each tensor views, would shift or swap tensors silently. So:
    each local header must repeat the central directory's name, its extra field must be whole records that fill
    exactly its stated length, and every record but the tensors' data (the pickle, the version) must match its
    CRC. What is left unchecked is the tensors' data itself, as with safetensors."""
    try:
        with zipfile.ZipFile(file) as archive, open(file, "rb") as f:
            for info in archive.infolist():
                f.seek(info.header_offset)
                header = f.read(30)
                name_length, extra_length = struct.unpack("<26xHH", header) if len(header) == 30 else (0, 0)
                name, extra = f.read(name_length), f.read(extra_length)
                if header[:4] != ZIP_MAGIC or name.decode("utf-8", "replace") != info.orig_filename or \
                        not whole_extra_records(extra):
                    raise zipfile.BadZipFile(f"the local header of {info.filename} is damaged")
                if "/data/" not in info.filename:
                    archive.read(info)  # raises BadZipFile on a CRC mismatch
    except Exception as e:  # zipfile fails on a damaged archive with many exception types, all meaning that
        raise LoadError(f"{file} is a damaged zip archive ({type(e).__name__}: {e}): it is truncated or corrupted; "
                        f"download it again") from None


def whole_extra_records(extra: bytes) -> bool:
    """A zip extra field is records of (2-byte id, 2-byte length, data): they must fill it exactly."""
    at = 0
    while at + 4 <= len(extra):
        at += 4 + int.from_bytes(extra[at + 2:at + 4], "little")
    return at == len(extra)


def pickle_imports(file: Path, most: int = 3) -> list[str]:
    """The first few module.name a plain pickle would import (each one a way to run code), read without
    unpickling."""
    imports, strings = [], []
    try:
        with open(file, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    imports.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    imports.append(".".join(strings[-2:]))
                elif opcode.name.startswith("EXT"):
                    imports.append(f"copyreg extension {arg}")
                elif isinstance(arg, str):
                    strings = strings[-1:] + [arg]
                if len(imports) == most:
                    break
    except Exception:  # a damaged pickle fails in genops with several types; the opcodes read so far are all it has
        pass
    return imports


# ---------------------------------------------------------------------------------------------------------------
# Tensors: our names, float32, finite


class Stored(NamedTuple):
    """A tensor in a checkpoint file, not yet read."""
    file: Path
    shape: tuple[int, ...]  # in our layout
    dtype: torch.dtype
    read: Callable[[Optional[slice]], torch.Tensor]  # read(rows): the tensor, or those rows of it, in our layout
    storage: Optional[tuple] = None  # (data pointer, shape) of an already mapped tensor: a tied pair shares it


def hf_tensors(files: list[Path]) -> Iterator[tuple[str, Stored]]:
    """(our name, stored tensor) of a Hugging Face folder's weight files: the 'transformer.' prefix added where
    missing, the mask buffers dropped, the Conv1D weights (stored in, out) seen transposed as Linear's (out, in)."""
    for file in files:
        if file.suffix == ".safetensors":
            pairs = safetensors_tensors(file)
        else:
            pairs = ((name, mapped(file, t)) for name, t in tensor_dict(load_pickle(file), str(file)).items())
        for name, stored in pairs:
            if name.endswith(SKIPPED_BUFFERS):
                continue
            if name != "lm_head.weight" and not name.startswith("transformer."):
                name = "transformer." + name
            if name.endswith(CONV1D_WEIGHTS) and len(stored.shape) == 2:
                stored = stored._replace(shape=stored.shape[::-1], read=transposed(stored.read))
            yield name, stored


def mapped(file: Path, t: torch.Tensor) -> Stored:
    """A tensor torch.load has mapped from (or read into) memory."""
    return Stored(file, tuple(t.shape), t.dtype, lambda rows: t if rows is None else t[rows], (t.data_ptr(), t.shape))


def transposed(read: Callable[[Optional[slice]], torch.Tensor]) -> Callable[[Optional[slice]], torch.Tensor]:
    def read_transposed(rows: Optional[slice]) -> torch.Tensor:
        t = read(None).t()
        return t if rows is None else t[rows]
    return read_transposed


def read_nanogpt_checkpoint(file: Path) -> tuple[dict, Iterator[tuple[str, Stored]]]:
    """nanoGPT's training checkpoint: {'model_args': ..., 'model': state dict} (maybe saved from a compiled model)."""
    checkpoint = load_pickle(file)
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise LoadError(f"{file} is not a nanoGPT checkpoint: it needs the keys 'model_args' and 'model'")
    config_args = config_from_nanogpt(checkpoint["model_args"], file)
    model = tensor_dict(checkpoint["model"], f"{file} (its 'model')")
    return config_args, ((name.removeprefix("_orig_mod."), mapped(file, tensor)) for name, tensor in model.items()
                         if not name.endswith(SKIPPED_BUFFERS))


def tensor_dict(value: object, source: str) -> dict:
    """value, if it is a non-empty dict of named tensors, as a state dict is."""
    if not isinstance(value, dict) or not value:
        what = "an empty dict" if isinstance(value, dict) else f"a {type(value).__name__}"
        raise LoadError(f"{source} holds {what}, not a dict of named tensors: it is not a model's weights")
    odd = [repr(k)[:40] for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise LoadError(f"{source} holds entries that are not named tensors ({', '.join(odd[:5])}): it is not a "
                        f"model's weights")
    return value


class Checkpoint:
    """A checkpoint's tensors, listed and checked, each read only when asked for: a model is built tensor by
    tensor (or quantized as each is read), never holding the whole float32 checkpoint beside itself.

    Refused on listing: a tensor that is not floating point or comes twice, and a head that differs from the token
    embedding GPT-2 ties it to (a head stored as that very tensor is dropped; either way the head is the
    embedding). Each tensor read is copied into float32 memory of its own (so nothing stays tied to the file, and
    float16 or bfloat16 checkpoints load as float32) and refused if it holds NaN or infinity.
    """

    def __init__(self, tensors: Iterable[tuple[str, Stored]]):
        self.stored: dict[str, Stored] = {}
        head = None
        for name, stored in tensors:
            if name in self.stored or (name == "lm_head.weight" and head is not None):
                first = (self.stored.get(name) or head).file
                raise LoadError(f"the tensor {name} is both in {first} and in {stored.file}: these are two "
                                f"checkpoints (or a damaged one); keep one model's files")
            if not stored.dtype.is_floating_point:
                raise LoadError(f"{stored.file}: the tensor {name} is {str(stored.dtype).removeprefix('torch.')}, "
                                f"not floating point, as GPT-2's weights are (float32, float16 or bfloat16): this "
                                f"is not a GPT-2 checkpoint, or one quantized in a format this code does not read")
            if name == "lm_head.weight":
                head = stored
            else:
                self.stored[name] = stored
        embedding = self.stored.get("transformer.wte.weight")
        if head is not None and embedding is not None and (head.storage is None or
                                                           head.storage != embedding.storage):
            self._check_tied(head, embedding)
        if head is not None and embedding is None:
            self.stored["lm_head.weight"] = head  # the shape check reports the missing embedding
        self.shapes = {name: s.shape for name, s in self.stored.items()}
        if embedding is not None:
            self.shapes["lm_head.weight"] = embedding.shape

    @staticmethod
    def _check_tied(head: Stored, embedding: Stored) -> None:
        same = head.shape == embedding.shape
        for start in range(0, head.shape[0] if same else 0, 4096):
            rows = slice(start, start + 4096)
            same = torch.equal(head.read(rows).float(), embedding.read(rows).float())
            if not same:
                break
        if not same:
            raise LoadError(f"{head.file}: lm_head.weight differs from the token embedding transformer.wte.weight, "
                            f"and GPT-2 ties the two: this is not a GPT-2 checkpoint")

    def read(self, name: str, rows: Optional[slice] = None, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor `name` (the head is the token embedding), or its rows `rows`, in float32 memory of its own:
        contiguous, or in the layout of `like` (a tensor of the same shape, e.g. on the meta device)."""
        stored = self.stored["transformer.wte.weight" if name == "lm_head.weight" else name]
        t = stored.read(rows)  # a view of the file's mapping (safetensors and torch.load's mmap alike)
        out = torch.empty_strided(like.shape, like.stride()) if like is not None else torch.empty(t.shape)
        out.copy_(t)
        del t  # the last reference to the file's mapping of this tensor: it closes before the next read
        if not all_finite(out):
            raise LoadError(f"{stored.file}: the tensor {name} holds {int((~torch.isfinite(out)).sum()):,} NaN or "
                            f"infinite values: the weights are damaged (or come from a training run that diverged); "
                            f"use another checkpoint")
        return out

    def state_dict(self) -> dict:
        """Every tensor read, contiguous float32; the head tied to the embedding."""
        state_dict = {name: self.read(name) for name in self.stored}
        if "transformer.wte.weight" in state_dict:
            state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
        return state_dict


@functools.cache
def glibc() -> Optional[ctypes.CDLL]:
    """The C library this process runs on, where it is glibc (it has malloc_trim); None elsewhere."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
    except (OSError, TypeError):  # Windows takes no None
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def hand_back_freed_memory() -> None:
    """Return the heap memory freed so far to the system. glibc keeps freed blocks for later use, and a model read
    tensor by tensor (each read, copied, rounded, freed) left GPT-2 124M's int8 load holding about 80 MB of them for
    the process's whole life, a third of the model. Nothing to do where the C library is not glibc."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a float32 tensor is finite, at the cost of one pass over it. The rows' sums (a
    product with a vector of ones) are not finite if any value is not, and torch runs a float32 matrix-vector
    product on one thread: on a busy two-core machine a parallel reduction (t.sum()) stalls on its other thread and
    costs five times as much. The exact test runs only when the sums say no (or overflowed)."""
    if t.numel() == 0:
        return True
    if t.dim() == 2 and not t.is_contiguous():
        t = t.t()  # a matrix stored transposed: the same values, read in the order they lie
    rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return math.isfinite((rows @ torch.ones(rows.size(1))).sum()) or bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------------------------------------------
# Shapes: what the config says the weights are


def expected_shapes(config_args: dict) -> dict[str, tuple[int, ...]]:
    """The state dict, names and shapes, of model.py's GPT for these GPTConfig arguments (tests/test_load.py
    holds the two together)."""
    V, T, C, bias = config_args["vocab_size"], config_args["block_size"], config_args["n_embd"], config_args["bias"]
    block = {"ln_1": (C,), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C),
             "ln_2": (C,), "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
    modules = {"transformer.wte": (V, C), "transformer.wpe": (T, C)}
    for i in range(config_args["n_layer"]):
        modules.update({f"transformer.h.{i}.{name}": shape for name, shape in block.items()})
    modules["transformer.ln_f"] = (C,)
    shapes = {}
    for module, shape in modules.items():
        shapes[f"{module}.weight"] = shape
        if bias and module not in ("transformer.wte", "transformer.wpe"):
            shapes[f"{module}.bias"] = shape[:1]
    shapes["lm_head.weight"] = (V, C)
    return shapes


def check_state_dict(config_args: dict, shapes: dict, config_source: str, weights_source: str) -> None:
    """Refuse weights that do not fit their config, listing the missing, unexpected and mis-shaped tensors. The
    blocks are counted first, so that a config that claims a million layers is refused without listing them."""
    blocks = {name.split(".")[2] for name in shapes if name.startswith("transformer.h.")}
    if len(blocks) != config_args["n_layer"]:
        raise LoadError(f"{config_source} gives n_layer={config_args['n_layer']}, but the weights in {weights_source} "
                        f"hold {len(blocks)} blocks: the config and the weights come from different models, or one "
                        f"of them is damaged")
    expected = expected_shapes(config_args)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(f"{n} {tuple(shapes[n])} (expected {expected[n]})"
                       for n in set(expected) & set(shapes) if tuple(shapes[n]) != expected[n])
    problems = [f"{what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} ({len(names)})"
                for what, names in [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
                if names]
    if problems:
        raise LoadError(f"the weights in {weights_source} do not fit the config in {config_source}: "
                        f"{'; '.join(problems)}. The config and the weights come from different models, or one of "
                        f"them is damaged")
