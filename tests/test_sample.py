"""sample.py end to end: as a subprocess where the process itself is the point (output format, terminal versus
pipe, Ctrl-C, a closed pipe, exit statuses), and run in process through runpy for the many flags and bad inputs,
which share one torch import and so stay fast."""

import os
import pty
import runpy
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from model import GPT
from runtime import CPU_WEIGHTS
from tokenizer import EOT, EOT_ID, load_tokenizer

SEPARATOR = "\n---------------\n"
ROOT = Path(__file__).resolve().parent.parent  # where sample.py is run
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # steadier on a small machine that other jobs share


def run_process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120, **kwargs)


def run_inprocess(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """sample.py run as `python sample.py args` would run it, in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


pytestmark = pytest.mark.usefixtures("one_thread")  # as ENV gives the subprocesses


@pytest.fixture
def sample(monkeypatch, capsys):
    return lambda *args: run_inprocess(monkeypatch, capsys, *args)


def expected_text(folder, prompt_ids, num_samples, max_new_tokens, quantize=CPU_WEIGHTS, **options) -> str:
    """What sample.py must print: each row of model.generate decoded in full, then a line of dashes. quantize: the
    weights of the model sample.py loads (its default on a CPU, unless --dtype says otherwise)."""
    model = GPT.from_pretrained(str(folder), quantize=quantize)
    enc = load_tokenizer(folder)
    rows = model.generate(torch.tensor([prompt_ids]), max_new_tokens, num_samples=num_samples, **options)
    return "".join(enc.decode(row) + SEPARATOR for row in rows.tolist())


def samples(out: str) -> list[str]:
    assert out.endswith(SEPARATOR)
    return out[:-len(SEPARATOR)].split(SEPARATOR)


# ---------------------------------------------------------------------------------------------------------------
# As a process


def test_default_output_format(trained_dir):
    run = run_process(f"--init_from={trained_dir}", "--num_samples=3", "--max_new_tokens=12")
    assert run.returncode == 0, run.stderr
    # nanoGPT's defaults: start "\n", temperature 0.8, top_k 200, seed 1337; the prompt is part of each sample.
    assert run.stdout == expected_text(trained_dir, [198], 3, 12, temperature=0.8, top_k=200, seed=1337)
    assert len(samples(run.stdout)) == 3
    assert (f"loaded {trained_dir} (7,259,008 params) on cpu/float32 with fp16 weights (the CPU default; "
            f"--dtype=float32 for float32 weights) in ") in run.stderr
    assert "generated 36 tokens (12 steps x 3 samples)" in run.stderr and "tokens/s" in run.stderr


def read_terminal(args: list[str]) -> tuple[str, list[float]]:
    """Run sample.py with stdout on a pseudo-terminal: everything it wrote there, and when each chunk arrived."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" to "\r\n" translation: compare bytes as written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, stdout=slave,
                            stderr=subprocess.DEVNULL)
    os.close(slave)
    chunks, times = [], []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        assert ready, "sample.py wrote nothing for 120 s"
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
        times.append(time.monotonic())
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode("utf-8"), times


def test_terminal_streams_the_same_text_as_a_pipe(small_dir):
    args = [f"--init_from={small_dir}", "--num_samples=3", "--max_new_tokens=40", "--start=Once upon"]
    piped = subprocess.Popen([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)  # meanwhile, on the other core
    streamed, times = read_terminal(args)
    assert streamed == piped.communicate(timeout=120)[0]
    assert piped.returncode == 0
    assert len(samples(streamed)) == 3
    assert len(times) > 1  # written as generated, not in one piece at the end


def test_ctrl_c_keeps_what_was_generated(small_dir):
    proc = subprocess.Popen([sys.executable, "sample.py", f"--init_from={small_dir}", "--num_samples=2",
                             "--max_new_tokens=100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until generation is under way
        if line.startswith("loaded"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert len(samples(out)) == 2  # both samples, each cut where generation stopped
    assert all(len(s) > 1 for s in samples(out))


def test_closed_pipe_ends_quietly(small_dir):
    """`python sample.py | head -c 200`: the reader goes away early; no traceback, and no generating on for nothing."""
    proc = subprocess.Popen([sys.executable, "sample.py", f"--init_from={small_dir}", "--max_new_tokens=100000",
                             "--stream=True"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read1(200)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert head and "Traceback" not in err and "Error" not in err


def test_bad_input_exit_status_as_a_process(tmp_path):
    missing = run_process(f"--start=FILE:{tmp_path / 'missing.txt'}")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == f"sample.py: error: cannot read the prompt file '{tmp_path / 'missing.txt'}': " \
                             f"No such file or directory\n"
    no_cuda = run_process("--device=cuda")
    assert no_cuda.returncode == 2 and "CUDA is not available" in no_cuda.stderr


# ---------------------------------------------------------------------------------------------------------------
# Flags, in process


def test_start_num_samples_max_new_tokens_temperature_top_k_seed(sample, small_dir):
    status, out, _ = sample(f"--init_from={small_dir}", "--start=Hello world", "--num_samples=2",
                            "--max_new_tokens=7", "--temperature=1.3", "--top_k=5", "--seed=11")
    assert status == 0
    assert out == expected_text(small_dir, [15496, 995], 2, 7, temperature=1.3, top_k=5, seed=11)
    assert all(s.startswith("Hello world") for s in samples(out))


def test_top_p_and_no_top_k(sample, small_dir):
    status, out, _ = sample(f"--init_from={small_dir}", "--start=Hi", "--num_samples=2", "--max_new_tokens=6",
                            "--top_p=0.5", "--top_k=None", "--temperature=1")
    assert status == 0
    assert out == expected_text(small_dir, [17250], 2, 6, temperature=1.0, top_k=None, top_p=0.5, seed=1337)


def test_seed_repeats_and_differs(sample, small_dir):
    args = [f"--init_from={small_dir}", "--num_samples=2", "--max_new_tokens=10", "--temperature=1.5"]
    first, again, other = (sample(*args, f"--seed={s}")[1] for s in (5, 5, 6))
    assert first == again and first != other


def test_greedy_samples_agree(sample, small_dir):
    status, out, _ = sample(f"--init_from={small_dir}", "--num_samples=3", "--max_new_tokens=8",
                            "--temperature=0")
    assert status == 0 and len(set(samples(out))) == 1


def test_stop_at_eot(sample, trained_dir):
    args = [f"--init_from={trained_dir}", "--num_samples=6", "--max_new_tokens=60", "--start=", "--seed=6"]
    _, full, _ = sample(*args)
    status, stopped, err = sample(*args, "--stop_at_eot=True")
    assert status == 0 and "starting from <|endoftext|>" in err
    assert any(EOT in s for s in samples(full))  # seed 6: the second sample draws <|endoftext|> at step 21
    assert samples(stopped) == [s.split(EOT)[0] for s in samples(full)]


def test_file_prompt(sample, small_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Übung macht den Meister — 日本 😀\n", encoding="utf-8")
    status, out, _ = sample(f"--init_from={small_dir}", f"--start=FILE:{prompt}", "--num_samples=1",
                            "--max_new_tokens=3")
    assert status == 0 and out.startswith("Übung macht den Meister — 日本 😀\n")


def test_empty_prompt_starts_from_eot(sample, small_dir, tmp_path):
    status, out, err = sample(f"--init_from={small_dir}", "--start=", "--num_samples=1", "--max_new_tokens=4")
    assert status == 0 and "starting from <|endoftext|>" in err
    assert out == expected_text(small_dir, [EOT_ID], 1, 4, temperature=0.8, top_k=200, seed=1337)[len(EOT):]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    status, _, err = sample(f"--init_from={small_dir}", f"--start=FILE:{empty}", "--max_new_tokens=1")
    assert status == 0 and "starting from <|endoftext|>" in err


def test_special_token_in_prompt(sample, small_dir):
    status, out, _ = sample(f"--init_from={small_dir}", "--start=a<|endoftext|>b", "--num_samples=1",
                            "--max_new_tokens=2")
    assert status == 0 and out.startswith("a<|endoftext|>b")


def test_long_prompt_keeps_its_end(sample, small_dir):
    enc = load_tokenizer(small_dir)
    words = " ".join(f"w{i}" for i in range(100))  # far more than the 64-position context
    status, out, err = sample(f"--init_from={small_dir}", f"--start={words}", "--num_samples=1",
                              "--max_new_tokens=3")
    assert status == 0 and "longer than the model's context of 64: keeping its last 64" in err
    assert out.startswith(enc.decode(enc.encode(words)[-64:]))


def test_device_dtype_and_tiktoken_file(sample, small_dir, shared_dir):
    status, out, err = sample(f"--init_from={small_dir}", "--num_samples=2", "--max_new_tokens=5", "--device=cpu",
                              "--dtype=float32", f"--tiktoken_file={shared_dir / 'gpt2.tiktoken'}")
    assert status == 0 and "on cpu/float32 in" in err  # float32 weights: no "with ... weights"
    assert out == expected_text(small_dir, [198], 2, 5, quantize=None, temperature=0.8, top_k=200, seed=1337)
    for name in ("bfloat16", "float16"):
        status, out, err = sample(f"--init_from={small_dir}", "--num_samples=2", "--max_new_tokens=5",
                                  f"--dtype={name}")
        assert status == 0 and f"on cpu/{name}" in err and len(samples(out)) == 2


def test_character_level_model_writes_its_characters(sample, tmp_path, char_checkpoint):
    """A nanoGPT shakespeare_char checkpoint: its meta.pkl is the tokenizer, as in nanoGPT's sample.py."""
    checkpoint = char_checkpoint(tmp_path)
    status, out, err = sample(f"--init_from={checkpoint}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=20")
    assert status == 0, err
    prompt = load_tokenizer(checkpoint).encode("ROMEO:")
    assert out == expected_text(checkpoint, prompt, 2, 20, temperature=0.8, top_k=200, seed=1337)


@pytest.mark.parametrize("meta, args, message", [
    (None, [], "GPT-2's tokenizer has 50,257 tokens, but the model's vocabulary has 65"),
    ("plain", ["--stop_at_eot=True"], f"a character-level model, without {EOT}: --stop_at_eot has nothing to stop"),
    ("plain", ["--start="], f"a character-level model, without {EOT}: give it a prompt to start from (--start)"),
    ("plain", ["--start=naïve"], "the text holds characters that the vocabulary of"),
])
def test_character_level_model_refusals(sample, tmp_path, shared_dir, char_checkpoint, meta, args, message):
    checkpoint = char_checkpoint(tmp_path, meta=meta)
    status, out, err = sample(f"--init_from={checkpoint}", "--max_new_tokens=3",
                              f"--tiktoken_file={shared_dir / 'gpt2.tiktoken'}", *args)
    assert status == 2 and out == "" and "Traceback" not in err
    assert message in err


def test_quantize(sample, small_dir):
    args = [f"--init_from={small_dir}", "--num_samples=2", "--max_new_tokens=6"]
    for kind in ("int8", "fp16"):
        status, out, err = sample(*args, f"--quantize={kind}")
        assert status == 0 and len(samples(out)) == 2, err
    status, out, err = sample(*args, "--quantize=int4")
    assert (status, out) == (2, "") and "--quantize takes int8 or fp16 on the CPU only, got 'int4'" in err


def test_stream_flag_gives_the_same_text(sample, small_dir):
    args = [f"--init_from={small_dir}", "--num_samples=3", "--max_new_tokens=12"]
    assert sample(*args, "--stream=True")[1] == sample(*args, "--stream=False")[1] == sample(*args)[1]


def test_compile_on_a_cpu_stays_eager_and_says_why(sample, small_dir):
    args = [f"--init_from={small_dir}", "--num_samples=2", "--max_new_tokens=6", "--temperature=0"]
    status, out, err = sample(*args, "--compile=True")
    assert status == 0 and out == sample(*args)[1]
    assert "--compile=True: decoding stays eager on the CPU" in err and "compilation" not in err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------------
# Bad input, in process: each a message and exit status 2 before any model is loaded


@pytest.mark.parametrize("arg,message", [
    ("--temperature=-0.5", "temperature must be >= 0"),
    ("--top_k=0", "top_k must be >= 1 or None"),
    ("--top_p=0", "top_p must be in (0, 1] or None"),
    ("--top_p=1.5", "top_p must be in (0, 1] or None"),
    ("--num_samples=0", "num_samples must be >= 1"),
    ("--max_new_tokens=-1", "max_new_tokens must be >= 0"),
    ("--device=cuda", "--device=cuda but CUDA is not available here"),
    ("--device=cuda:1", "CUDA is not available here"),
    ("--device=tpu", "unknown device 'tpu'"),
    ("--dtype=float64", "unknown dtype 'float64'"),
    ("--init_from=/no/such/model", "no such file or folder: /no/such/model"),
    ("--init_from=not-a-model", "unknown model 'not-a-model'"),
    ("--tiktoken_file=/no/such.tiktoken", "tokenizer rank file /no/such.tiktoken does not exist"),
    ("--temprature=1", "unknown setting 'temprature': did you mean --temperature?"),
])
def test_bad_input(sample, small_dir, monkeypatch, arg, message):
    loaded = []
    monkeypatch.setattr(GPT, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    status, out, err = sample(f"--init_from={small_dir}", arg)
    assert (status, out, loaded) == (2, "", [])
    assert err.startswith("sample.py: error: ") and message in err and "Traceback" not in err


def test_bad_prompt_files(sample, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    status, _, err = sample(f"--start=FILE:{latin1}")
    assert status == 2 and "is not UTF-8 text (byte 0xe9 at offset 3)" in err
    status, _, err = sample(f"--start=FILE:{tmp_path}")
    assert status == 2 and "cannot read the prompt file" in err and "Is a directory" in err
    unreadable = tmp_path / "secret.txt"
    unreadable.write_text("x")
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):
        pytest.skip("running as root: permissions do not stop reading")
    status, _, err = sample(f"--start=FILE:{unreadable}")
    assert status == 2 and "Permission denied" in err


# ---------------------------------------------------------------------------------------------------------------
# Writing: characters are never split, samples come out in order


class Recorder:
    def __init__(self):
        self.writes, self.flushes = [], 0

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        self.flushes += 1


def test_a_character_split_over_tokens_is_written_whole(trained_dir):
    from sample import SampleWriter

    enc = load_tokenizer(trained_dir)
    text = " 😀 naïve 日本語"
    tokens = enc.encode(text)
    assert len(tokens) > len(text.split())  # some characters do span several tokens
    out = Recorder()
    writer = SampleWriter(enc, [198], stop_at_eot=False, live=True, out=out)
    writer.begin(1)
    for token in tokens:
        writer.add([token])
    writer.finish()
    assert "".join(out.writes) == "\n" + text + SEPARATOR
    assert not any("\N{REPLACEMENT CHARACTER}" in w for w in out.writes)
    assert out.flushes == len(tokens) + 1


def test_live_writer_streams_the_first_unfinished_sample(trained_dir):
    from sample import SampleWriter

    enc = load_tokenizer(trained_dir)
    a, b, c = enc.encode(" a"), enc.encode(" b"), enc.encode(" c")
    out = Recorder()
    writer = SampleWriter(enc, enc.encode("P"), stop_at_eot=True, live=True, out=out)
    writer.begin(2)
    writer.add([a[0], b[0]])
    assert "".join(out.writes) == "P a"  # the first sample as it grows; the second waits
    writer.add([EOT_ID, c[0]])
    assert "".join(out.writes) == "P a" + SEPARATOR + "P b c"  # the first ended: the second catches up
    writer.add([EOT_ID, EOT_ID])
    writer.finish()
    assert "".join(out.writes) == "P a" + SEPARATOR + "P b c" + SEPARATOR


def test_example_config_file(sample, small_dir):
    status, out, err = sample(str(ROOT / "config" / "sample_short.py"), f"--init_from={small_dir}",
                              "--max_new_tokens=4")
    assert status == 0 and len(samples(out)) == 3 and "x 3 samples)" in err  # the file's num_samples
