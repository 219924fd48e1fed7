"""sample.py against what a run meets besides its model files: sizes past the memory, settings that are not finite,
prompt files that never end, output streams that are not UTF-8, full or closed, and signals. Each case checks the
exit status, that no traceback is printed, and that the message names the problem. Signals, pipes and closed streams
run real processes; the rest runs in process (see conftest's run_script)."""

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime
import sample as sample_module
from cli import OutputError
from errors import UsageError
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # steadier on a small machine that other jobs share
SEPARATOR = "\n---------------\n"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sample(run_script, small_dir):
    """sample.py run in process on the small model: (status, stdout, stderr)."""
    return lambda *args: run_script("sample.py", f"--init_from={small_dir}", *args)


def refused(result: tuple[int, str, str], message: str) -> None:
    status, out, err = result
    assert status == 2 and out == ""
    assert err.startswith("sample.py: error: ") and message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# Sizes and numbers


@pytest.mark.parametrize("args, message", [
    (["--seed=18446744073709551616"], "seed must be in -2**63..2**64-1"),
    (["--seed=-9223372036854775809"], "seed must be in -2**63..2**64-1"),
    (["--temperature=1e999"], "temperature expects a finite number, got inf"),
    (["--top_p=-1e999"], "top_p expects a finite number, got -inf"),
    (["--max_new_tokens=2.5"], "max_new_tokens expects an int, got '2.5'"),
    (["--num_samples=True"], "num_samples expects an int, got 'True'"),
])
def test_numbers_out_of_range(sample, args, message):
    refused(sample(*args), message)


@pytest.mark.parametrize("line, message", [
    ("temperature = float('nan')", "temperature expects a finite number, got nan"),
    ("top_p = float('inf')", "top_p expects a finite number, got inf"),
    ("seed = 2 ** 70", "seed must be in -2**63..2**64-1"),
    ("num_samples = 10 ** 5000", "num_samples expects an int of 128 bits at most, got one of 16,610 bits"),  # once a
    ("max_new_tokens = -10 ** 5000", "max_new_tokens expects an int of 128 bits at most"),  # traceback, printing it
])
def test_config_file_numbers(sample, tmp_path, line, message):
    config = tmp_path / "config.py"
    config.write_text(line + "\n")
    refused(sample(str(config)), message)


def test_a_prompt_file_that_never_ends(sample):
    refused(sample("--start=FILE:/dev/zero"), "the prompt file '/dev/zero' holds more than 16 MB (or never ends")


def test_a_prompt_file_too_large(sample, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(17 * 2 ** 20)  # sparse: no time spent writing it
    refused(sample(f"--start=FILE:{big}"), f"the prompt file '{big}' holds more than 16 MB")


def expected_in_batches(folder: Path, sizes: list[int], max_new_tokens: int, seed: int) -> str:
    """The text of samples drawn batch after batch from one generator, as sample.py draws them (with its default
    weights on a CPU)."""
    model = GPT.from_pretrained(str(folder), quantize=runtime.CPU_WEIGHTS)
    enc = load_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)
    text = ""
    for size in sizes:
        rows = model.generate(torch.tensor([[198]]), max_new_tokens, temperature=0.8, top_k=200, num_samples=size,
                              generator=generator)
        text += "".join(enc.decode(row) + SEPARATOR for row in rows.tolist())
    return text


def write_samples(folder: Path, out, **settings) -> int:
    """sample.py's write_samples called directly on the model in folder (on the CPU), writing to out, with sample.py's
    defaults for the settings not given."""
    cpu = torch.device("cpu")
    model, enc = runtime.load_model(str(folder), cpu, "auto", None, None)
    defaults = dict(max_new_tokens=sample_module.max_new_tokens, temperature=sample_module.temperature,
                    top_k=sample_module.top_k, top_p=sample_module.top_p, num_samples=sample_module.num_samples,
                    stop_at_eot=sample_module.stop_at_eot, seed=sample_module.seed, compile=False, live=False)
    return sample_module.write_samples(model, enc, sample_module.start, out, cpu, **(defaults | settings))


def test_samples_that_do_not_fit_run_in_batches(small_dir, monkeypatch, capsys):
    per_sample = 2 * 2 * 9 * 64 * 4 + 6 * 50257 * 4 + 8 * 8  # KV cache of 2 layers x 9 positions x 64 wide, logits,
    monkeypatch.setattr(runtime, "available_memory", lambda dev: int(2.5 * per_sample / 0.8))  # 8 tokens of text
    status = write_samples(small_dir, sys.stdout, num_samples=5, max_new_tokens=8)
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "sample.py: 5 samples need about 6 MB for their KV caches, logits and text, more than the 4 MB " \
           "available on cpu allow: drawing them in 3 batches of up to 2" in err
    assert out == expected_in_batches(small_dir, [2, 2, 1], 8, 1337)
    assert "generated 40 tokens (5 samples in 3 batches)" in err


def test_not_even_one_sample_fits(small_dir, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 1000)
    with pytest.raises(UsageError, match="one sample needs about 1 MB .its KV cache and logits, and the text of its "
                                         "4 tokens, held until it is written. and cpu has 0 MB available: use a "
                                         "smaller model"):
        write_samples(small_dir, sys.stdout, max_new_tokens=4)


def test_more_samples_than_any_machine_holds_start_at_once(small_dir, monkeypatch):
    """--num_samples=2**63-1 once hung building the list of batch sizes (a MemoryError under a memory limit): the
    batches are planned as they are drawn, the writer keeps only the batch's samples, and the run goes on until it
    is stopped, writing every sample it made."""
    per_sample = runtime.bytes_per_sample(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64),
                                          1, 8, 4)
    monkeypatch.setattr(runtime, "available_memory", lambda dev: int(2.5 * per_sample / 0.8))  # 2 a batch

    class StopAfterTwoBatches(io.StringIO):
        stopped = False

        def write(self, text):
            if self.getvalue().count(SEPARATOR) == 4 and not self.stopped:
                self.stopped = True
                raise KeyboardInterrupt  # Ctrl-C, as a user stops an endless run
            return super().write(text)

    out, err = StopAfterTwoBatches(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert write_samples(small_dir, out, num_samples=2 ** 63 - 1, max_new_tokens=8) == 130
    assert out.getvalue().startswith(expected_in_batches(small_dir, [2, 2], 8, 1337))
    assert "sample.py: 9,223,372,036,854,775,807 samples need about " in err.getvalue()
    assert "drawing them in 4,611,686,018,427,387,904 batches of up to 2 " in err.getvalue()


def test_more_tokens_than_the_memory_holds_are_refused_with_the_most_that_fit(small_dir, monkeypatch):
    """A sample's text is held until it is written: max_new_tokens=10**12 can never be, so it is refused at once,
    saying about how many tokens fit."""
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 10 ** 9)
    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
    most = int((0.8 * 10 ** 9 - runtime.bytes_per_sample(config, 64, 1, 4) + 8) // 8)
    with pytest.raises(UsageError, match=f"the text of its 1,000,000,000,000 tokens, held until it is written. and "
                                         f"cpu has 1,000 MB available: lower --max_new_tokens .about {most:,} fit."):
        write_samples(small_dir, sys.stdout, max_new_tokens=10 ** 12)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "num_samples": 9223372036854775807}',
     "asks for 9,223,372,036,854,775,807 samples, which take about"),
    ('{"prompt": "a"}\n{"prompt": "b", "max_new_tokens": 1000000000000}',
     "asks for 20 samples, which take about 160,000,000 MB to keep track of and to merge, more than the 1,000 MB "
     "available: too long to hold even one (line 2 asks for 10 of 1,000,000,000,000 tokens): lower max_new_tokens"),
    ('{"prompt": "a", "num_samples": 100000, "max_new_tokens": 1000}',
     "asks for 100,000 samples, which take about 1,754 MB to keep track of and to merge, more than the 1,000 MB "
     "available: about 57,025 samples of these lengths fit. Lower num_samples or max_new_tokens (line 1 asks for "
     "100,000 of 1,000 tokens), or split the file"),
])
def test_a_prompts_file_asking_more_than_the_memory_holds(run_script, small_dir, tmp_path, monkeypatch, line,
                                                          message):
    """Once a hang enumerating the samples: refused before any model loads. batch.py imports host_memory by name,
    so its own is patched."""
    import batch

    monkeypatch.setattr(batch, "host_memory", lambda: 10 ** 9)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    refused(run_script("sample.py", f"--init_from={small_dir}", f"--prompts={prompts}", f"--out={tmp_path / 'o'}"),
            message)


def test_a_prompts_files_slots_fit_the_memory(small_dir, monkeypatch):
    """batch_size and kv_cache_mb are caps: past the memory, the memory decides the slots (each row's cache and
    logits, and its sample's new tokens held as Python ints)."""
    import batch

    model, enc = runtime.load_model(str(small_dir), torch.device("cpu"), "auto", None, None)
    settings = dict(max_new_tokens=8, temperature=0.8, top_k=200, top_p=None, num_samples=10, stop_at_eot=False,
                    seed=1)
    job = batch.SampleJob([batch.Prompt(1, 1, "Hello", settings)], "p", "o", 10 ** 12, 10 ** 12)
    samples = batch.make_samples(job, enc, model)
    itemsize = model.transformer.wpe.weight.element_size()
    per_row = runtime.bytes_per_sample(model.config, len(samples[0].ids) + 8, 0, itemsize) + 8 * batch.ROW_TOKEN_BYTES
    monkeypatch.setattr(batch, "available_memory", lambda dev: int(3.5 * per_row / 0.8))
    assert batch.slot_count(samples, job, model, compile=False) == 3
    monkeypatch.setattr(batch, "available_memory", lambda dev: None)  # not known: the caps alone
    assert batch.slot_count(samples, job, model, compile=False) == 10


def test_compile_with_int8_is_refused(sample):
    refused(sample("--compile=True", "--quantize=int8"), "--compile=True does not take --quantize")


# ---------------------------------------------------------------------------------------------------------------
# Memory limits that /proc/meminfo does not show: a container's control group, ulimit -v and -d

GB = 10 ** 9


def fake_system(tmp_path: Path, cgroup: str, groups: dict[str, dict[str, object]], available: int = 10 * GB) -> Path:
    """A /proc (MemAvailable, the process's cgroup line) and a cgroup file system holding `groups`, each a folder
    under tmp_path/cgroup with its files."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {4 * available // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text("VmSize:\t  100000 kB\nVmData:\t  50000 kB\n")
    for folder, files in groups.items():
        (tmp_path / "cgroup" / folder).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (tmp_path / "cgroup" / folder / name).write_text(f"{content}\n")
    return proc


@pytest.mark.parametrize("cgroup, groups, room", [
    # cgroup v2: the group's limit less what it uses, not counting the file cache the kernel drops first
    ("0::/kubepods/pod1\n", {"kubepods/pod1": {"memory.max": 3 * GB, "memory.current": 2 * GB,
                                               "memory.stat": f"anon {GB}\ninactive_file {GB // 2}"},
                             "kubepods": {"memory.max": "max", "memory.current": 5 * GB}}, 3 * GB - 3 * GB // 2),
    # a parent's limit holds its children
    ("0::/a/b\n", {"a/b": {"memory.max": "max", "memory.current": GB},
                   "a": {"memory.max": 2 * GB, "memory.current": GB + GB // 4}}, 3 * GB // 4),
    # a container sees its own group as the root, whatever /proc/self/cgroup names
    ("0::/system.slice/docker-1.scope\n", {".": {"memory.max": 2 * GB, "memory.current": GB // 2}}, 3 * GB // 2),
    # no limit anywhere: the machine's MemAvailable
    ("0::/\n", {".": {"memory.max": "max", "memory.current": GB}}, 10 * GB),
    # cgroup v1, the memory controller's own hierarchy
    ("12:memory:/docker/abc\n5:cpu,cpuacct:/docker/abc\n",
     {"memory": {"memory.limit_in_bytes": 2 * GB, "memory.usage_in_bytes": GB,
                 "memory.stat": f"cache 1\ntotal_inactive_file {GB // 4}"}}, 5 * GB // 4),
    # v1 without a limit writes a number near 2**63
    ("4:memory:/\n", {"memory": {"memory.limit_in_bytes": 9223372036854771712, "memory.usage_in_bytes": GB}}, 10 * GB),
    # a limit above what the machine has available: the machine's
    ("0::/\n", {".": {"memory.max": 64 * GB, "memory.current": GB}}, 10 * GB),
])
def test_a_containers_memory_limit_is_read(tmp_path, cgroup, groups, room):
    """Once ignored: the planner read MemAvailable alone, the machine's, and a container's batch failed with
    'RuntimeError: [enforce fail at alloc_cpu.cpp]'."""
    proc = fake_system(tmp_path, cgroup, groups)
    own_limits = runtime.rlimit_room(proc / "self" / "status")  # this process's ulimits, if it has any
    assert runtime.host_memory(proc, tmp_path / "cgroup") == min(room, own_limits if own_limits is not None else room)


@pytest.mark.parametrize("limit, field", [("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")])
def test_ulimit_is_read(limit, field):
    """ulimit -v (the address space) and -d (the data segment), less what the process already has of each."""
    import resource

    code = ("from pathlib import Path; import runtime; room = runtime.rlimit_room(Path('/proc/self/status')); "
            f"used = runtime.read_fields(Path('/proc/self/status'))['{field}'] * 1024; "
            "print(room, used, runtime.host_memory())")
    cap = 2 * GB
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(getattr(resource, limit), (cap, cap)))
    assert run.returncode == 0, run.stderr
    room, used, total = map(int, run.stdout.split())
    assert abs(room - (cap - used)) < 2 ** 20 and 0 < total <= room


def test_sample_py_under_ulimit_v(small_dir):
    """3,000 samples under ulimit -v: once 'RuntimeError: [enforce fail at alloc_cpu.cpp:127] ... you tried to allocate
    603084000 bytes' and a traceback, as the planner saw only MemAvailable and drew them in one batch. Now it sees
    the limit and draws batches that fit under it."""
    import resource

    baseline = subprocess.run([sys.executable, "-c", "import sample, torch, runtime, model; print(next(int(line.split()"
                               "[1]) for line in open('/proc/self/status') if line.startswith('VmSize')) * 1024)"],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    cap = int(baseline.stdout) + GB // 2  # the address space of a started sample.py, and 500 MB
    run = subprocess.run([sys.executable, "sample.py", f"--init_from={small_dir}", "--num_samples=3000",
                          "--max_new_tokens=1", "--device=cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    planned = re.search(r"more than the ([\d,]+) MB available on cpu allow: drawing them in ([\d,]+) batches",
                        run.stderr)  # about 1.2 MB a sample, the logits of a 50,257-token vocabulary
    assert planned and int(planned[1].replace(",", "")) < GB // 2 / 10 ** 6 and int(planned[2].replace(",", "")) > 1
    assert run.stdout.count(SEPARATOR) == 3000


# ---------------------------------------------------------------------------------------------------------------
# An allocation that fails although the work was planned to fit: one message naming the setting to lower

ALLOCATION_FAILED = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 1827545548 bytes. Error code 12 (Cannot allocate "
                                 "memory)")


def test_memory_running_out_while_sampling(sample, small_dir, monkeypatch):
    """The first batch's samples are written whole, the second's as far as they got, then the message: exit 1, as
    for a full disk."""
    per_sample = runtime.bytes_per_sample(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64),
                                          1, 4, 4)
    monkeypatch.setattr(runtime, "available_memory", lambda dev: int(2.5 * per_sample / 0.8))  # 2 a batch
    calls, sample_steps = [], runtime.sample_steps

    def failing_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ALLOCATION_FAILED
        return sample_steps(*args, **kwargs)

    monkeypatch.setattr(runtime, "sample_steps", failing_second_batch)
    status, out, err = sample("--num_samples=4", "--max_new_tokens=4")
    assert status == 1 and "Traceback" not in err
    assert "sample.py: error: out of memory (an allocation of 1,828 MB failed) while drawing 2 samples at once; each " \
           "sample above ends where generation stopped. Ask for fewer at once (--num_samples=1) or fewer tokens " \
           "(--max_new_tokens), or free some memory" in err
    assert out.startswith(expected_in_batches(small_dir, [2], 4, 1337)) and out.count(SEPARATOR) == 4


def test_memory_running_out_in_a_prompts_file(run_script, small_dir, tmp_path, monkeypatch):
    import batch

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "bb cc"}\n')
    run_slots = batch.run_slots

    def failing_after_the_first_finished(*args):
        """The slots' steps until some samples have finished and been written, then an allocation that fails."""
        for finished, busy in run_slots(*args):
            yield finished, busy
            if finished:
                raise ALLOCATION_FAILED

    monkeypatch.setattr(batch, "run_slots", failing_after_the_first_finished)
    status, out, err = run_script("sample.py", f"--init_from={small_dir}", f"--prompts={prompts}",
                                  f"--out={tmp_path / 'o.jsonl'}", "--max_new_tokens=2", "--batch_size=4")
    assert status == 1 and out == "" and "Traceback" not in err
    assert "sample.py: error: out of memory (an allocation of 1,828 MB failed): lower --batch_size (now 4) or " \
           "--kv_cache_mb (now 2048), or free some memory; the samples finished are kept: run the same command " \
           "again to go on" in err
    assert len((tmp_path / "o.jsonl.rank0-of-1.part").read_text().splitlines()) == 4  # the first four slots' samples


# ---------------------------------------------------------------------------------------------------------------
# Prompts that tiktoken's regex engine cannot split by itself


@pytest.mark.parametrize("run", [" ", "\n\t\u3000"], ids=["spaces", "mixed"])
def test_a_million_whitespace_characters_mid_prompt(sample, tmp_path, run):
    """Once 'Regex error while tokenizing: Max stack size exceeded for backtracking' and exit status 1."""
    prompt = run * (1_000_000 // len(run)) + "x"
    (tmp_path / "prompt.txt").write_text(prompt)
    for start in (prompt, f"FILE:{tmp_path / 'prompt.txt'}"):
        status, out, err = sample(f"--start={start}", "--max_new_tokens=2", "--seed=0")
        assert status == 0 and "Traceback" not in err, err[-2000:]
        assert "longer than the model's context of 64: keeping its last 64" in err
        assert out.endswith(SEPARATOR) and out.count(SEPARATOR) == 10 and "x" in out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers that do not belong to the model


def test_a_vocab_json_cut_short_beside_gpt2s_merges(run_script, tmp_path, small_dir, monkeypatch):
    """Once accepted, with samples decoded to garbage ('Hello� can be� to')."""
    monkeypatch.delenv("GPT2_TIKTOKEN_FILE", raising=False)
    folder = tmp_path / "model"
    folder.mkdir()
    for file in small_dir.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "vocab.json").unlink()
    vocab = json.loads((small_dir / "vocab.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(dict(list(vocab.items())[:1000])))
    refused(run_script("sample.py", f"--init_from={folder}", "--start=Hello"),
            f"{folder / 'vocab.json'} holds 1,000 tokens besides <|endoftext|>, and {folder / 'merges.txt'} has "
            f"50,000 merges, which with the 256 bytes make 50,256")


def test_a_character_level_model_without_its_meta_pkl_offline(run_script, tmp_path, char_checkpoint, monkeypatch):
    """Once a message about failing to download GPT-2's tokenizer: the missing meta.pkl comes first now."""
    monkeypatch.delenv("GPT2_TIKTOKEN_FILE", raising=False)
    checkpoint = char_checkpoint(tmp_path / "out-shakespeare-char", meta=None)
    refused(run_script("sample.py", f"--init_from={checkpoint}", "--start=ROMEO:"),
            f"{checkpoint} is a model of 65 tokens, fewer than GPT-2's 50,257: a character-level nanoGPT model "
            f"(shakespeare_char's has 65), which needs the meta.pkl that nanoGPT's prepare.py wrote for its data. "
            f"There is none ({checkpoint.parent / 'meta.pkl'}, {tmp_path / 'meta.pkl'}, ")


# ---------------------------------------------------------------------------------------------------------------
# Output streams


def run_sample(small_dir: Path, *args: str, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", f"--init_from={small_dir}", *args], cwd=ROOT, env=ENV,
                          stdout=stdout, stderr=stderr, text=True, timeout=120, **kwargs)


def test_cp1252_redirect_gets_utf8(small_dir, tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        run = subprocess.run([sys.executable, "sample.py", f"--init_from={small_dir}", "--start=日本語 😀 naïve",
                              "--num_samples=2", "--max_new_tokens=8"], cwd=ROOT, stdout=f, stderr=subprocess.PIPE,
                             text=True, timeout=120, env={**ENV, "PYTHONIOENCODING": "cp1252"})
    assert run.returncode == 0 and "Traceback" not in run.stderr
    assert run.stderr.count("stdout's encoding is cp1252, not UTF-8: writing the samples as UTF-8") == 1
    text = out.read_bytes().decode("utf-8")
    assert text.count(SEPARATOR) == 2 and text.startswith("日本語 😀 naïve")


def test_a_console_that_is_not_utf8_shows_question_marks(monkeypatch, capsys):
    class Console(io.TextIOWrapper):
        def isatty(self):
            return True

    console = Console(io.BytesIO(), encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", console)
    assert sample_module.prepare_stdout() is console
    console.write("naïve 日本")
    console.flush()
    assert console.buffer.getvalue() == "naïve ??".encode("latin-1")
    assert "stdout's encoding is latin-1, not UTF-8: characters it cannot show are written as '?'" in \
           capsys.readouterr().err
    assert console.encoding == "latin-1"  # the console's own encoding is kept


def test_a_full_disk(small_dir):
    with open("/dev/full", "w") as full:
        run = run_sample(small_dir, "--num_samples=2", "--max_new_tokens=4", stdout=full)
    assert run.returncode == 1
    assert "sample.py: error: cannot write the samples to stdout: No space left on device" in run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr


def test_a_full_disk_while_streaming_stops_generation(small_dir, monkeypatch, capsys):
    """Streamed, the first failed write ends the run: no generating on into a full disk."""
    import errno

    class Full(io.StringIO):
        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    steps = []
    monkeypatch.setattr(sample_module.SampleWriter, "add", lambda self, tokens, first=0: steps.append(tokens)
                        or self._write())
    with pytest.raises(OutputError, match="cannot write the samples to stdout: No space left on device"):
        write_samples(small_dir, Full(), max_new_tokens=100000, live=True)
    assert len(steps) == 1


def test_a_closed_stdout(small_dir):
    run = run_sample(small_dir, stdout=None, preexec_fn=lambda: os.close(1))
    assert run.returncode == 2
    assert "stdout is closed (the command ends in >&-)" in run.stderr and "Traceback" not in run.stderr


def test_a_closed_stderr_keeps_stdout_clean(small_dir):
    run = run_sample(small_dir, "--num_samples=2", "--max_new_tokens=3", stderr=None,
                     preexec_fn=lambda: os.close(2))
    assert run.returncode == 0
    assert run.stdout.count(SEPARATOR) == 2 and "loaded" not in run.stdout


def test_a_reader_leaving_the_pipe_ends_an_endless_run(small_dir):
    """Piped, samples are written when complete; with max_new_tokens=10**7 that takes hours, so the run must notice
    that its reader left (`| head`, a closed viewer) rather than generate for nobody."""
    proc = subprocess.Popen([sys.executable, "sample.py", f"--init_from={small_dir}", "--num_samples=2",
                             "--max_new_tokens=10000000"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until_loaded(proc)
    time.sleep(0.5)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert b"Traceback" not in proc.stderr.read()


# ---------------------------------------------------------------------------------------------------------------
# Signals: what was generated is written for every sample, then 130 (Ctrl-C) or 143 (SIGTERM)


def start(small_dir: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "sample.py", f"--init_from={small_dir}", "--num_samples=3",
                             "--max_new_tokens=100000", "--start=Once", *args], cwd=ROOT, env=ENV, stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


def wait_until_loaded(proc: subprocess.Popen) -> None:
    for line in proc.stderr:
        if (line if isinstance(line, str) else line.decode()).startswith("loaded"):
            return
    raise AssertionError("sample.py ended before loading its model")


def assert_kept(out: str, err: str, word: str) -> None:
    """Every sample written, each past its prompt, and the stop said without a traceback."""
    assert out.endswith(SEPARATOR)
    samples = out[:-len(SEPARATOR)].split(SEPARATOR)
    assert len(samples) == 3 and all(s.startswith("Once") and len(s) > len("Once") for s in samples)
    assert f"{word}: each sample above ends where generation stopped" in err and "Traceback" not in err


@pytest.mark.parametrize("signals, status, word", [
    ([signal.SIGINT], 130, "interrupted"),
    ([signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT], 143, "terminated"),  # more while writing
])
def test_signals_keep_every_sample_piped(small_dir, signals, status, word):
    proc = start(small_dir)
    wait_until_loaded(proc)
    time.sleep(0.5)
    proc.send_signal(signals[0])
    time.sleep(0.2)  # the first is handled first (signals pending together are handled in number order)
    for s in signals[1:]:  # while the samples are being written
        proc.send_signal(s)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status
    assert_kept(out, err, word)


def test_ctrl_c_twice_keeps_every_sample_in_a_file(small_dir, tmp_path):
    with open(tmp_path / "out.txt", "w") as f:
        proc = start(small_dir, stdout=f)
        wait_until_loaded(proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert_kept((tmp_path / "out.txt").read_text(), err, "interrupted")


def test_ctrl_c_on_a_terminal_while_streaming(small_dir):
    """Streamed to a terminal: the first sample as it grows, then, once stopped, the others."""
    master, slave = pty.openpty()
    proc = start(small_dir, stdout=slave)
    os.close(slave)
    received = b""
    while len(received) < 40:  # some of the first sample has arrived: generation is under way
        assert select.select([master], [], [], 120)[0], "nothing written to the terminal"
        received += os.read(master, 65536)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    with contextlib.suppress(OSError):  # EIO: the process has closed the terminal
        while chunk := os.read(master, 65536):
            received += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 130
    assert_kept(received.decode().replace("\r\n", "\n"), err, "interrupted")


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_start_up(small_dir, signum, status, word):
    """Stopped while torch is imported or the model loads: a line, no traceback."""
    proc = start(small_dir)
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status and out == ""
    assert f"sample.py: {word}" in err and "Traceback" not in err
