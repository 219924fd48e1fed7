"""
Writing GPT-2 checkpoints, the mirror of load.py: GPTConfig's arguments and a state dict in our names in; a Hugging
Face folder, a GGUF file for llama.cpp or a nanoGPT ckpt.pt out.

- write_hf: the folder transformers' GPT2LMHeadModel.from_pretrained and AutoTokenizer load: config.json,
  generation_config.json, model.safetensors in transformers' layout (Conv1D weights stored (in, out), the head
  tied to the token embedding, so not stored), and GPT-2's vocab.json, merges.txt and tokenizer_config.json.
- write_gguf: a GGUF file of llama.cpp's gpt2 architecture, with GPT-2's vocabulary, merges and pre-tokenizer
  so that llama.cpp runs it from text (or with none, on token ids, as bench.py's peers need).
- write_nanogpt: nanoGPT's ckpt.pt, as its train.py saves one and reads it to resume.

A model without biases (nanoGPT's bias=False) is written with zero biases where the format has no other way to
say it: the same function. Every write goes to a temporary name beside the final one, renamed into place when it
is complete (`publishing`), so a failed or killed run never leaves a half-written file under the final name.
Nothing here imports model.py.
"""

import errno
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import tiktoken
import torch
from safetensors import SafetensorError

from errors import UsageError
from load import CONV1D_WEIGHTS, expected_shapes
from tokenizer import EOT, byte_to_unicode

MERGES_HEADER = "#version: 0.2"  # the first line of every GPT-2 merges.txt
GGUF_TYPES = ("f32", "f16", "q8_0")  # the matrices' type; norms and biases stay float32, as llama.cpp keeps them
# nanoGPT train.py's defaults, for the fresh optimizer state a resumed run loads (it replaces the run's own settings
# with the saved ones, as it does when nanoGPT resumes its own checkpoint); recorded in the checkpoint's config too
NANOGPT_OPTIMIZER = dict(learning_rate=6e-4, weight_decay=1e-1, beta1=0.9, beta2=0.95)
NANOGPT_BEST_VAL_LOSS = 1e9  # what train.py starts from: the first evaluation of a resumed run saves a checkpoint


class SaveError(UsageError):
    """A checkpoint could not be written; the message says where, why, and that nothing was left in its place."""


# ---------------------------------------------------------------------------------------------------------------
# GPT-2's vocabulary, rebuilt from tiktoken's ranks


def gpt2_vocabulary(ranks: dict[bytes, int]) -> tuple[list[str], list[str]]:
    """GPT-2's tokens in id order, written as vocab.json writes them (each byte as a printable character, 'Ġt'),
    <|endoftext|> last; and its merges in rank order, as merges.txt writes them ('Ġ t').

    A token's rank is its merge's place in the merge order, so each merge is found by encoding the token with only
    the ranks below its own: the two parts that leaves are the pair whose merge made it. tiktoken encodes with all
    the ranks and offers no cap, hence the few lines of byte-pair encoding here."""
    printable = byte_to_unicode()
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = ["".join(printable[b] for b in token) for token in by_rank] + [EOT]
    merges = []
    for token in by_rank:
        if len(token) == 1:
            continue
        cap, parts = ranks[token], [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, cap) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= cap:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise UsageError(f"the tokenizer's ranks are not GPT-2's byte-pair merges: the token {token[:40]!r} "
                             f"(rank {cap}) is not the merge of two tokens of lower rank")
        merges.append(" ".join("".join(printable[b] for b in part) for part in parts))
    return tokens, merges


def ranks_of(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """tiktoken's bytes -> rank map of a GPT-2 encoding (its ranks, then <|endoftext|>), through its public
    interface."""
    return {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}


def tokenizer_files(ranks: dict[bytes, int], block_size: int) -> dict[str, bytes]:
    """GPT-2's tokenizer files as every GPT-2 repository has them (vocab.json and merges.txt byte for byte the
    published ones), and a tokenizer_config.json that names the tokenizer and its special token."""
    tokens, merges = gpt2_vocabulary(ranks)
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=block_size, bos_token=EOT, eos_token=EOT,
                  unk_token=EOT, add_prefix_space=False, add_bos_token=False)
    return {"vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False).encode("utf-8"),
            "merges.txt": "\n".join([MERGES_HEADER, *merges, ""]).encode("utf-8"),
            "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8")}


# ---------------------------------------------------------------------------------------------------------------
# The three formats


def with_biases(config_args: dict, state_dict: dict) -> dict:
    """The state dict with zero biases where a model without them (bias=False) has none: formats that always hold
    biases (transformers' GPT-2, llama.cpp's gpt2) then compute the same function."""
    if config_args["bias"]:
        return state_dict
    shapes = expected_shapes({**config_args, "bias": True})
    return {**{n: torch.zeros(shapes[n]) for n in shapes if n.endswith(".bias")}, **state_dict}


def write_hf(folder: Path, config_args: dict, state_dict: dict, ranks: Optional[dict[bytes, int]]) -> None:
    """A Hugging Face GPT-2 folder: weights, config and generation config, and GPT-2's tokenizer files unless
    ranks is None (a model whose vocabulary is not GPT-2's)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, GPT2Config

    eot = len(ranks) if ranks is not None else None  # <|endoftext|>, the id after the ranks (GPT-2's 50256)
    # n_ctx beside n_positions, as the published GPT-2 configs have it: llama.cpp's converter reads it
    config = GPT2Config(vocab_size=config_args["vocab_size"], n_positions=config_args["block_size"],
                        n_ctx=config_args["block_size"], n_embd=config_args["n_embd"],
                        n_layer=config_args["n_layer"], n_head=config_args["n_head"],
                        resid_pdrop=config_args["dropout"], embd_pdrop=config_args["dropout"],
                        attn_pdrop=config_args["dropout"], bos_token_id=eot, eos_token_id=eot,
                        architectures=["GPT2LMHeadModel"], dtype="float32")
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tensors = {}
    for name, tensor in with_biases(config_args, state_dict).items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight: transformers stores it once, as the embedding
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # nn.Linear's (out, in) as transformers' Conv1D's (in, out)
        tensors[name] = tensor.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if ranks is not None:
        for name, data in tokenizer_files(ranks, config_args["block_size"]).items():
            (folder / name).write_bytes(data)


def write_gguf(path: Path, config_args: dict, state_dict: dict, gguf_type: str,
               vocabulary: Optional[tuple[list[str], list[str]]] = None) -> None:
    """A GGUF file of llama.cpp's gpt2 architecture. gguf_type: f32, f16 or q8_0 for the matrices (a matrix whose
    rows q8_0's blocks of 32 do not divide stays f16, as llama.cpp's converter does). vocabulary: GPT-2's tokens
    and merges (gpt2_vocabulary), for llama.cpp to run the model from text; None writes no vocabulary, and
    llama.cpp runs it on token ids."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[gguf_type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    C, V = config_args["n_embd"], config_args["vocab_size"]
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(config_args["block_size"])
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(4 * C)
    writer.add_block_count(config_args["n_layer"])
    writer.add_head_count(config_args["n_head"])
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(file_type)
    if qtype == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if vocabulary is None:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(V)
    else:
        tokens, merges = vocabulary
        eot = len(tokens) - 1  # <|endoftext|>, GPT-2's 50256
        types = [gguf.TokenType.NORMAL] * eot + [gguf.TokenType.CONTROL]
        padding = range(len(tokens), V)  # a vocabulary padded past GPT-2's (nanoGPT's 50304): ids no text gives
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens + [f"[PAD{i}]" for i in padding])
        writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
        writer.add_token_merges(merges)
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
        writer.add_unk_token_id(eot)
        writer.add_add_bos_token(False)  # GPT-2 puts nothing before the text

    def add(name: str, t: torch.Tensor, matrix: bool = False) -> None:
        a = t.detach().float().contiguous().numpy()  # [out, in], as ggml reads it: nn.Linear's own layout
        if matrix and qtype == Q.Q8_0 and a.shape[-1] % 32 == 0:  # the writer takes the shape from the bytes
            writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        elif matrix and qtype != Q.F32:
            writer.add_tensor(name, a.astype(np.float16))
        else:
            writer.add_tensor(name, a)

    sd = {k.removeprefix("transformer."): v for k, v in with_biases(config_args, state_dict).items()}
    add("token_embd.weight", sd["wte.weight"], matrix=True)  # also the output layer, as GPT-2 ties them
    add("position_embd.weight", sd["wpe.weight"], matrix=qtype == Q.F16)  # a row lookup: f32 or f16 only
    for i in range(config_args["n_layer"]):
        for ours, theirs in (("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            add(f"blk.{i}.{theirs}.weight", sd[f"h.{i}.{ours}.weight"], matrix=not ours.startswith("ln"))
            add(f"blk.{i}.{theirs}.bias", sd[f"h.{i}.{ours}.bias"])
    add("output_norm.weight", sd["ln_f.weight"])
    add("output_norm.bias", sd["ln_f.bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_nanogpt(folder: Path, config_args: dict, state_dict: dict, meta: Optional[Path] = None,
                  dataset: Optional[str] = None) -> None:
    """nanoGPT's out_dir: ckpt.pt as its train.py saves it and reads it back to resume (init_from='resume'):
    model, model_args, iter_num, best_val_loss, config and an optimizer state (fresh: no moments yet), and the
    character vocabulary's meta.pkl beside it where the model has one. dataset: the training data's name, kept in
    the config, where nanoGPT's sample.py looks for meta.pkl."""
    model_args = {k: config_args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size",
                                                "dropout")}
    config = {**model_args, **NANOGPT_OPTIMIZER, **({"dataset": dataset} if dataset else {})}
    checkpoint = {"model": state_dict, "optimizer": fresh_adamw_state(state_dict), "model_args": model_args,
                  "iter_num": 0, "best_val_loss": NANOGPT_BEST_VAL_LOSS, "config": config}
    torch.save(checkpoint, folder / "ckpt.pt")
    if meta is not None:
        shutil.copyfile(meta, folder / "meta.pkl")


def fresh_adamw_state(state_dict: dict) -> dict:
    """The state_dict of the AdamW that nanoGPT's configure_optimizers builds, before its first step: two groups,
    the matrices and embeddings with weight decay, the biases and norms without, in the order of the model's
    parameters (the tied head counted once, as the embedding). Its moments start at zero when the run resumes."""
    params = [t for name, t in state_dict.items() if name != "lm_head.weight"]
    groups = [{"params": [torch.empty(0) for t in params if t.dim() >= 2],
               "weight_decay": NANOGPT_OPTIMIZER["weight_decay"]},
              {"params": [torch.empty(0) for t in params if t.dim() < 2], "weight_decay": 0.0}]
    betas = (NANOGPT_OPTIMIZER["beta1"], NANOGPT_OPTIMIZER["beta2"])
    return torch.optim.AdamW(groups, lr=NANOGPT_OPTIMIZER["learning_rate"], betas=betas).state_dict()


# ---------------------------------------------------------------------------------------------------------------
# Writing in place of nothing: a temporary name, renamed when complete


@contextmanager
def publishing(final: Path, folder: bool) -> Iterator[Path]:
    """A temporary file or folder beside final, to write into; once the block has finished, its files are synced
    to disk and it is renamed to final (replacing what is there: the caller has checked that it may). If the block
    fails, or is stopped, it is removed and final is left as it was; a failed write (a full disk) is a SaveError.
    A run killed outright leaves only the hidden temporary name ('.NAME.partial-...')."""
    temp = final.parent / f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            temp.mkdir()  # not tempfile.mkdtemp, whose private permissions would stay on the result
        yield temp
        for file in (sorted(temp.iterdir()) if folder else [temp]):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        put_in_place(temp, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # what the writers raise when the disk fails them
        remove(temp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        space = not isinstance(e, OSError) or e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        fix = "make room (a full disk, a file size limit?)" if space else "check the path and its permissions"
        raise SaveError(f"could not write {final}: {reason}. Nothing was written under that name: {fix} or write "
                        f"elsewhere, and run again") from None
    except BaseException:
        remove(temp)
        raise


def put_in_place(temp: Path, final: Path) -> None:
    """Rename temp to final: over a file in one atomic step; over a folder by moving it aside first, then
    removing it (and putting it back if the rename fails)."""
    if not (os.path.isdir(final) and not os.path.islink(final) or temp.is_dir() and os.path.lexists(final)):
        os.replace(temp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / final.name)
    try:
        os.replace(temp, final)
    except BaseException:
        os.replace(old / final.name, final)
        raise
    shutil.rmtree(old)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()
