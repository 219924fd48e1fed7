"""
GPT-2's byte-pair encoding through tiktoken, built without the network when it has to be; and the character-level
vocabularies of nanoGPT's first tutorial.

tiktoken fetches GPT-2's files on first use. Offline, the identical encoding comes from a Hugging Face model
folder's own vocab.json (every GPT-2 repository has one, so a cached model works offline), from the vocab.json of
any GPT-2 repository in huggingface_hub's cache, or from a `.tiktoken` rank file named by the caller or by the
GPT2_TIKTOKEN_FILE environment variable. A nanoGPT checkpoint trained on characters (shakespeare_char) has its
vocabulary in the meta.pkl that nanoGPT's prepare.py wrote; it is read as plain data, never run. Every file is
checked before tiktoken is given it, and a vocab.json against the merges.txt beside it and the model's vocabulary:
a broken one, or one that does not belong to the model, is a TokenizerError that names it.
"""

import base64
import functools
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import AbstractSet, Callable, Collection, Iterable, Literal, Optional, Union

import tiktoken
from tiktoken_ext import openai_public
from tiktoken_ext.openai_public import r50k_pat_str

from errors import UsageError

# GPT-2's pre-tokenizer split in tiktoken's own form: possessive, so a text that ends in a long run of spaces cannot
# exhaust the regex engine's stack as the textbook form's backtracking does. A long run with text after it still
# can: GPT2Encoding cuts such runs off before tiktoken sees them.
GPT2_SPLIT = r50k_pat_str
# Unicode's White_Space characters: what \s matches in tiktoken's regex engine (a test holds the two together on
# every code point; Python's own \s differs, taking U+001C to U+001F as well).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Runs of whitespace this long or longer are cut off (GPT2Encoding): far below the regex engine's limit, about a
# million, and far above the runs of real text.
LONG_RUN = 10_000
EOT = "<|endoftext|>"
EOT_ID = 50256  # also the number of GPT-2's byte-pair ranks: <|endoftext|> is the id after them
TIKTOKEN_FILE_ENV = "GPT2_TIKTOKEN_FILE"


class TokenizerError(UsageError):
    """No way to build the tokenizer, or a broken tokenizer file; the message says which and how to provide one."""


class CharTokenizer:
    """A nanoGPT character-level vocabulary (meta.pkl's stoi), with the part of tiktoken.Encoding's interface that
    sample.py uses. It has no special tokens, so no <|endoftext|>: eot_token is None."""

    eot_token = None

    def __init__(self, stoi: dict[str, int], source: Path):
        self.stoi, self.source = stoi, source
        self.itos = {i: c for c, i in stoi.items()}
        self.n_vocab = len(stoi)

    def encode(self, text: str, allowed_special: Iterable[str] = ()) -> list[int]:
        """Ids of text, a character each; allowed_special is accepted for tiktoken's signature (there are none)."""
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:5])
            raise TokenizerError(f"the text holds characters that the vocabulary of {self.source} lacks: {shown}"
                                 f"{' ...' if len(unknown) > 5 else ''}. This model knows only the "
                                 f"{self.n_vocab} characters it was trained on: use only those")
        return [self.stoi[c] for c in text]

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.itos[token].encode("utf-8")

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(self.itos[t] for t in tokens)


class GPT2Encoding(tiktoken.Encoding):
    r"""tiktoken's encoding of GPT-2, which stays the encoder, given the text in pieces cut at long runs of
    whitespace. tiktoken's pattern matches a run that other text follows (\s+(?!\S)) by backtracking, a
    character at a time on its regex engine's stack, which overflows near a million characters: encode raises a
    ValueError, encode_ordinary panics past any except. (encode_batch and encode_ordinary_batch call these two.)

    Why the ids stay the same. Take a whole run of two or more whitespace characters, s to e, and other text at e.
    A match of the pattern starts at s (no match that holds other text runs on into whitespace after it), and it
    is \s+(?!\S) over s to e-1, all of the run but its last character: the alternatives before it need other
    text at s or s+1, and \s++$ is not at the end. So e-1 ends a match. The text from e-1 on splits alone as it
    did in the whole, since the pattern has no lookbehind; the text up to e-1 ends in s to e-1, which \s++$ takes
    whole, the same piece, and every match before s still sees whitespace at s. Before an allowed <|endoftext|>
    at e, tiktoken's piece of ordinary text ends at e, and \s++$ takes the whole run: the cut goes at e instead.
    Tests compare the ids with tiktoken's own on random texts cut at every run of two or more."""

    source: Optional[Path] = None  # the vocab.json it was read from, for messages; None for GPT-2's own files

    def encode_ordinary(self, text: str) -> list[int]:
        return joined(super().encode_ordinary, whitespace_cuts(text, eot_allowed=False))

    def encode(self, text: str, *, allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
               disallowed_special: Union[Literal["all"], Collection[str]] = "all") -> list[int]:
        eot_allowed = allowed_special == "all" or EOT in allowed_special
        encode = functools.partial(super().encode, allowed_special=allowed_special,
                                   disallowed_special=disallowed_special)
        return joined(encode, whitespace_cuts(text, eot_allowed))


def whitespace_cuts(text: str, eot_allowed: bool) -> list[str]:
    """text cut after every long run of whitespace that other text follows: before its last character, or after
    it where an allowed <|endoftext|> follows (GPT2Encoding says why the ids stay the same)."""
    # A run of LONG_RUN or more holds a whole block of LONG_RUN // 2 that starts at a multiple of it: only a text with
    # such a block of whitespace (by str.isspace, which takes a few more characters) is searched, so that prose
    # costs a few slices, not a regular expression's pass over every character.
    block = max(1, LONG_RUN // 2)
    if not any(text[i:i + block].isspace() for i in range(0, len(text), block)):
        return [text]
    cuts = []
    whole_runs = re.compile(f"(?<![{WHITESPACE}])[{WHITESPACE}]{{{LONG_RUN},}}")  # from a run's start only: linear
    for run in whole_runs.finditer(text):
        end = run.end()
        if end < len(text):
            cuts.append(end if eot_allowed and text.startswith(EOT, end) else end - 1)
    return [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]


def joined(encode: Callable[[str], list[int]], pieces: list[str]) -> list[int]:
    if len(pieces) == 1:
        return encode(pieces[0])
    return [token for piece in pieces for token in encode(piece)]


def load_tokenizer(model_folder: Optional[Path] = None,
                   tiktoken_file: Optional[str] = None) -> Union[GPT2Encoding, CharTokenizer]:
    """The model's tokenizer. A nanoGPT character-level checkpoint's meta.pkl comes first (no GPT-2 source could
    stand in for it); then GPT-2's encoding from the first source that has it: tiktoken_file (or
    $GPT2_TIKTOKEN_FILE), the model folder's vocab.json, a GPT-2 repository's vocab.json in huggingface_hub's
    cache, then tiktoken's own cache or download. Every GPT-2 source gives the same ids. model_folder may also be
    a checkpoint file (a nanoGPT ckpt.pt): the folder that holds it is looked in. Where model_folder holds a
    model, the tokenizer must fit its vocabulary (check_fits); a model smaller than GPT-2 without a vocabulary of
    its own is refused at once, for want of it, before any GPT-2 source is tried."""
    vocab_size, own_vocab = None, None
    tiktoken_file = tiktoken_file or os.environ.get(TIKTOKEN_FILE_ENV)
    if model_folder is not None:
        model = Path(model_folder)
        vocab_size, meta_places = model_vocabulary(model)
        meta = first_present(meta_places)
        if meta is not None:
            return fitting(char_tokenizer(meta), vocab_size)
        folder = model if model.is_dir() else model.parent
        if os.path.lexists(folder / "vocab.json"):  # lexists: a broken link is there, and is refused as one
            own_vocab = folder / "vocab.json"
        if vocab_size is not None and vocab_size <= EOT_ID and own_vocab is None and not tiktoken_file:
            raise TokenizerError(no_vocabulary_of_its_own(model, vocab_size, meta_places))
    return fitting(gpt2_tokenizer(tiktoken_file, own_vocab), vocab_size)


def gpt2_tokenizer(tiktoken_file: Optional[str], own_vocab: Optional[Path]) -> GPT2Encoding:
    if tiktoken_file:
        return gpt2_encoding(ranks_from_tiktoken_file(Path(tiktoken_file)))
    vocab_file = own_vocab or hub_cached_vocab()
    if vocab_file is not None:
        return gpt2_encoding(ranks_from_vocab(vocab_file), source=vocab_file)
    try:
        return gpt2_encoding(openai_public.gpt2()["mergeable_ranks"])  # what tiktoken.get_encoding("gpt2") reads
    except Exception as e:  # tiktoken raises whatever its HTTP client raised
        raise TokenizerError(
            f"could not download GPT-2's tokenizer files ({type(e).__name__}) and the model folder has no "
            f"vocab.json. Set {TIKTOKEN_FILE_ENV}=path/to/gpt2.tiktoken (or pass --tiktoken_file), or load a "
            f"model folder that has vocab.json and merges.txt.") from None


def no_vocabulary_of_its_own(model: Path, vocab_size: int, meta_places: list[Path]) -> str:
    """Why a model of fewer tokens than GPT-2 has no tokenizer here: GPT-2's could not fit it."""
    if meta_places:  # a nanoGPT checkpoint
        looked = ", ".join(str(place) for place in meta_places)
        return (f"{model} is a model of {vocab_size:,} tokens, fewer than GPT-2's {EOT_ID + 1:,}: a character-level "
                f"nanoGPT model (shakespeare_char's has 65), which needs the meta.pkl that nanoGPT's prepare.py wrote "
                f"for its data. There is none ({looked}): copy it beside the ckpt.pt")
    return (f"{model}'s vocabulary has {vocab_size:,} tokens, fewer than GPT-2's {EOT_ID + 1:,}, and the folder has "
            f"no vocab.json: GPT-2's tokenizer cannot serve it; put the model's own vocab.json and merges.txt there")


def fitting(enc: Union[GPT2Encoding, CharTokenizer], vocab_size: Optional[int]) -> Union[GPT2Encoding, CharTokenizer]:
    if vocab_size is not None:
        check_fits(enc, vocab_size)
    return enc


def check_fits(enc: Union[tiktoken.Encoding, CharTokenizer], vocab_size: int) -> None:
    """Refuse a tokenizer that does not belong to a model of vocab_size tokens. A character vocabulary must be
    exactly the model's size; a byte-pair one too, unless the model pads it (see padded)."""
    if enc.n_vocab == vocab_size or (not isinstance(enc, CharTokenizer) and padded(enc.n_vocab, vocab_size)):
        return
    if isinstance(enc, CharTokenizer):
        which, hint = f"{enc.source}'s characters", "this meta.pkl belongs to another model"
    else:
        source = getattr(enc, "source", None)
        which = f"the tokenizer in {source}" if source else "GPT-2's tokenizer"
        hint = ("a character-level nanoGPT model needs the meta.pkl that nanoGPT's prepare.py wrote for its data, "
                "beside its ckpt.pt; another model, its own vocab.json" if enc.n_vocab > vocab_size else
                f"the model has embeddings for {vocab_size - enc.n_vocab:,} tokens it lacks: a vocab.json cut short or "
                f"another model's; use the model's own vocab.json and merges.txt")
    raise TokenizerError(f"{which} has {enc.n_vocab:,} tokens, but the model's vocabulary has {vocab_size:,}: "
                         f"they do not belong together ({hint})")


def padded(n_vocab: int, vocab_size: int) -> bool:
    """Whether vocab_size is n_vocab rounded up to a multiple of a power of two of at least 8, as nanoGPT rounds
    GPT-2's 50,257 up to 50,304 (a multiple of 64) for faster products: rows no token uses, never a token lost."""
    pad = vocab_size - n_vocab
    return pad > 0 and vocab_size % max(8, 1 << pad.bit_length()) == 0


def gpt2_encoding(ranks: dict[bytes, int], source: Optional[Path] = None) -> GPT2Encoding:
    enc = GPT2Encoding(name="gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    enc.source = source
    return enc


def read_bytes(file: Path, what: str, fix: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:  # missing, a folder, a broken link, unreadable
        problem = "does not exist" if isinstance(e, FileNotFoundError) else (e.strerror or str(e)).lower()
        link = " (a symbolic link to nothing)" if file.is_symlink() and not file.exists() else ""
        raise TokenizerError(f"the {what} {file}{link} {problem}: {fix}") from None


# ---------------------------------------------------------------------------------------------------------------
# GPT-2's ranks, from a tiktoken rank file or a Hugging Face vocab.json


def ranks_from_tiktoken_file(file: Path) -> dict[bytes, int]:
    """tiktoken's rank file, one 'base64(token) rank' a line, read here rather than by tiktoken.load, which keeps
    a copy of every file it reads under the file's name and would go on returning it after the file changed."""
    fix = "give the path of GPT-2's gpt2.tiktoken file"
    data = read_bytes(file, "tokenizer rank file", fix)
    if data.lstrip().startswith(b"{"):
        raise TokenizerError(f"the tokenizer rank file {file} is JSON (a vocab.json?), not a tiktoken rank file: "
                             f"{fix} (a model folder's own vocab.json is read without being named)")
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # binascii.Error is a ValueError
            raise TokenizerError(f"the tokenizer rank file {file}, line {number}, is {line[:40]!r}, not "
                                 f"'base64-token rank': the file is damaged or not a rank file; {fix}") from None
    if len(ranks) != EOT_ID:
        raise TokenizerError(f"the tokenizer rank file {file} holds {len(ranks):,} ranks, and GPT-2's has "
                             f"{EOT_ID:,}: it is truncated or not GPT-2's; {fix}")
    check_ranks(ranks, file)
    return ranks


def ranks_from_vocab(vocab_file: Path) -> dict[bytes, int]:
    """vocab.json's token -> id map as tiktoken's bytes -> rank map. In GPT-2 a token's id is its merge rank
    (ids follow merges.txt's order), so the ids serve as ranks directly."""
    fix = "restore it from the model's repository (or pass --tiktoken_file=path/to/gpt2.tiktoken)"
    data = read_bytes(vocab_file, "tokenizer vocabulary", fix)
    try:
        vocab = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TokenizerError(f"{vocab_file} is not JSON text ({e}): it is damaged; {fix}") from None
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise TokenizerError(f"{vocab_file} is not a map of tokens to whole-number ids, as a GPT-2 vocab.json is: "
                             f"{fix}")
    to_byte = {ch: b for b, ch in byte_to_unicode().items()}
    ranks = {}
    for token, rank in vocab.items():
        if token == EOT:
            continue
        odd = [ch for ch in token if ch not in to_byte]
        if odd:
            raise TokenizerError(f"{vocab_file}: the token {token[:40]!r} holds {odd[0]!r}, which is not one of the "
                                 f"256 characters GPT-2's vocab.json writes bytes as: it is not a byte-level BPE "
                                 f"vocabulary; {fix}")
        ranks[bytes(to_byte[ch] for ch in token)] = rank
    if vocab.get(EOT, len(ranks)) != len(ranks):
        raise TokenizerError(f"{vocab_file} gives {EOT} the id {vocab[EOT]}, and GPT-2's layout gives it the id "
                             f"after the last token, {len(ranks)}: this vocabulary is not laid out as GPT-2's; {fix}")
    check_ranks(ranks, vocab_file)
    if os.path.lexists(vocab_file.with_name("merges.txt")):  # vocab.json alone serves too: the ids are the ranks
        check_merges(vocab, vocab_file.with_name("merges.txt"), vocab_file)
    return ranks


def check_merges(vocab: dict[str, int], merges_file: Path, vocab_file: Path) -> None:
    """vocab.json against the merges.txt beside it, in GPT-2's layout, which reading the ids as tiktoken's ranks
    relies on: ids 0 to 255 are the bytes, then merge n of merges.txt (counted from 0) makes the token of id
    256 + n from two tokens made before it, then <|endoftext|>. The ids are already 0 to n-1, each once, with
    every byte among them (check_ranks); so the count and the merges pin down every id. A vocabulary cut short,
    one with tokens no merge makes, and two files of different tokenizers all fail here."""
    fix = "restore both from the model's repository (vocab.json and merges.txt come as a pair)"
    try:
        lines = read_bytes(merges_file, "tokenizer merges", fix).decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{merges_file} is not UTF-8 text ({e}): it is damaged; {fix}") from None
    header = 1 if lines[0].startswith("#version") else 0
    merges = lines[header:]
    while merges and not merges[-1].strip():
        merges.pop()
    tokens = len(vocab) - (EOT in vocab)
    if tokens != 256 + len(merges):
        raise TokenizerError(f"{vocab_file} holds {tokens:,} tokens besides {EOT}, and {merges_file} has "
                             f"{len(merges):,} merges, which with the 256 bytes make {256 + len(merges):,}: one of the "
                             f"two is cut short or has tokens the other lacks, or they come from different "
                             f"tokenizers; {fix}")
    get = vocab.get
    for rank, merge in enumerate(merges, 256):
        parts = merge.split()  # as transformers splits it: a stray \r is no part
        if len(parts) != 2 or get(parts[0] + parts[1]) != rank or get(parts[0], rank) >= rank or \
                get(parts[1], rank) >= rank:
            raise TokenizerError(f"{merges_file}, line {rank - 256 + header + 1}: {bad_merge(vocab, parts, rank)}: "
                                 f"{vocab_file} and {merges_file} disagree; {fix}")


def bad_merge(vocab: dict[str, int], parts: list[str], rank: int) -> str:
    """What is wrong with merge number rank - 256 (one check_merges refused)."""
    if len(parts) != 2:
        return f"{' '.join(parts)[:60]!r} is not two tokens separated by a space"
    missing = [part for part in parts if part not in vocab]
    if missing:
        return f"it merges {missing[0][:40]!r}, which vocab.json lacks"
    later = [part for part in parts if vocab[part] >= rank]
    if later:
        return f"it merges {later[0][:40]!r}, whose id {vocab[later[0]]} is not below the merge's own {rank}"
    made = parts[0] + parts[1]
    if made not in vocab:
        return f"it makes {made[:40]!r}, which vocab.json lacks"
    return f"it makes {made[:40]!r}, whose id is {vocab[made]}, and GPT-2's layout gives merge {rank - 256} the id " \
           f"{rank}"


def check_ranks(ranks: dict[bytes, int], source: Path) -> None:
    """What tiktoken needs and does not check: the ranks are 0 to n-1, each once, and every one of the 256 bytes
    is a token (its encoder stops the process, past any except, on a byte it has no rank for)."""
    if set(ranks.values()) != set(range(len(ranks))):
        raise TokenizerError(f"{source}: the ids are not 0 to {len(ranks) - 1}, each once: the file is damaged")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source} lacks tokens for {len(missing)} of the 256 bytes (the first, 0x"
                             f"{missing[0]:02x}), which byte-level BPE needs: the file is damaged or not GPT-2's")


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


def hub_cached_vocab() -> Optional[Path]:
    """GPT-2's vocab.json from huggingface_hub's cache, if any GPT-2 repository is there (they share one)."""
    from huggingface_hub import constants, try_to_load_from_cache

    from load import HUB_NAMES, home_problem

    if home_problem(constants.HF_HUB_CACHE) is not None:  # the cache is in a home folder that cannot be found
        return None
    for repo in (*HUB_NAMES.values(), *HUB_NAMES):  # 'gpt2' and the others are also cached under their old ids
        found = try_to_load_from_cache(repo, "vocab.json")
        if isinstance(found, str):
            return Path(found)
    return None


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT's character-level vocabularies


def model_vocabulary(path: Path) -> tuple[Optional[int], list[Path]]:
    """The vocabulary size of the model at path (None where path holds none, as a folder of tokenizer files alone),
    and where a nanoGPT checkpoint's meta.pkl may be: beside its ckpt.pt, in the folder above, or where nanoGPT's
    sample.py looks for it, data/<dataset>/meta.pkl (from the current directory or the folder above the
    checkpoint's) for the dataset the checkpoint's config names. No places for a Hugging Face folder."""
    from load import config_from_hf, config_from_nanogpt, load_pickle

    if path.is_dir():
        if os.path.lexists(path / "config.json"):
            return config_from_hf(path / "config.json")["vocab_size"], []
        if not os.path.lexists(path / "ckpt.pt"):
            return None, []
        path = path / "ckpt.pt"
    elif not path.is_file():
        return None, []
    saved = load_pickle(path)  # once, for both: a nanoGPT checkpoint with its optimizer's state is large
    saved = saved if isinstance(saved, dict) else {}
    vocab_size = config_from_nanogpt(saved["model_args"], path)["vocab_size"] if "model_args" in saved else None
    places = [path.parent / "meta.pkl", path.parent.parent / "meta.pkl"]
    dataset = nanogpt_dataset(saved)
    if dataset is not None:
        places += [Path.cwd() / "data" / dataset / "meta.pkl", path.parent.parent / "data" / dataset / "meta.pkl"]
    return vocab_size, places


def find_meta(path: Path) -> Optional[Path]:
    """The meta.pkl of the nanoGPT checkpoint at path, if it has one where nanoGPT leaves it."""
    return first_present(model_vocabulary(path)[1])


def first_present(places: list[Path]) -> Optional[Path]:
    return next((place for place in places if os.path.lexists(place)), None)


def nanogpt_dataset(saved: object) -> Optional[str]:
    """The dataset name in a loaded nanoGPT checkpoint's training config, if it has a plain one."""
    config = saved.get("config") if isinstance(saved, dict) else None
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset if isinstance(dataset, str) and dataset and Path(dataset).name == dataset else None


class PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle builds by itself (dicts, lists, strings, numbers): it never looks up a class or a
    function, so unpickling runs no code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain data is read: unpickling anything "
                                     f"else could run code")


def char_tokenizer(meta_file: Path) -> CharTokenizer:
    """The vocabulary in nanoGPT's meta.pkl ({'vocab_size', 'stoi', 'itos'}), checked whole."""
    fix = "use the meta.pkl that nanoGPT's prepare.py wrote for this model's data"
    data = read_bytes(meta_file, "character vocabulary", fix)
    try:
        meta = PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a damaged pickle fails with many exception types, all meaning that
        raise TokenizerError(f"refused to read {meta_file} ({type(e).__name__}: {str(e)[:200]}): it is damaged or "
                             f"not nanoGPT's meta.pkl; {fix}") from None
    stoi, itos = (meta.get("stoi"), meta.get("itos")) if isinstance(meta, dict) else (None, None)
    if not isinstance(stoi, dict) or not stoi or \
            not all(isinstance(c, str) and len(c) == 1 and type(i) is int for c, i in stoi.items()):
        raise TokenizerError(f"{meta_file} has no stoi that maps single characters to ids: it is not a character-"
                             f"level vocabulary; {fix}")
    if set(stoi.values()) != set(range(len(stoi))) or itos != {i: c for c, i in stoi.items()}:
        raise TokenizerError(f"{meta_file}: stoi's ids are not 0 to {len(stoi) - 1}, each once, with itos their "
                             f"inverse: the file is damaged; {fix}")
    try:
        "".join(stoi).encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError(f"{meta_file} holds characters that are not text (lone surrogates): the file is "
                             f"damaged; {fix}") from None
    return CharTokenizer(stoi, meta_file)
