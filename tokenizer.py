"""
GPT-2's byte-pair encoding through tiktoken, built without the network when it has to be.

tiktoken fetches GPT-2's files on first use. Offline, the identical encoding comes from a Hugging Face model
folder's own vocab.json and merges.txt (every GPT-2 repository has them, so a cached model works offline), or from
a `.tiktoken` rank file named by the caller or by the GPT2_TIKTOKEN_FILE environment variable.
"""

import json
import os
from pathlib import Path
from typing import Optional

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from configurator import UsageError

# GPT-2's pre-tokenizer split: contractions, letters, digits, other symbols, whitespace.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
EOT_ID = 50256
TIKTOKEN_FILE_ENV = "GPT2_TIKTOKEN_FILE"


class TokenizerError(UsageError):
    """No way to build the GPT-2 tokenizer; the message says how to provide one."""


def load_tokenizer(model_folder: Optional[Path] = None, tiktoken_file: Optional[str] = None) -> tiktoken.Encoding:
    """GPT-2's encoding, from the first source that has it: tiktoken_file (or $GPT2_TIKTOKEN_FILE), the model
    folder's vocab.json + merges.txt, then tiktoken's own cache or download. Every source gives the same ids.
    model_folder may also be a checkpoint file (a nanoGPT ckpt.pt): the folder that holds it is looked in."""
    tiktoken_file = tiktoken_file or os.environ.get(TIKTOKEN_FILE_ENV)
    if tiktoken_file:
        if not Path(tiktoken_file).is_file():
            raise TokenizerError(f"tokenizer rank file {tiktoken_file} does not exist: give the path of GPT-2's "
                                 f"gpt2.tiktoken file")
        return _encoding(load_tiktoken_bpe(str(tiktoken_file)))
    if model_folder is not None:
        folder = Path(model_folder) if Path(model_folder).is_dir() else Path(model_folder).parent
        if (folder / "vocab.json").is_file():
            return _encoding(ranks_from_vocab(folder / "vocab.json"))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raised
        raise TokenizerError(
            f"could not download GPT-2's tokenizer files ({type(e).__name__}) and the model folder has no "
            f"vocab.json. Set {TIKTOKEN_FILE_ENV}=path/to/gpt2.tiktoken (or pass --tiktoken_file), or load a "
            f"model folder that has vocab.json and merges.txt.") from None


def _encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, used to write byte strings as vocab.json keys."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ranks_from_vocab(vocab_file: Path) -> dict[bytes, int]:
    """vocab.json's token -> id map as tiktoken's bytes -> rank map. In GPT-2 a token's id is its merge rank
    (ids follow merges.txt's order), so the ids serve as ranks directly."""
    to_byte = {ch: b for b, ch in byte_to_unicode().items()}
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    return {bytes(to_byte[ch] for ch in token): rank for token, rank in vocab.items() if token != EOT}
