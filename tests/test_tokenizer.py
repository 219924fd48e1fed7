"""tokenizer.py gives the ids of tiktoken's own GPT-2 encoding and of transformers' GPT2TokenizerFast, from each of
its offline sources, on text that stresses the byte-pair encoding and the pre-tokenizer split."""

import json
import pickle
import random
import re
from pathlib import Path
from typing import Optional

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext import openai_public
from tiktoken_ext.openai_public import r50k_pat_str

import tokenizer
from tokenizer import EOT, EOT_ID, TokenizerError, load_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see, they've gone, I'd say.",
    "naïve café, Ångström, São Paulo, Zürich, ÆØÅ æøå, crème brûlée",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨",
    "tabs\tand  double  spaces,   triple,\n\nnewlines\r\n  indented\n\t\tmixed \t \n",
    "   leading spaces and trailing ones   ",
    " \n ",
    "\n",
    "digits 0 1 12 123 1234 12345 3.14159 1,000,000 -42 +7e-10 0x1F",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nif __name__ == '__main__':\n    print(f(3))\n",
    "{\"json\": [1, 2, {\"a\": null}], 'x': True}  <tag attr=\"v\">&amp;</tag>",
    "SHOUTING DON'T WON'T I'M and contractions 's 't 're 've 'm 'll 'd",
    "before<|endoftext|>after",
    "<|endoftext|>",
    "two<|endoftext|><|endoftext|>in a row, then text",
    "",
]


@pytest.fixture(scope="module")
def reference(shared_dir) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding as tiktoken itself defines it (its own split pattern), from the shared rank file."""
    return tiktoken.Encoding(name="gpt2-reference", pat_str=r50k_pat_str,
                             mergeable_ranks=load_tiktoken_bpe(str(shared_dir / "gpt2.tiktoken")),
                             special_tokens={EOT: EOT_ID})


@pytest.fixture(scope="module")
def hf_tokenizer(trained_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(trained_dir)


@pytest.fixture(scope="module", params=["rank_file", "env_var", "vocab_json"])
def encoding(request, shared_dir, trained_dir) -> tiktoken.Encoding:
    if request.param == "rank_file":
        return load_tokenizer(tiktoken_file=str(shared_dir / "gpt2.tiktoken"))
    if request.param == "env_var":
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(tokenizer.TIKTOKEN_FILE_ENV, str(shared_dir / "gpt2.tiktoken"))
            return load_tokenizer(trained_dir)  # the variable wins over the folder
    return load_tokenizer(trained_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken_and_transformers(encoding, reference, hf_tokenizer, text):
    ids = encoding.encode(text, allowed_special={EOT})
    assert ids == reference.encode(text, allowed_special={EOT})
    assert ids == hf_tokenizer.encode(text)
    assert encoding.decode(ids) == text


def test_known_ids_and_vocabulary(encoding):
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.encode(EOT, allowed_special={EOT}) == [EOT_ID]
    assert encoding.n_vocab == 50257
    assert encoding.decode_single_token_bytes(EOT_ID) == EOT.encode()


def test_every_token_decodes_like_tiktoken(encoding, reference):
    for token in range(0, reference.n_vocab, 7):
        assert encoding.decode_single_token_bytes(token) == reference.decode_single_token_bytes(token)


def test_special_token_is_refused_unless_allowed(encoding):
    with pytest.raises(ValueError):
        encoding.encode("a <|endoftext|> b")


def test_missing_rank_file_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tiktoken_file=str(tmp_path / "missing.tiktoken"))


def test_no_source_at_all_says_how_to_provide_one(tmp_path, monkeypatch):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)

    def offline():
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(openai_public, "gpt2", offline)  # what tiktoken.get_encoding("gpt2") would call
    with pytest.raises(TokenizerError, match="--tiktoken_file"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The split pattern: tiktoken's own


def test_split_pattern_is_tiktokens_own_and_survives_a_million_spaces(encoding, reference):
    assert tokenizer.GPT2_SPLIT == r50k_pat_str
    text = "The end." + " " * 1_000_000  # the textbook pattern's backtracking exhausts the regex engine's stack here
    ids = encoding.encode(text)
    assert encoding.decode(ids) == text
    assert encoding.encode("The end." + " " * 2000 + "\n") == reference.encode("The end." + " " * 2000 + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Long runs of whitespace anywhere: tiktoken's regex engine overflows its stack on a run of about a million that
# other text follows; GPT2Encoding cuts the text there first, and must give the ids the pattern means


def pattern_ids(reference: tiktoken.Encoding, text: str) -> list[int]:
    """The ids the pattern means, found without tiktoken's regex engine: the text split by the regex module (which
    keeps its backtracking on the heap) and each piece encoded alone (a piece splits as itself)."""
    parts = [[t for piece in regex.findall(r50k_pat_str, part) for t in reference.encode_ordinary(piece)]
             for part in text.split(EOT)]
    return parts[0] + [t for part in parts[1:] for t in [EOT_ID, *part]]


def test_the_pattern_oracle_is_tiktoken(reference):
    for text in TEXTS + [" " * 5000 + "x", "a\n\n\t " * 300 + "\u3000" * 700 + "!"]:
        assert pattern_ids(reference, text) == reference.encode(text, allowed_special={EOT})


def test_whitespace_is_what_the_regex_engine_calls_whitespace():
    """tokenizer.WHITESPACE against \\s in tiktoken's own regex engine, on every code point: an encoding that
    splits out only whitespace (its pattern is \\s; text it does not match is dropped) and has a token per byte."""
    spaces_only = tiktoken.Encoding(name="spaces", pat_str=r"\s", special_tokens={},
                                    mergeable_ranks={bytes([b]): b for b in range(256)})
    every_character = "".join(map(chr, [*range(0xD800), *range(0xE000, 0x110000)]))  # no surrogates: not text
    engine = spaces_only.decode(spaces_only.encode_ordinary(every_character))
    assert engine == "".join(re.findall(f"[{tokenizer.WHITESPACE}]", every_character))
    assert len(engine) == 25 and "\x1c" not in engine and "\u200b" not in engine  # Python's \s would take U+001C
    assert engine.isspace()  # whitespace_cuts looks for long runs with str.isspace first: it must not miss one


RUNS = {"spaces": " ", "tabs": "\t", "newlines": "\n", "crlf": "\r\n", "ideographic": "\u3000", "nbsp": "\xa0",
        "mixed": " \t\n\u2028\x0b\x0c\x85\u1680\u2000\u202f\u205f\r"}


@pytest.fixture(scope="module")
def gpt2(trained_dir) -> tokenizer.GPT2Encoding:
    return load_tokenizer(trained_dir)


def test_every_source_cuts_long_runs(encoding, monkeypatch):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    monkeypatch.setattr(openai_public, "gpt2", lambda: {"mergeable_ranks": encoding._mergeable_ranks})  # downloaded
    assert isinstance(encoding, tokenizer.GPT2Encoding) and isinstance(load_tokenizer(), tokenizer.GPT2Encoding)
    assert encoding.encode(" " * 1_000_000 + "x")[-2:] == [220, 2124]  # ' ', ' x'


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_long_runs_anywhere_give_tiktokens_ids(gpt2, reference, run):
    """Runs about the length where the text is cut (10,000), which tiktoken itself can still encode whole."""
    encoding = gpt2
    for length in (9_999, 10_000, 10_001):
        ws = (run * length)[:length]
        for text in [ws + "x", "x" + ws + "y", "a" + ws + " b", ws, "x" + ws, "1" + ws + "2", "!" + ws + "'s",
                     "é" + ws + "😀", ws + EOT + ws + "x", "x" + ws + "\n" + ws + "é", ws + " " + ws + EOT]:
            ids = encoding.encode(text, allowed_special={EOT})
            assert ids == reference.encode(text, allowed_special={EOT})
            assert encoding.encode_ordinary(text) == reference.encode_ordinary(text)
            assert encoding.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
            assert encoding.decode(ids) == text


@pytest.mark.parametrize("offset", [0, 1, 4_999, 5_000, 5_001, 9_999, 10_000])
def test_every_run_of_ten_thousand_is_cut_wherever_it_starts(offset):
    """whitespace_cuts looks for whole blocks of 5,000 whitespace characters first: a run of 10,000 holds one
    wherever it starts; one of 9,999 is left whole."""
    text = "x" * offset + "\u3000\t" * 5_000 + "y" + " " * 9_999 + "z"
    assert [len(piece) for piece in tokenizer.whitespace_cuts(text, eot_allowed=True)] == [offset + 9_999, 10_002]
    assert [len(piece) for piece in tokenizer.whitespace_cuts(text + EOT, eot_allowed=True)] == [offset + 9_999, 10_015]
    text = "x" * offset + " " * 10_000 + EOT + " " * 10_000
    assert [len(piece) for piece in tokenizer.whitespace_cuts(text, eot_allowed=True)] == [offset + 10_000, 10_013]
    assert [len(piece) for piece in tokenizer.whitespace_cuts(text, eot_allowed=False)] == [offset + 9_999, 10_014]


def test_cuts_at_every_run_give_tiktokens_ids(shared_dir, reference, monkeypatch):
    """The cut made at every run of two or more, on random texts of whitespace of every kind (and characters that
    Python but not the regex engine calls whitespace), letters, digits, punctuation, contractions, surrogates and
    <|endoftext|>: every way of encoding gives tiktoken's ids."""
    enc = load_tokenizer(tiktoken_file=str(shared_dir / "gpt2.tiktoken"))
    monkeypatch.setattr(tokenizer, "LONG_RUN", 2)
    alphabet = [" ", " ", " ", "\t", "\n", "\r", "\u3000", "\xa0", "\x85", "\u2028", "\x1c", "\u200b", "a", "Z", "é",
                "日", "1", "²", "!", "-", "'", "s", "ll", EOT, "<|", "😀", "\ud83d", "\ude00"]
    rng, cut = random.Random(0), 0
    for _ in range(1500):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 24)))
        cut += len(tokenizer.whitespace_cuts(text, eot_allowed=True)) > 1
        for kwargs in ({"allowed_special": {EOT}}, {"allowed_special": "all"}, {"disallowed_special": ()}):
            assert enc.encode(text, **kwargs) == reference.encode(text, **kwargs), (text, kwargs)
        assert enc.encode_ordinary(text) == reference.encode_ordinary(text), text
        assert enc.encode_batch([text, text[::-1]], allowed_special="all") == \
            reference.encode_batch([text, text[::-1]], allowed_special="all")
        if EOT in text:
            with pytest.raises(ValueError, match="disallowed special token"):
                enc.encode(text)
    assert cut > 750  # most texts were cut: the test exercises the cuts


@pytest.mark.parametrize("run", [" ", "\n", " \t\u3000\r\n"], ids=["spaces", "newlines", "mixed"])
def test_a_million_whitespace_characters_anywhere(gpt2, reference, run):
    ws = run * (1_000_000 // len(run))
    assert gpt2.encode(ws + "x") == pattern_ids(reference, ws + "x")
    assert gpt2.encode_ordinary("The start." + ws + "the end") == pattern_ids(reference, "The start." + ws + "the end")
    text = "1" + ws + EOT + ws + "x"
    assert gpt2.encode(text, allowed_special={EOT}) == pattern_ids(reference, text)


# ---------------------------------------------------------------------------------------------------------------
# Broken tokenizer files: each a TokenizerError (a UsageError) that names the file and the problem


def gpt2_bytes_vocab(**extra) -> dict:
    """A vocab.json of the 256 single bytes, written as GPT-2 writes them, and extra tokens."""
    return {**{ch: b for b, ch in tokenizer.byte_to_unicode().items()}, **extra}


VOCAB_CASES = {
    "not_json": (b'{"a": 0,', r"vocab.json is not JSON text"),
    "empty": (b"", r"vocab.json is not JSON text"),
    "not_utf8": (b'{"\xe9": 0}', r"vocab.json is not JSON text .*utf-8"),
    "a_list": (b'["a", "b"]', r"vocab.json is not a map of tokens to whole-number ids"),
    "string_ids": (json.dumps(gpt2_bytes_vocab(ab="256")).encode(), r"vocab.json is not a map of tokens"),
    "float_ids": (json.dumps(gpt2_bytes_vocab(ab=256.0)).encode(), r"vocab.json is not a map of tokens"),
    "unknown_character": (json.dumps(gpt2_bytes_vocab(**{"a b": 256})).encode(),
                          r"vocab.json: the token 'a b' holds ' ', which is not one of the 256 characters"),
    "duplicate_ids": (json.dumps(gpt2_bytes_vocab(ab=255)).encode(), r"vocab.json: the ids are not 0 to 256"),
    "gap_in_ids": (json.dumps(gpt2_bytes_vocab(ab=300)).encode(), r"vocab.json: the ids are not 0 to 256"),
    "missing_bytes": (b'{"a": 0, "b": 1}', r"vocab.json lacks tokens for 254 of the 256 bytes \(the first, 0x00\)"),
    "eot_elsewhere": (json.dumps(gpt2_bytes_vocab(**{EOT: 0})).encode(), r"gives <\|endoftext\|> the id 0"),
}


@pytest.mark.parametrize("content, message", VOCAB_CASES.values(), ids=VOCAB_CASES.keys())
def test_broken_vocab_json(tmp_path, monkeypatch, content, message):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    (tmp_path / "vocab.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as refused:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "vocab.json") in str(refused.value)


def rank_file_lines(shared_dir) -> list[bytes]:
    return (shared_dir / "gpt2.tiktoken").read_bytes().splitlines(keepends=True)


RANK_FILE_CASES = {
    "vocab_json": (lambda lines, trained_dir: (trained_dir / "vocab.json").read_bytes(),
                   r"is JSON \(a vocab.json\?\), not a tiktoken rank file"),
    "cut_between_lines": (lambda lines, _: b"".join(lines[:30000]), r"holds 30,000 ranks, and GPT-2's has 50,256"),
    "cut_inside_a_line": (lambda lines, _: b"".join(lines[:30000]) + lines[30000][:5],
                          r"line 30001, is b'.{5}', not 'base64-token rank'"),
    "garbage": (lambda lines, _: bytes(range(256)) * 8, r"line 1, is .* not 'base64-token rank'"),
    "not_base64": (lambda lines, _: b"".join(lines[:-1]) + b"not*base64 50255\n", r"line 50256, is b'not\*base64"),
    "empty": (lambda lines, _: b"", r"holds 0 ranks"),
    "duplicate_rank": (lambda lines, _: b"".join(lines[:-1]) + lines[-1].split()[0] + b" 7\n",
                       r"the ids are not 0 to 50255, each once"),
}


@pytest.mark.parametrize("make, message", RANK_FILE_CASES.values(), ids=RANK_FILE_CASES.keys())
def test_broken_rank_file(tmp_path, shared_dir, trained_dir, make, message):
    rank_file = tmp_path / "gpt2.tiktoken"
    rank_file.write_bytes(make(rank_file_lines(shared_dir), trained_dir))
    with pytest.raises(TokenizerError, match=message) as refused:
        load_tokenizer(tiktoken_file=str(rank_file))
    assert str(rank_file) in str(refused.value)


def test_folder_or_broken_link_in_place_of_a_tokenizer_file(tmp_path, monkeypatch):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    with pytest.raises(TokenizerError, match=r"rank file .* is a directory: give the path of GPT-2's gpt2.tiktoken"):
        load_tokenizer(tiktoken_file=str(tmp_path))
    (tmp_path / "vocab.json").mkdir()
    with pytest.raises(TokenizerError, match=r"vocabulary .*vocab.json is a directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").rmdir()
    (tmp_path / "vocab.json").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(TokenizerError, match=r"vocab.json \(a symbolic link to nothing\) does not exist"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 from huggingface_hub's cache, for load_tokenizer() with no argument


def test_no_argument_reads_gpt2_from_the_hub_cache_offline(tmp_path, monkeypatch, trained_dir):
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.json").write_bytes((trained_dir / "vocab.json").read_bytes())  # vocab.json alone suffices
    (tmp_path / "hub" / "models--openai-community--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--openai-community--gpt2" / "refs" / "main").write_text("0" * 40)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # as $HF_HUB_CACHE at start-up sets it
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)

    def offline():
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(openai_public, "gpt2", offline)  # what tiktoken.get_encoding("gpt2") would call
    enc = load_tokenizer()
    assert enc.encode("Hello world") == [15496, 995] and enc.eot_token == EOT_ID


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT's character-level checkpoints and their meta.pkl

def test_character_vocabulary_from_meta_pkl(tmp_path, char_checkpoint):
    enc = load_tokenizer(char_checkpoint(tmp_path))
    assert isinstance(enc, tokenizer.CharTokenizer) and enc.n_vocab == 65 and enc.eot_token is None
    text = "ROMEO:\nBut soft, what light?"
    assert enc.encode(text, allowed_special={EOT}) == [sorted(set(enc.stoi)).index(c) for c in text]
    assert enc.decode(enc.encode(text)) == text
    assert b"".join(enc.decode_single_token_bytes(i) for i in enc.encode(text)) == text.encode()
    with pytest.raises(TokenizerError, match=r"lacks: '@' \(U\+0040\), 'é' \(U\+00E9\).*65 characters"):
        enc.encode("mail@café")


@pytest.mark.parametrize("where", ["beside", "above", "data_dir_of_the_repo", "data_dir_of_the_working_dir"])
def test_meta_pkl_is_found_where_nanogpt_keeps_it(tmp_path, monkeypatch, char_checkpoint, where):
    checkpoint = char_checkpoint(tmp_path / "repo" / "out-shakespeare-char")
    meta = checkpoint.parent / "meta.pkl"
    destination = {"beside": meta, "above": tmp_path / "repo" / "meta.pkl",
                   "data_dir_of_the_repo": tmp_path / "repo" / "data" / "shakespeare_char" / "meta.pkl",
                   "data_dir_of_the_working_dir": tmp_path / "elsewhere" / "data" / "shakespeare_char" / "meta.pkl"}
    destination[where].parent.mkdir(parents=True, exist_ok=True)
    meta.rename(destination[where])
    monkeypatch.chdir(destination["data_dir_of_the_working_dir"].parent.parent.parent if "working" in where else
                      tmp_path)
    enc = load_tokenizer(checkpoint.parent)  # the folder that holds ckpt.pt, or the file itself: the same
    assert isinstance(enc, tokenizer.CharTokenizer) and enc.source == destination[where]


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""

META_CASES = {
    "runs_code": (lambda: {"stoi": RunsCode()}, r"refused to read .*meta.pkl \(UnpicklingError: it names "
                                                r"pathlib.*only plain data is read"),
    "a_list": (lambda: list("abc"), r"meta.pkl has no stoi that maps single characters to ids"),
    "words_not_characters": (lambda: {"stoi": {"to": 0, "be": 1}, "itos": {0: "to", 1: "be"}},
                             r"has no stoi that maps single characters"),
    "itos_not_the_inverse": (lambda: {"stoi": {"a": 0, "b": 1}, "itos": {0: "b", 1: "a"}},
                             r"stoi's ids are not 0 to 1, each once, with itos their inverse"),
    "ids_with_a_gap": (lambda: {"stoi": {"a": 0, "b": 2}, "itos": {0: "a", 2: "b"}}, r"stoi's ids are not 0 to 1"),
    "lone_surrogate": (lambda: {"stoi": {"\ud800": 0}, "itos": {0: "\ud800"}}, r"characters that are not text"),
    "garbage": (lambda: bytes(range(128, 256)), r"refused to read .*meta.pkl \(ValueError: unsupported pickle"),
    "empty": (lambda: b"", r"refused to read .*meta.pkl \(EOFError"),
    "truncated": (lambda: pickle.dumps({"stoi": {"a": 0}})[:-3], r"refused to read .*meta.pkl"),
}


@pytest.mark.parametrize("make, message", META_CASES.values(), ids=META_CASES.keys())
def test_broken_meta_pkl(tmp_path, char_checkpoint, make, message):
    global MARKER
    MARKER = str(tmp_path / "code-ran")
    checkpoint = char_checkpoint(tmp_path, meta=make())
    with pytest.raises(TokenizerError, match=message) as refused:
        load_tokenizer(checkpoint)
    assert str(tmp_path / "meta.pkl") in str(refused.value)
    assert not Path(MARKER).exists()


def test_a_tokenizer_must_fit_the_models_vocabulary(tmp_path, shared_dir, char_checkpoint):
    gpt2 = load_tokenizer(tiktoken_file=str(shared_dir / "gpt2.tiktoken"))
    with pytest.raises(TokenizerError, match=r"GPT-2's tokenizer has 50,257 tokens, but the model's vocabulary has "
                                             r"65: .*needs the meta.pkl"):
        tokenizer.check_fits(gpt2, 65)
    tokenizer.check_fits(gpt2, 50304)  # nanoGPT pads GPT-2's vocabulary to 50304: the ids fit
    chars = load_tokenizer(char_checkpoint(tmp_path))
    tokenizer.check_fits(chars, 65)
    with pytest.raises(TokenizerError, match=r"meta.pkl's characters has 65 tokens, but the model's vocabulary has "
                                             r"50,304: .*belongs to another model"):
        tokenizer.check_fits(chars, 50304)


# ---------------------------------------------------------------------------------------------------------------
# A tokenizer that disagrees with itself (vocab.json against merges.txt) or with the model (its vocab_size)


def small_pair(folder: Path, merges: list[str], vocab: dict, header: str = "#version: 0.2\n",
               newline: str = "\n") -> Path:
    """folder with a vocab.json of the 256 bytes and the tokens given, and a merges.txt of the lines given."""
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(gpt2_bytes_vocab(**vocab)))
    (folder / "merges.txt").write_text(header + "".join(line + newline for line in merges), newline="")
    return folder


GOOD_MERGES, GOOD_VOCAB = ["a b", "ab c"], {"ab": 256, "abc": 257, EOT: 258}

MERGE_CASES = {  # each class of disagreement: (merges.txt's lines, vocab.json's tokens past the bytes, message)
    "vocab_has_tokens_no_merge_makes": (GOOD_MERGES, {"ab": 256, "abc": 257, "zz": 258, EOT: 259},
                                        r"vocab.json holds 259 tokens besides <\|endoftext\|>, and .*merges.txt has 2 "
                                        r"merges, which with the 256 bytes make 258: one of the two is cut short"),
    "vocab_cut_short": (GOOD_MERGES, {"ab": 256, EOT: 257}, r"holds 257 tokens besides .* make 258"),
    "merges_cut_short": (GOOD_MERGES[:1], GOOD_VOCAB, r"holds 258 tokens besides .* has 1 merges, .* make 257"),
    "merge_names_a_token_the_vocab_lacks": (["a b", "xy c"], {"ab": 256, "xyc": 257, EOT: 258},
                                            r"merges.txt, line 3: it merges 'xy', which vocab.json lacks: .*vocab.json "
                                            r"and .*merges.txt disagree"),
    "merge_makes_a_token_the_vocab_lacks": (GOOD_MERGES, {"ab": 256, "abd": 257, EOT: 258},
                                            r"line 3: it makes 'abc', which vocab.json lacks"),
    "ids_out_of_merge_order": (GOOD_MERGES, {"ab": 257, "abc": 256, EOT: 258},
                               r"line 2: it makes 'ab', whose id is 257, and GPT-2's layout gives merge 0 the id 256"),
    "merge_of_a_token_made_later": (["ab c", "a b"], {"abc": 256, "ab": 257, EOT: 258},
                                    r"line 2: it merges 'ab', whose id 257 is not below the merge's own 256"),
    "not_two_tokens": (["a b", "ab c d"], GOOD_VOCAB, r"line 3: 'ab c d' is not two tokens separated by a space"),
    "empty_line": (["a b", "", "ab c"], {"ab": 256, "xx": 257, "abc": 258, EOT: 259}, r"line 3: '' is not two tokens"),
}


@pytest.mark.parametrize("merges, vocab, message", MERGE_CASES.values(), ids=MERGE_CASES.keys())
def test_vocab_and_merges_that_disagree(tmp_path, monkeypatch, merges, vocab, message):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    folder = small_pair(tmp_path, merges, vocab)
    with pytest.raises(TokenizerError, match=message) as refused:
        load_tokenizer(folder)
    assert "restore both from the model's repository" in str(refused.value)


@pytest.mark.parametrize("header, newline", [("#version: 0.2\n", "\n"), ("", "\n"), ("#version: 0.2\r\n", "\r\n")])
def test_a_pair_that_agrees_is_read_with_or_without_header_and_crlf(tmp_path, monkeypatch, header, newline):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    enc = load_tokenizer(small_pair(tmp_path, GOOD_MERGES, GOOD_VOCAB, header, newline))
    assert enc.encode("abc ab a") == [257, ord(" "), 256, ord(" "), ord("a")] and enc.n_vocab == 259


def test_a_merges_file_that_is_not_text_or_not_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    folder = small_pair(tmp_path, GOOD_MERGES, GOOD_VOCAB)
    (folder / "merges.txt").write_bytes(b"#version: 0.2\na b\n\xff\xfe c\n")
    with pytest.raises(TokenizerError, match=r"merges.txt is not UTF-8 text"):
        load_tokenizer(folder)
    (folder / "merges.txt").unlink()
    (folder / "merges.txt").mkdir()
    with pytest.raises(TokenizerError, match=r"tokenizer merges .*merges.txt is a directory"):
        load_tokenizer(folder)


def model_folder(folder: Path, trained_dir: Path, vocab_size: int, vocab: Optional[dict] = None,
                 merges: bool = True) -> Path:
    """A model folder as load_tokenizer sees one: config.json (vocab_size as given), vocab.json (GPT-2's, or the
    map given) and GPT-2's merges.txt (or none). No weights: the tokenizer reads only the config."""
    folder.mkdir()
    config = json.loads((trained_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))
    (folder / "vocab.json").write_text(json.dumps(vocab) if vocab else (trained_dir / "vocab.json").read_text())
    if merges:
        (folder / "merges.txt").write_bytes((trained_dir / "merges.txt").read_bytes())
    return folder


def first_of_gpt2_vocab(trained_dir: Path, n: int) -> dict:
    return dict(list(json.loads((trained_dir / "vocab.json").read_text()).items())[:n])


def test_gpt2_vocab_cut_to_a_thousand_tokens_beside_gpt2_merges(tmp_path, trained_dir, monkeypatch):
    """The issue's case: once accepted, and samples decoded to garbage."""
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    folder = model_folder(tmp_path / "m", trained_dir, 50257, first_of_gpt2_vocab(trained_dir, 1000))
    with pytest.raises(TokenizerError, match=r"vocab.json holds 1,000 tokens besides <\|endoftext\|>, and .*merges.txt "
                                             r"has 50,000 merges, which with the 256 bytes make 50,256"):
        load_tokenizer(folder)


@pytest.mark.parametrize("vocab_size, tokens, message", [
    (50257, 1000, r"the tokenizer in .*vocab.json has 1,001 tokens, but the model's vocabulary has 50,257: they do "
                  r"not belong together \(the model has embeddings for 49,256 tokens it lacks: a vocab.json cut short"),
    (50000, None, r"the tokenizer in .*vocab.json has 50,257 tokens, but the model's vocabulary has 50,000: .*its own "
                  r"vocab.json"),
    (60000, None, r"has 50,257 tokens, but the model's vocabulary has 60,000: .*embeddings for 9,743 tokens it lacks"),
    (50258, None, r"has 50,257 tokens, but the model's vocabulary has 50,258"),  # one more token: not padding
])
def test_a_vocabulary_of_another_size_than_the_models(tmp_path, trained_dir, monkeypatch, vocab_size, tokens,
                                                      message):
    """A vocab.json alone (no merges.txt to hold it against), or GPT-2's whole, beside a model of another size."""
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    vocab = None if tokens is None else {**first_of_gpt2_vocab(trained_dir, tokens), EOT: tokens}
    folder = model_folder(tmp_path / "m", trained_dir, vocab_size, vocab, merges=tokens is None)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(folder)


@pytest.mark.parametrize("vocab_size", [50257, 50264, 50304, 50432])
def test_gpt2_files_fit_the_model_and_its_padding(tmp_path, trained_dir, monkeypatch, vocab_size):
    """GPT-2's own files fit a model of 50,257 tokens, or of that rounded up to a multiple of 8, 64 (nanoGPT) or
    128 (Megatron-LM)."""
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)
    enc = load_tokenizer(model_folder(tmp_path / "m", trained_dir, vocab_size))
    assert enc.encode("Hello world") == [15496, 995] and enc.source == tmp_path / "m" / "vocab.json"
    tokenizer.check_fits(enc, vocab_size)


def test_padding_is_rounding_up_to_a_power_of_two_of_at_least_8():
    assert tokenizer.padded(50257, 50304) and tokenizer.padded(50257, 50264) and tokenizer.padded(50257, 50432)
    assert tokenizer.padded(1001, 1024) and tokenizer.padded(65, 72)
    assert not tokenizer.padded(50257, 50258) and not tokenizer.padded(50257, 50305)
    assert not tokenizer.padded(1001, 50257)
    assert not tokenizer.padded(50257, 50257) and not tokenizer.padded(50257, 50256)



def test_a_small_model_without_a_vocabulary_of_its_own_is_refused_before_any_gpt2_source(
        tmp_path, trained_dir, char_checkpoint, monkeypatch):
    """No GPT-2 source could fit a model of fewer tokens: none is tried (offline, a download would fail and the
    message would be about that), and the message says what the model needs."""
    monkeypatch.delenv(tokenizer.TIKTOKEN_FILE_ENV, raising=False)

    def no_download():
        raise AssertionError("GPT-2's files were asked for")

    monkeypatch.setattr(openai_public, "gpt2", no_download)
    monkeypatch.setattr(tokenizer, "hub_cached_vocab", no_download)
    checkpoint = char_checkpoint(tmp_path / "char", meta=None)
    with pytest.raises(TokenizerError, match=r"char is a model of 65 tokens, fewer than GPT-2's 50,257: a "
                                             r"character-level nanoGPT model .*needs the meta.pkl .*copy it beside"):
        load_tokenizer(checkpoint.parent)
    folder = model_folder(tmp_path / "hf", trained_dir, 1000)
    (folder / "vocab.json").unlink()
    with pytest.raises(TokenizerError, match=r"hf's vocabulary has 1,000 tokens, fewer than GPT-2's 50,257, and the "
                                             r"folder has no vocab.json: .*own vocab.json and merges.txt there"):
        load_tokenizer(folder)
