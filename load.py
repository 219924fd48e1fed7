"""
Loading GPT-2 checkpoints: names, folders and files in; GPTConfig's arguments and a state dict in our names out.

Every checkpoint format lives here: hub names and repo ids (through huggingface_hub's cache), Hugging Face folders
(safetensors, sharded or not, and pytorch_model.bin), and nanoGPT's ckpt.pt. Nothing here knows the network's
math, and nothing imports model.py: GPT.from_pretrained builds the network from what this module returns.
"""

import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from configurator import UsageError


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


class LoadError(UsageError):
    """A checkpoint could not be loaded; the message says why and what to do instead."""


def read_pretrained(name_or_path: str, override_args: Optional[dict] = None) -> tuple[dict, dict]:
    """GPT.from_pretrained's reading: resolve the name, read the files; the GPTConfig arguments and state dict."""
    override_args = dict(override_args or {})
    if set(override_args) - {"dropout"}:
        raise ValueError(f"override_args may set only 'dropout', got {sorted(override_args)}")
    config_args, state_dict = read_checkpoint(resolve_checkpoint(str(name_or_path)))
    config_args.update(override_args)
    return config_args, state_dict


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local path as given, else a hub name or repo id fetched into (or found in) huggingface_hub's cache."""
    path = Path(name_or_path).expanduser()
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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

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


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or (folder / "ckpt.pt").exists()


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """The GPTConfig arguments and state dict (our names and layout) of a Hugging Face folder or a nanoGPT checkpoint."""
    if path.is_file():
        return read_nanogpt_checkpoint(path)
    if (path / "config.json").exists():
        return config_from_hf(path / "config.json"), state_dict_from_hf(read_hf_weights(path))
    if (path / "ckpt.pt").exists():
        return read_nanogpt_checkpoint(path / "ckpt.pt")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise LoadError(f"{path} is not a model folder: it needs config.json with model.safetensors or "
                    f"pytorch_model.bin (Hugging Face layout), or a nanoGPT ckpt.pt; it holds {found}")


def config_from_hf(config_file: Path) -> dict:
    """A Hugging Face config.json as GPTConfig's arguments (GPT-2's options only)."""
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "gpt2":
        raise LoadError(f"{config_file} describes a '{hf.get('model_type')}' model, not GPT-2 (model_type 'gpt2'); "
                        f"this code runs only GPT-2's architecture")
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


def read_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a Hugging Face folder as the files name them: safetensors (sharded too), else the
    pickle. Each safetensors tensor is read through a mapping of its own that closes once the caller has copied
    it, so the file's pages are never held in memory beside the whole copied model."""
    from safetensors import safe_open

    files = weight_files(folder, "model.safetensors.index.json", "*.safetensors")
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, tensor
    if files:
        return
    files = weight_files(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not files:
        raise LoadError(f"{folder} has config.json but no weights: it needs model.safetensors or pytorch_model.bin")
    for file in files:
        yield from load_pickle(file).items()


def weight_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    """The shards a sharded checkpoint's index names, else the files matching pattern."""
    index = folder / index_name
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob(pattern))


def state_dict_from_hf(tensors: Iterator[tuple[str, torch.Tensor]]) -> dict:
    """Hugging Face GPT-2 names to ours: add the 'transformer.' prefix where missing, drop the mask buffers and
    the tied head, and transpose the Conv1D weights (stored in, out) to Linear's (out, in). Every tensor is
    copied once into float32 memory of the model's own, so nothing stays tied to the checkpoint file."""
    state_dict = {}
    for name, tensor in tensors:
        if name.endswith(SKIPPED_BUFFERS) or name == "lm_head.weight":
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
            tensor = tensor.t()
        state_dict[name] = tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        del tensor  # the last reference to the file's mapping of this tensor: it closes before the next read
    if "transformer.wte.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def load_pickle(file: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused unrun."""
    try:
        # Mapping the file keeps the pickle's tensors out of memory until used; only zip-format files allow it.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise LoadError(f"refused to load {file}: it is a pickle that holds more than tensors and plain data, and "
                        f"unpickling it could run code ({str(e).splitlines()[0]}). Load it only if you trust it, "
                        f"and convert it to safetensors.") from None
    except RuntimeError as e:
        raise LoadError(f"could not read {file} as a PyTorch checkpoint: {str(e).splitlines()[0]}") from None


def read_nanogpt_checkpoint(file: Path) -> tuple[dict, dict]:
    """nanoGPT's training checkpoint: {'model_args': ..., 'model': state dict} (maybe saved from a compiled model)."""
    checkpoint = load_pickle(file)
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise LoadError(f"{file} is not a nanoGPT checkpoint: it needs the keys 'model_args' and 'model'")
    config_args = {k: v for k, v in checkpoint["model_args"].items() if k in CONFIG_KEYS}
    state_dict = {}
    for name, tensor in checkpoint["model"].items():
        name = name.removeprefix("_orig_mod.")
        if not name.endswith(SKIPPED_BUFFERS):
            state_dict[name] = tensor
    return config_args, state_dict


def check_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Refuse, listing them, checkpoints with missing, unexpected or mis-shaped tensors."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{n} {tuple(state_dict[n].shape)} (expected {expected[n]})"
                       for n in set(expected) & set(state_dict) if tuple(state_dict[n].shape) != expected[n])
    problems = [f"{what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} ({len(names)})"
                for what, names in [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
                if names]
    if problems:
        raise LoadError("the checkpoint does not fit GPT-2 of its own config; " + "; ".join(problems))
