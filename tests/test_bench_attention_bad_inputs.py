"""bench.py and attention.py against wrong settings (exit status 2 and a message naming the setting, before anything
slow runs), bench.py's own status for a token mismatch, and every script stopped by Ctrl-C or SIGTERM while
starting."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attention
import runtime
from errors import UsageError
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def refused(result: tuple[int, str, str], script: str, message: str) -> None:
    status, out, err = result
    assert status == 2 and out == ""
    assert err.startswith(f"{script}: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--batch_sizes=0"], "--batch_sizes='0': each batch size must be at least 1"),
    (["--batch_sizes=-1,2"], "each batch size must be at least 1"),
    (["--batch_sizes=a,b"], "--batch_sizes='a,b' is not a comma-separated list of batch sizes"),
    (["--batch_sizes=1,,2"], "is not a comma-separated list"),
    (["--batch_sizes="], "--batch_sizes is empty"),
    (["--batch_sizes=1,1"], "and given once"),
    (["--slow_batches=x"], "--slow_batches='x' is not a comma-separated list"),
    (["--repeats=0"], "--repeats=0: it must be at least 1"),
    (["--new_tokens=0"], "--new_tokens=0: it must be at least 2"),
    (["--new_tokens=1"], "decode speed is timed from the second token on"),
    (["--prompt_len=0"], "--prompt_len=0: it must be at least 1"),
    (["--prompt_len=1000"], "--prompt_len=1000 plus --new_tokens=64 is more than --block_size=1024"),
    (["--workload_samples=0"], "--workload_samples=0: it must be at least 1"),
    (["--bandwidth_mb=0"], "--bandwidth_mb=0: it must be at least 1"),
    (["--n_layer=0"], "--n_layer=0: it must be at least 1"),
    (["--n_embd=100"], "--n_embd=100 is not a multiple of --n_head=12"),
    (["--threads=0"], f"--threads=0: give from 1 to this machine's {os.cpu_count()} CPUs"),
    (["--threads=100000"], "--threads=100000: give from 1 to"),  # once a segmentation fault in torch's thread pool
    (["--max_seconds=0"], "--max_seconds=0.0: give a time limit above 0 seconds"),
    (["--max_seconds=1e999"], "max_seconds expects a finite number, got inf"),
    (["--seed=-1"], "--seed=-1: give a seed from 0 to 2**64-1"),
    (["--device=cuda"], "--device=cuda but CUDA is not available here"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--dtype=float32,float64"], "unknown dtype 'float64'"),
    (["--quantize=int4"], "quantize must be int8, fp16, int8,fp16 or None, got 'int4'"),
    (["--draft=int4"], "draft must be int8, fp16, int8,fp16 or None, got 'int4'"),
    (["--draft_tokens=0"], "--draft_tokens=0: a draft proposes 1 to 64 tokens a round"),
    (["--draft_tokens=65"], "--draft_tokens=65: a draft proposes 1 to 64 tokens a round"),
])
def test_bench_settings(run_script, args, message):
    refused(run_script("bench.py", *args), "bench.py", message)


@pytest.mark.parametrize("args, message", [
    (["--n_layer=100000"], "random weights of 708,826,585,344 parameters (--n_layer, --n_embd, --vocab_size, "
                           "--block_size), in every copy bench.py compares, take about"),
    (["--vocab_size=9223372036854775807"], "in every copy bench.py compares, take about"),
    (["--batch_sizes=1,9223372036854775807"], "--batch_sizes=1,9223372036854775807: a batch of "
                                              "9,223,372,036,854,775,807 rows takes about"),
    (["--workload_samples=9223372036854775807"], "--workload_samples=9223372036854775807: (d)'s "
                                                 "9,223,372,036,854,775,807 samples of 500 tokens take about"),
    (["--workload_tokens=9223372036854775807"], "--workload_tokens=9223372036854775807: (d)'s 10 samples of "
                                                "9,223,372,036,854,775,807 tokens take about"),
    (["--busy_core=True", "--busy_samples=9223372036854775807"], "--busy_samples=9223372036854775807: (f)'s "
                                                                 "9,223,372,036,854,775,807 samples of 300 tokens"),
    (["--bandwidth_mb=9223372036854775807"], "--bandwidth_mb=9223372036854775807: the buffer read to measure "
                                             "bandwidth does not fit beside the model"),
])
def test_bench_sizes_no_machine_holds(run_script, monkeypatch, args, message):
    """Each size setting past what the memory holds is refused at once, saying the most that fits (16 GB here)."""
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 16 * 10 ** 9)
    result = run_script("bench.py", *args)
    refused(result, "bench.py", message)
    assert "16,000 MB available on cpu" in result[2]
    assert any(most in result[2] for most in ("at most", "make the model smaller", "fewer tokens"))


def test_bench_token_mismatch_has_its_own_status(run_script, monkeypatch):
    """Status 3 when transformers' greedy tokens differ from ours: told apart from a crash (1) and a setting (2)."""
    from transformers import GPT2LMHeadModel

    generate = GPT2LMHeadModel.generate

    def one_token_off(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % self.config.vocab_size
        return out

    monkeypatch.setattr(GPT2LMHeadModel, "generate", one_token_off)
    status, out, _ = run_script("bench.py", "--quick", "--dtype=float32", "--quantize=None", "--batch_sizes=1",
                                "--reference=False", "--workload=False", "--bandwidth_mb=1")
    assert status == 3
    assert "batch 1: float32 greedy tokens, (a) ours vs (b) transformers: DIFFER" in out
    assert "3 done, but those tokens differ" in run_script("bench.py", "--help")[1]  # documented


@pytest.fixture
def draw(run_script, small_dir, tmp_path):
    """attention.py on the small model, its GIF in tmp_path: (status, stdout, stderr)."""
    return lambda *args: run_script("attention.py", f"--init_from={small_dir}", f"--out={tmp_path / 'a.gif'}",
                                    *args)


@pytest.mark.parametrize("args, message", [
    (["--duration=15"], "--duration=15: a GIF stores a frame's time in hundredths of a second"),
    (["--duration=5"], "give milliseconds that are a multiple of 10, from 10 to 655350"),
    (["--duration=655360"], "--duration=655360"),
    (["--duration=-10"], "--duration=-10"),
    (["--temperature=1e999"], "temperature expects a finite number, got inf"),
    (["--seed=18446744073709551616"], "seed must be in -2**63..2**64-1"),
    (["--top_k=-5"], "top_k must be >= 1 or None, got -5"),
    (["--layers="], "--layers: '' is not a comma-separated list of numbers"),
    (["--heads=1,1"], "--heads: '1,1' names a number twice"),
    (["--length=65"], "--length=65 is outside this model's context: use a length from 1 to 64"),
])
def test_attention_settings(draw, tmp_path, args, message):
    refused(draw(*args), "attention.py", message)
    assert not (tmp_path / "a.gif").exists()


def test_attention_longer_than_the_memory_holds(draw, monkeypatch):
    """Every layer's and head's probabilities are held at once: a length past the memory is refused at once, saying
    the longest that fits."""
    config = GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600)  # gpt2-xl's shape
    with pytest.raises(UsageError, match=r"^--length=1024: the attention probabilities of all 48 layers and 25 heads "
                                         r"over 1024 tokens take about 10,066 MB, more than the 8,000 MB available: "
                                         r"use --length=816 or less$"):
        attention.check_memory(config, 1024, 8 * 10 ** 9)
    attention.check_memory(config, 816, 8 * 10 ** 9)
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 100_000)
    refused(draw("--length=64"), "attention.py", "--length=64: the attention probabilities of all 2 layers and 2 "
                                                 "heads over 64 tokens take about")


def test_attention_memory_running_out(draw, monkeypatch):
    failed = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1827545548 bytes.")
    # The probabilities pass is the one of attention.py's passes that takes its positions from GPT._positions
    monkeypatch.setattr(GPT, "_positions", lambda self, idx: (_ for _ in ()).throw(failed))
    status, out, err = draw("--length=16", "--layers=1,2")
    assert status == 1 and out == "" and "Traceback" not in err
    assert "attention.py: error: out of memory (an allocation of 1,828 MB failed): lower --length (now 16), or draw " \
           "fewer --layers and --heads, or free some memory" in err


def test_attention_config_file_nan(draw, tmp_path):
    config = tmp_path / "nan.py"
    config.write_text("temperature = float('nan')\n")
    refused(draw(str(config)), "attention.py", "temperature expects a finite number, got nan")


@pytest.mark.parametrize("setting", ["out", "png"])
def test_attention_cannot_write_to_a_folder(run_script, small_dir, tmp_path, setting):
    folder = tmp_path / "folder"
    folder.mkdir()
    paths = {"out": tmp_path / "a.gif", "png": tmp_path / "b.png", setting: folder}
    status, _, err = run_script("attention.py", f"--init_from={small_dir}", "--length=4", "--layers=1,2",
                                f"--out={paths['out']}", f"--png={paths['png']}")
    assert status == 2 and f"cannot write {folder}" in err and "Traceback" not in err
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.part"))


def test_an_interrupted_save_leaves_no_truncated_picture(tmp_path):
    picture = tmp_path / "a.gif"
    picture.write_bytes(b"the previous picture")

    def write_half(f):
        f.write(b"GIF89a half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attention.save_whole(picture, write_half)
    assert picture.read_bytes() == b"the previous picture" and list(tmp_path.iterdir()) == [picture]


# ---------------------------------------------------------------------------------------------------------------
# Every script stopped while it starts: Python's own start-up aside, from the script's first line on


SITECUSTOMIZE = """
import os, signal, sys

class StopAtImport:  # sends this process a signal as the import named by $STOP_AT_IMPORT begins
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["STOP_AT_IMPORT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
        return None

sys.meta_path.insert(0, StopAtImport())
"""

# (when, signal): seconds after the script's handler is in place, or the import at whose start the signal is sent:
# typing is among a script's first imports, numpy is imported by torch (from C, in sample.py and score.py)
MOMENTS = [(0.0, "SIGINT"), ("typing", "SIGINT"), ("numpy", "SIGINT"), ("torch", "SIGTERM"), (0.2, "SIGTERM"),
           (0.5, "SIGINT")]


def handler_in_place(pid: int) -> bool:
    """Whether the process catches SIGTERM, which Python itself leaves alone: the script's first line has run."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.fixture
def script_args(small_dir, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "Hello there"}\n')
    return {"sample.py": [f"--init_from={small_dir}", "--max_new_tokens=100000"],
            "score.py": [f"--init_from={small_dir}", f"--texts={texts}", f"--out={tmp_path / 'scores.jsonl'}"],
            "attention.py": [f"--init_from={small_dir}", f"--out={tmp_path / 'a.gif'}"],
            "bench.py": ["--quick", "--batch_sizes=1", "--workload=False", "--reference=False"]}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal mask in /proc (Linux)")
@pytest.mark.parametrize("script", ["sample.py", "score.py", "attention.py", "bench.py"])
def test_a_stop_while_starting(script, script_args, tmp_path):
    """Ctrl-C or SIGTERM from the script's first line on, while torch (and numpy under it) is imported: a line and
    130 or 143, never a traceback. Once a traceback, or a stop lost or aborting the process when it landed inside
    torch's import of numpy or in torch's C++. The moments are the import that begins, or a time after the
    script's handler is in place (before it, only Python's own start-up runs)."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for when, name in MOMENTS:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STOP_SIGNAL": name}
        if isinstance(when, str):
            env.update(PYTHONPATH=str(tmp_path), STOP_AT_IMPORT=when)
        proc = subprocess.Popen([sys.executable, script, *script_args[script]], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not isinstance(when, str):
            deadline = time.monotonic() + 60
            while not handler_in_place(proc.pid):
                assert time.monotonic() < deadline, f"{script} never set its signal handlers"
                time.sleep(0.001)
            time.sleep(when)
            proc.send_signal(getattr(signal, name))
        out, err = proc.communicate(timeout=120)
        word, status = ("interrupted", 130) if name == "SIGINT" else ("terminated", 143)
        assert proc.returncode == status, (when, name, err[-3000:])
        assert "Traceback" not in err and "Exception ignored" not in err, (when, err)
        if isinstance(when, str):  # stopped before any work
            assert f"{script}: {word}" in err and out == ""
        else:  # on a fast machine perhaps at work already, which says so in its own words
            assert word in err
