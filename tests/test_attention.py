"""attention.py: the probabilities it draws, the GIF it writes, and its answers to bad settings."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import attention
from model import GPT
from tokenizer import EOT_ID, load_tokenizer


def run_script(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """attention.py run as `python attention.py args` would run it, in this process (one torch import for all
    the runs, and fresh settings for each): (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["attention.py", *args])
    try:
        runpy.run_path(attention.__file__, run_name="__main__")
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def script(monkeypatch, capsys):
    return lambda *args: run_script(monkeypatch, capsys, *args)


@pytest.fixture(scope="module")
def sequence(trained) -> torch.Tensor:
    """A full-context sequence, <|endoftext|> then random tokens, so every position of the picture is checked."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, trained.config.vocab_size - 1, (1, trained.config.block_size), generator=g)
    ids[0, 0] = EOT_ID
    return ids


def test_probabilities_are_causal_and_normalised(trained, sequence):
    probs = torch.from_numpy(attention.attention_probs(trained, sequence))
    n_layer, n_head, T = trained.config.n_layer, trained.config.n_head, sequence.size(1)
    assert probs.shape == (n_layer, n_head, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(probs[..., future] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(n_layer, n_head, T), rtol=0, atol=1e-5)


def test_probabilities_match_transformers(trained, trained_dir, sequence):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(trained_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch.stack(hf(sequence, output_attentions=True).attentions)[:, 0]
    probs = torch.from_numpy(attention.attention_probs(trained, sequence))
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)


def test_gif_has_one_frame_per_head(script, trained_dir, tmp_path):
    gif, png = tmp_path / "out" / "attention.gif", tmp_path / "frame.png"
    # --text rather than generation keeps this test fast; test_chosen_layers_and_heads generates.
    assert script(f"--init_from={trained_dir}", "--text=The while statement", f"--out={gif}", f"--png={png}",
                  "--frame=3", "--duration=250")[0] == 0
    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert im.n_frames == 4  # heads 1-4 of the trained model
        assert im.size == attention.frame_size(4)  # layers 1-4 side by side
        assert im.info["duration"] == 250
    with Image.open(png) as im:
        assert im.size == attention.frame_size(4)


def test_chosen_layers_and_heads(script, small_dir, tmp_path):
    gif = tmp_path / "a.gif"
    # 2 and 2,1 read as Python would be an int and a tuple: a str setting keeps the text as typed.
    assert script(f"--init_from={small_dir}", "--length=16", "--layers=2", "--heads=2,1", "--temperature=0",
                  f"--out={gif}")[0] == 0
    with Image.open(gif) as im:
        assert (im.n_frames, im.size) == (2, attention.frame_size(1))


def test_text_replaces_generation(trained_dir, capsys):
    enc = load_tokenizer(trained_dir)
    assert attention.text_ids(enc, "Hello world", 256).tolist() == [[EOT_ID, 15496, 995]]
    assert attention.text_ids(enc, "Hello world", 2).tolist() == [[EOT_ID, 15496]]
    assert "drawing the first 1" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--layers=1,5"], "--layers names 5, but the model has 4 layers"),
    (["--heads=0"], "--heads names 0, but the model has 4 heads"),
    (["--length=257"], "--length=257 is outside this model's context: use a length from 1 to 256"),
    (["--length=0"], "--length=0 is outside"),
    (["--png=x.png", "--frame=5"], "--frame=5 is not a head of this model"),
    (["--frame=2"], "--frame chooses the head that --png shows"),
    (["--duration=0"], "--duration=0"),
    (["--text="], "--text is empty"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--text=hi", "--tiktoken_file=/no/such.tiktoken"], "tokenizer rank file /no/such.tiktoken does not exist"),
])
def test_bad_settings_get_clear_messages(script, trained_dir, tmp_path, options, message):
    out = tmp_path / "a.gif"
    status, _, err = script(f"--init_from={trained_dir}", f"--out={out}", *options)
    assert status == 2
    assert err.startswith("attention.py: error: ") and message in err
    assert not out.exists()


def test_unloadable_model_and_malformed_list(script, tmp_path):
    status, _, err = script(f"--init_from={tmp_path / 'missing'}")
    assert status == 2
    assert "no such file or folder" in err
    status, _, err = script("--layers=one,two")  # refused before any model loads: gpt2 is not fetched
    assert status == 2
    assert "'one,two' is not a comma-separated list of numbers" in err


def test_character_level_model_is_refused(script, tmp_path, char_checkpoint):
    status, _, err = script(f"--init_from={char_checkpoint(tmp_path)}", f"--out={tmp_path / 'a.gif'}")
    assert status == 2
    assert "vocabulary has 65 tokens: attention.py starts every sequence with GPT-2's <|endoftext|>" in err
    assert not (tmp_path / "a.gif").exists()


def test_help_lists_the_settings(script):
    status, out, _ = script("--help")
    assert status == 0
    for setting in ("init_from='gpt2'", "text=None", "length=256", "layers='1,2,3,4'", "heads='all'",
                    "duration=1000", "out='assets/attention.gif'", "png=None", "frame=None", "temperature=0.8",
                    "top_k=200", "seed=1337", "tiktoken_file=None"):
        assert f"--{setting}" in out
    assert "milliseconds per frame" in out  # each setting's comment explains it


def test_command_line_error_has_no_traceback(small_dir):
    result = subprocess.run([sys.executable, "attention.py", f"--init_from={small_dir}"], capture_output=True,
                            text=True, cwd=Path(attention.__file__).parent, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == ("attention.py: error: --length=256 is outside this model's context: use a "
                                     "length from 1 to 64 (its block_size)")
