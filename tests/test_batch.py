"""batch.py: prompts files read and checked; every line against a one-prompt generate (the oracle); the same file
byte-identical across batch sizes and world sizes (torchrun, gloo); resume after SIGINT and SIGKILL and from a
torn line; bad files and a failing rank."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batch import Ranks, read_prompts, sample_seed, share
from tokenizer import EOT, EOT_ID, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--num_samples=1", "--max_new_tokens=8", "--seed=1337"]  # with sample.py's temperature 0.8 and top_k 200
PROMPTS = [
    {"id": "a", "prompt": "The history of Python is"},
    {"id": "b", "prompt": "The license grants you"},
    {"prompt": "The history of Python is", "num_samples": 2},  # id: its line number, 3
    {"id": 4, "prompt": "A", "temperature": 0},
    {"id": 5, "prompt": "", "stop_at_eot": True, "max_new_tokens": 12},
    {"id": "six", "prompt": "In the beginning", "seed": 7, "top_k": None, "top_p": 0.9},
    *({"id": 10 + i, "prompt": p} for i, p in enumerate([
        "The function returns", "This module provides", "The program is", "Each object has",
        "The interpreter reads", "A list of", "The file is", "You may not"])),
    {"id": 99, "prompt": 'The software is provided "as is", without warranty', "stop_at_eot": True},
    # Greedy, the trained model ends this one with <|endoftext|> after two tokens.
    {"id": "end", "prompt": '*, then each returns an *iterable*\nargument in the * asynchronous iterator’s "*s '
                            '*expression* is a "0" is omitted', "temperature": 0, "stop_at_eot": True},
]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def sample_args(trained_dir, prompts: Path, out: Path, *more: str) -> list[str]:
    return [f"--init_from={trained_dir}", f"--prompts={prompts}", f"--out={out}", "--device=cpu", *RUN, *more]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def test_text_file_lines_escapes_and_ids(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufefffirst\r\n\nsecond\\nline \\\\n \\t end\n<|endoftext|>\n".encode("utf-8"))
    prompts = read_prompts(str(path), "prompt")
    assert [(p.id, p.text) for p in prompts] == [(1, "first"), (3, "second\nline \\n \\t end"), (4, EOT)]


def test_jsonl_settings_per_prompt(prompts_file):
    import batch
    import sample

    defaults = {name: getattr(sample, name) for name in batch.PER_PROMPT}  # sample.py's settings, at their defaults
    defaults.update(num_samples=1, max_new_tokens=8)
    job = batch.SampleJob.read(str(prompts_file), "unused.jsonl", 32, 2048, defaults)
    by_id = {p.id: p for p in job.prompts}
    assert list(by_id) == ["a", "b", 3, 4, 5, "six", *range(10, 18), 99, "end"]
    assert by_id[3].settings["num_samples"] == 2 and by_id["a"].settings["num_samples"] == 1
    assert by_id["six"].settings == dict(max_new_tokens=8, temperature=0.8, top_k=None, top_p=0.9, num_samples=1,
                                         stop_at_eot=False, seed=7)
    assert by_id[4].settings["temperature"] == 0.0 and isinstance(by_id[4].settings["temperature"], float)


def test_per_prompt_settings_are_typed_as_sample_py_declares_them(root_dir):
    import batch
    from configurator import read_settings

    declared = read_settings(str(root_dir / "sample.py"))
    for name, setting in batch.PER_PROMPT.items():
        assert (setting.kind, setting.optional) == (declared[name].kind, declared[name].optional), name


def test_seed_depends_on_seed_id_and_sample_only():
    seeds = {sample_seed(s, i, k) for s in (0, 1) for i in (1, "1", 2) for k in (0, 1)}
    assert len(seeds) == 12 and sample_seed(1337, "a", 0) == sample_seed(1337, "a", 0)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_share_is_contiguous_balanced_and_complete():
    items = list(range(40))
    cost = lambda i: 1 + (i % 5)  # noqa: E731
    shares = [share(items, cost, Ranks(rank, 3)) for rank in range(3)]
    assert sum(shares, []) == items  # each a contiguous run, in order, covering everything once
    costs = [sum(map(cost, s)) for s in shares]
    assert max(costs) - min(costs) <= 5


def test_slots_are_cut_for_the_cache_budget_and_a_compiled_static_cache_of_the_whole_context():
    """kv_cache_mb bounds the slots' KV cache: 21 positions a row eager, the whole context (1024) compiled."""
    from batch import Prompt, Sample, SampleJob, slot_count
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=1024, vocab_size=100, n_layer=2, n_head=2, n_embd=64))
    prompt = Prompt(1, 1, "A", dict(max_new_tokens=20, temperature=1.0, top_k=None, top_p=None, num_samples=40,
                                    stop_at_eot=False, seed=0))
    samples = [Sample(prompt, k, k, [7]) for k in range(40)]
    job = SampleJob([prompt], "p.jsonl", "out.jsonl", batch_size=32, kv_cache_mb=8)
    assert slot_count(samples, job, model, compile=False) == 32  # 2 x 2 x 21 x 64 x 4 bytes a row: 1,024 fit
    assert slot_count(samples, job, model, compile=True) == 8  # 2 x 2 x 1024 x 64 x 4: 1 MiB a row
    assert slot_count(samples[:5], job, model, compile=False) == 5  # no more slots than samples


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the prompts file '{path}': No such file or directory"),
    (b'{"prompt": "ok"}\n\xff\xfe\n', "is not UTF-8 text (byte 0xff on line 2)"),
    (b'{"prompt": "ok"}\n{"prompt": "a",}\n', "line 2 is not valid JSON"),
    (b'["a list"]\n', "line 1 is not a JSON object"),
    (b'{"text": "no prompt"}\n', 'line 1 has no "prompt" string'),
    (b"", "holds no prompts"),
    (b"\n  \n", "holds no prompts"),
    (b'{"prompt": "a", "temprature": 1}\n', 'line 1: unknown key "temprature": a line may hold "id", "prompt",'),
    (b'{"prompt": "a", "max_new_tokens": "10"}\n', "line 1: max_new_tokens expects an int, got '10'"),
    (b'{"prompt": "a", "top_k": 1.5}\n', "line 1: top_k expects an int or None, got 1.5"),
    (b'{"prompt": "a"}\n{"prompt": "b", "temperature": -1}\n', "line 2: temperature must be >= 0"),
    (b'{"prompt": "a", "seed": null}\n', "line 1: seed must be an int here"),
    (b'{"id": 7, "prompt": "a"}\n{"id": 7, "prompt": "b"}\n', "line 2: id 7 is already the id of line 1"),
    (b'{"id": true, "prompt": "a"}\n', "line 1: the id must be a string or an integer, got true"),
])
def test_bad_prompts_files(run_script, tmp_path, trained_dir, content, message):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run_script("sample.py", *sample_args(trained_dir, path, tmp_path / "out.jsonl"))
    assert code == 2 and out == ""
    assert message.format(path=path) in err and "Traceback" not in err
    assert not list(tmp_path.glob("out.jsonl*"))  # refused before anything was written


@pytest.mark.parametrize("args, message", [
    (["--out=x.jsonl"], "--prompts and --out go together"),
    (["--prompts=p.jsonl"], "--prompts and --out go together"),
    (["--prompts=p.jsonl", "--out=x.jsonl", "--seed=None"], "--prompts needs a seed"),
    (["--prompts=p.jsonl", "--out=x.jsonl", "--batch_size=0"], "batch_size and kv_cache_mb must be >= 1"),
    (["--prompts=p.jsonl", "--out=x.jsonl", "--temperature=-1"], "temperature must be >= 0"),
])
def test_bad_settings(run_script, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    code, _, err = run_script("sample.py", *args)
    assert code == 2 and message in err


# ---------------------------------------------------------------------------------------------------------------
# What is written, and that it does not depend on batches or ranks


def check_against_generate(model, folder, records: list[dict]) -> None:
    """Each line as a one-prompt generate with the line's seed gives it: the same text, count and ending."""
    enc = load_tokenizer(folder)
    by_id = {p.get("id", line): p for line, p in enumerate(PROMPTS, 1)}
    assert [(r["id"], r["sample"]) for r in records] == [
        (i, k) for i, p in by_id.items() for k in range(p.get("num_samples", 1))]
    for r in records:
        p = by_id[r["id"]]
        s = dict(max_new_tokens=8, temperature=0.8, top_k=200, top_p=None, stop_at_eot=False, seed=1337) | p
        assert r["seed"] == sample_seed(s["seed"], r["id"], r["sample"])
        ids = enc.encode(p["prompt"], allowed_special={EOT}) or [EOT_ID]
        new = model.generate(torch.tensor([ids]), s["max_new_tokens"], s["temperature"], s["top_k"],
                             top_p=s["top_p"], seed=r["seed"],
                             stop_tokens=[EOT_ID] if s["stop_at_eot"] else None)[0, len(ids):].tolist()
        finish = "stop" if s["stop_at_eot"] and EOT_ID in new else "length"
        new = new[:new.index(EOT_ID)] if finish == "stop" else new
        assert (r["text"], r["tokens"], r["finish"]) == (enc.decode(new), len(new), finish), r


def test_same_output_for_batch_sizes_1_7_and_32_and_two_processes(run_script, torchrun, trained, trained_dir,
                                                                  prompts_file, tmp_path):
    """Prompts of different lengths and settings (greedy, top-p, stop_at_eot) share the slots."""
    outputs, summaries = {}, {}
    for batch_size in (1, 7, 32):
        out = tmp_path / f"bs{batch_size}.jsonl"
        code, _, err = run_script("sample.py", *sample_args(trained_dir, prompts_file, out,
                                                            f"--batch_size={batch_size}"))
        assert code == 0, err
        outputs[batch_size], summaries[batch_size] = out.read_bytes(), err
    assert "17 samples of 16 prompts" in err
    busy = {b: re.search(r"(\d+) steps, ([\d.]+) of (\d+) slots busy on average", summaries[b]).groups()
            for b in (1, 7, 32)}
    records = lines(tmp_path / "bs1.jsonl")
    draws = sum(r["tokens"] + (r["finish"] == "stop") for r in records)  # one a step a slot, <|endoftext|> too
    assert busy[1] == (str(draws), "1.0", "1")  # one slot: the samples one after another
    assert busy[7][2] == "7" and int(busy[7][0]) <= draws / 4  # 17 samples shared 7 slots
    assert busy[32][2] == "17" and int(busy[32][0]) == max(r["tokens"] + (r["finish"] == "stop") for r in records)
    two = tmp_path / "two.jsonl"
    run = torchrun("sample.py", *sample_args(trained_dir, prompts_file, two, "--batch_size=7"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "17 samples of 16 prompts" in run.stderr and "on 2 processes" in run.stderr
    assert outputs[1] == outputs[7] == outputs[32] == two.read_bytes()
    assert list(tmp_path.glob("*.part")) == []
    records = lines(two)
    check_against_generate(trained, trained_dir, records)
    assert {r["finish"] for r in records} == {"length", "stop"}  # the trained model ends some at <|endoftext|>


# ---------------------------------------------------------------------------------------------------------------
# Resuming


def long_job(folder: Path, trained_dir) -> tuple[list[str], Path]:
    """A text file of 30 prompts and 24 tokens each, in its own folder: long enough to stop part way."""
    folder.mkdir()
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"Section {i} of the license says\n" for i in range(30)), encoding="utf-8")
    out = folder / "out.jsonl"
    return sample_args(trained_dir, prompts, out, "--max_new_tokens=24"), out


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "sample.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_lines(part: Path, proc: subprocess.Popen, n: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        count = part.read_bytes().count(b"\n") if part.exists() else 0
        if count >= n:
            return count
        assert proc.poll() is None, f"ended before {n} lines: {proc.communicate()[1][-2000:]}"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} lines after 120 s")


def test_interrupted_then_killed_then_resumed_equals_an_uninterrupted_run(run_script, trained_dir, tmp_path):
    args, out = long_job(tmp_path / "whole", trained_dir)
    assert run_script("sample.py", *args, "--batch_size=30")[0] == 0
    expected = out.read_bytes()

    args, out = long_job(tmp_path / "stopped", trained_dir)
    part = out.with_name("out.jsonl.rank0-of-1.part")
    proc = start([*args, "--batch_size=1"])
    wait_for_lines(part, proc, 2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the finished samples stay
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"the finished lines are in {part}" in err
    kept = part.read_bytes()
    assert kept.count(b"\n") >= 2 and kept.endswith(b"\n")

    proc = start([*args, "--batch_size=1"])
    before = wait_for_lines(part, proc, kept.count(b"\n") + 2)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate(timeout=60)
    assert part.read_bytes().startswith(kept)
    done = part.read_bytes().count(b"\n")
    assert done >= before

    code, _, err = run_script("sample.py", *args, "--batch_size=4")  # another batch size: the same samples
    assert code == 0, err
    assert f"{30 - done} samples of {30 - done} prompts" in err  # the finished ones were not redone
    assert out.read_bytes() == expected
    assert not part.exists()


def test_torn_last_line_is_cut_and_redone(run_script, trained_dir, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    args = sample_args(trained_dir, prompts_file, out)
    assert run_script("sample.py", *args)[0] == 0
    expected = out.read_bytes()
    out.unlink()
    whole = expected.split(b"\n")
    part = tmp_path / "out.jsonl.rank0-of-1.part"
    part.write_bytes(b"\n".join(whole[:3]) + b"\n" + whole[3][:25])  # killed while writing line 4
    code, _, err = run_script("sample.py", *args)
    assert code == 0, err
    assert f"{part}: cut a torn last line (25 bytes)" in err and "14 samples of" in err
    assert out.read_bytes() == expected

    # A finished output is not redone; anything else under that name is not overwritten.
    code, _, err = run_script("sample.py", *args)
    assert code == 0 and "already holds every sample" in err and out.read_bytes() == expected
    out.write_bytes(expected[:-10])
    code, _, err = run_script("sample.py", *args)
    assert code == 2 and f"{out} exists and is not this job's finished output" in err


@pytest.mark.parametrize("part_name, content, message", [
    ("out.jsonl.rank0-of-1.part", b'{"id": "a", "sample": 0}\nnot json\n{"id": "b", "sample": 0}\n',
     "rank0-of-1.part line 2 is not a line of this job"),
    ("out.jsonl.rank0-of-1.part", b'{"id": "zz", "sample": 0}\n', "line 1 holds"),
    ("out.jsonl.rank1-of-2.part", b"", "holds parts of an unfinished run with another number of processes"),
])
def test_parts_of_other_runs_are_refused(run_script, trained_dir, prompts_file, tmp_path, part_name, content,
                                         message):
    (tmp_path / part_name).write_bytes(content)
    code, _, err = run_script("sample.py", *sample_args(trained_dir, prompts_file, tmp_path / "out.jsonl"))
    assert code == 2 and message in err


def test_a_failing_rank_fails_the_run_with_its_message(torchrun, trained_dir, prompts_file, tmp_path):
    (tmp_path / "out.jsonl.rank1-of-2.part").mkdir()  # rank 1 cannot write its part; rank 0 can
    started = time.monotonic()
    run = torchrun("sample.py", *sample_args(trained_dir, prompts_file, tmp_path / "out.jsonl"), timeout=150)
    assert run.returncode != 0
    assert "cannot write the part file" in run.stderr and "rank1-of-2.part: Is a directory" in run.stderr
    assert time.monotonic() - started < 150
    assert not (tmp_path / "out.jsonl").exists()


LATE_RANK = """
import json, os, sys, time
from datetime import timedelta

sys.path.insert(0, os.getcwd())  # the project's folder, where torchrun runs this
import batch

out, timeout = sys.argv[1], float(sys.argv[2])
ranks = batch.start_ranks("cpu", timeout=timedelta(seconds=timeout))
keys = [(json.dumps(i),) for i in range(4)]
mine = keys[2 * ranks.rank:2 * ranks.rank + 2]
output = batch.Output(out, ranks, keys, mine, lambda record: (json.dumps(record["id"]),))
output.resume()
if ranks.rank == 1:
    time.sleep(4 * timeout)  # still working on its share long after rank 0 has finished
for (key,) in mine:
    output.write(json.dumps({"id": json.loads(key), "rank": ranks.rank}))
output.merge()
ranks.close()
"""


def test_a_rank_that_finishes_long_before_the_others_waits_for_them(torchrun, tmp_path):
    """Rank 0 finishes its share 4 collective timeouts (of 2 s here) before rank 1, as one can finish minutes or
    hours before the others of a long job (NCCL's timeout is 10 minutes, gloo's 30): it waits for the last rank
    outside any collective, and the merge that follows is whole."""
    script = tmp_path / "late_rank.py"
    script.write_text(LATE_RANK, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = torchrun(str(script), str(out), "2", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert lines(out) == [{"id": i, "rank": i // 2} for i in range(4)]
    assert list(tmp_path.glob("*.part")) == []


@pytest.mark.parametrize("device", ["cuda:1", "cuda:0"])
def test_an_indexed_gpu_is_refused_under_torchrun(run_script, trained_dir, prompts_file, tmp_path, monkeypatch,
                                                   device):
    """Each rank takes the GPU of its LOCAL_RANK; --device=cuda:N would put every rank on GPU N, which NCCL
    refuses at the first collective. Said before any process group forms (here a rank's environment without
    torchrun: none would form)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_script("sample.py", *sample_args(trained_dir, prompts_file, tmp_path / "out.jsonl"),
                              f"--device={device}")
    assert code == 2 and f"--device={device} under torchrun: every process would take that one GPU" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("every", [8, pytest.param(1, marks=pytest.mark.slow)])
def test_spread_file_greedy_is_the_same_at_batch_sizes_32_and_1_and_as_each_prompt_alone(trained, trained_dir,
                                                                                        tmp_path, every):
    """bench.py's spread file (96 prompts of 2 to 78 tokens, 8 to 88 new tokens each), greedy on the trained
    model: each prompt's text at 32 slots equals its own model.generate; in full (slow: a minute of one-row steps),
    every prompt's, and the text at one slot too. Most prompts start in a row while the others are part way."""
    from batch import SampleJob, make_samples, sample_prompts
    from bench import spread_file

    enc = load_tokenizer(trained_dir)
    prompts = spread_file(enc, seed=1337)
    for p in prompts:
        p.settings["temperature"] = 0.0
    texts = {}
    for batch_size in (32, 1)[:1 if every > 1 else 2]:
        job = SampleJob(prompts, "spread", str(tmp_path / f"bs{batch_size}.jsonl"), batch_size, 2048)
        assert sample_prompts(job, trained, enc, Ranks()) == 0
        texts[batch_size] = [r["text"] for r in lines(tmp_path / f"bs{batch_size}.jsonl")]
    assert texts.get(1, texts[32]) == texts[32]
    samples = make_samples(SampleJob(prompts, "spread", "", 32, 2048), enc, trained)
    assert sorted(len(s.ids) for s in samples) == sorted(round(2 + 76 * i / 95) for i in range(96))
    for s, text in list(zip(samples, texts[32]))[::every]:
        alone = trained.generate(torch.tensor([s.ids]), s.steps, temperature=0)[0, len(s.ids):]
        assert text == enc.decode(alone.tolist()), s.prompt.id


def test_rows_kept_ordered_by_length_across_runs_of_rows():
    """batch.place on a simulated run of 32 slots in 4 runs (and 7 slots in 3 uneven ones): rows grow one a step,
    random rows end, new rows of random lengths take free rows (the shortest first, as run_slots gives them). After
    every step each run's longest row is no longer than the next run's shortest; moves only go from held rows to
    free ones, and each new row takes a row free after its moves."""
    import random

    from batch import place

    for slots, groups in ((32, 4), (7, 3)):
        rng = random.Random(slots)
        lengths, moved = [None] * slots, 0
        bounds = [(slots * g // groups, slots * (g + 1) // groups) for g in range(groups)]
        for step in range(400):
            new = sorted(rng.randrange(2, 80) for _ in range(lengths.count(None)))
            for (moves, row), length in zip(place(lengths, new, groups), new):
                for src, dst in moves:
                    assert lengths[src] is not None and lengths[dst] is None
                    lengths[dst], lengths[src] = lengths[src], None
                assert lengths[row] is None
                lengths[row], moved = length, moved + len(moves)
            runs = [[n for n in lengths[a:b] if n is not None] for a, b in bounds]
            assert all(max(low) <= min(high) for low, high in zip(runs, runs[1:]) if low and high), (step, lengths)
            lengths = [None if n is None or rng.random() < 0.05 else n + 1 for n in lengths]
        assert moved > 50


def test_moved_rows_keep_their_samples(trained, trained_dir, tmp_path, monkeypatch):
    """At 16 slots (two runs of rows), sampling at temperature 0.8: rows move as prompts join, and each sample's
    text is still its own model.generate with its seed."""
    import generate
    from batch import SampleJob, make_samples, sample_prompts
    from bench import spread_file

    moves, original = [], generate.Decoder.move
    monkeypatch.setattr(generate.Decoder, "move", lambda self, *a: moves.append(a[:2]) or original(self, *a))
    enc = load_tokenizer(trained_dir)
    prompts = spread_file(enc, seed=7)[:40]
    job = SampleJob(prompts, "spread", str(tmp_path / "out.jsonl"), 16, 2048)
    assert sample_prompts(job, trained, enc, Ranks()) == 0
    assert len(moves) >= 5
    for s, r in zip(make_samples(job, enc, trained), lines(tmp_path / "out.jsonl")):
        alone = trained.generate(torch.tensor([s.ids]), s.steps, 0.8, 200, seed=s.seed)[0, len(s.ids):]
        assert r["text"] == enc.decode(alone.tolist()), s.prompt.id


def test_the_prompts_file_job_draws_at_the_chosen_thread_count(trained, trained_dir, tmp_path, monkeypatch):
    import generate
    import sampling
    from batch import SampleJob, sample_prompts
    from bench import spread_file

    seen, chooser = [], generate.ThreadChooser
    original = sampling.sample_next_token
    monkeypatch.setattr(sampling, "sample_next_token",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or original(*a, **k))
    monkeypatch.setattr(generate, "ThreadChooser", lambda *args, **options: chooser((1, 1)))
    enc = load_tokenizer(trained_dir)
    job = SampleJob(spread_file(enc, seed=1337)[:3], "spread", str(tmp_path / "out.jsonl"), 2, 2048)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert sample_prompts(job, trained, enc, Ranks()) == 0
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
