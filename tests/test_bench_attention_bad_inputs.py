"""bench.py and attention.py against wrong settings (exit status 2 and a message naming the setting, before anything
slow runs), bench.py's own status for a token mismatch, and both scripts stopped by Ctrl-C while starting."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attention

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
    (["--threads=0"], "--threads=0: give at least 1 thread"),
    (["--max_seconds=0"], "--max_seconds=0.0: give a time limit above 0 seconds"),
    (["--max_seconds=1e999"], "max_seconds expects a finite number, got inf"),
    (["--seed=-1"], "--seed=-1: give a seed from 0 to 2**64-1"),
    (["--device=cuda"], "--device=cuda but CUDA is not available here"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--dtype=float32,float64"], "unknown dtype 'float64'"),
    (["--quantize=int4"], "quantize must be int8, fp16, int8,fp16 or None, got 'int4'"),
    (["--draft=int4"], "draft must be int8, fp16, int8,fp16 or None, got 'int4'"),
    (["--draft_tokens=0"], "--draft_tokens=0: a draft proposes at least 1 token a round"),
])
def test_bench_settings(run_script, args, message):
    refused(run_script("bench.py", *args), "bench.py", message)


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


@pytest.mark.parametrize("script", ["attention.py", "bench.py"])
def test_ctrl_c_while_starting(small_dir, script):
    """Ctrl-C while torch is imported: a line and status 130, no traceback."""
    proc = subprocess.Popen([sys.executable, script, f"--init_from={small_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == ""
    assert f"{script}: interrupted" in err and "Traceback" not in err
