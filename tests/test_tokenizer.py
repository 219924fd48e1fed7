"""tokenizer.py gives the ids of tiktoken's own GPT-2 encoding and of transformers' GPT2TokenizerFast, from each of
its offline sources, on text that stresses the byte-pair encoding and the pre-tokenizer split."""

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
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

    def offline(name):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match="--tiktoken_file"):
        load_tokenizer(tmp_path)
