"""
Many prompts from a file to a JSONL file, on one process or many under torchrun: the job behind
`sample.py --prompts=FILE --out=FILE.jsonl`, and the file reading, sharding, resuming and merging that score.py
shares.

The file. A `.jsonl` file holds one JSON object a line: {"id": ..., "prompt": ...} plus any of the settings in
PER_PROMPT, which override the run's for that prompt; "id" (a string or an int) defaults to the line number. Any
other file is text, one prompt a line, with `\\n` for a newline inside a prompt and `\\\\` for a backslash; its ids
are line numbers, and empty lines are skipped (`<|endoftext|>` alone is a prompt that starts from nothing).

Batches: continuous batching. A rank runs its samples in a fixed number of slots, the rows of one KV cache
(batch_size of them, fewer where the cache, every row as long as the longest prompt plus its new tokens, would pass
kv_cache_mb or the rows would not fit in the memory available). Every step each busy row takes a token at its own
position, with its own settings and generator; a row whose sample has finished (its max_new_tokens, or <|endoftext|>
with stop_at_eot) takes the next sample at the next step, its prompt prefilled in that step's own pass
(generate.Decoder.step), while the others go on. The order in which samples take slots is planned so that the slots'
work ends together (admission_order). A row's numbers are those of a batch of one up to the float rounding of a
product over a different number of tokens (measured on the trained model: logits within 6e-6).

Seeds. Sample k of prompt id draws its noise from its own torch.Generator, seeded from a hash of (the seed, id,
k), where the seed is the prompt's own or the run's. So a sample's text depends on the model, the prompt, its
settings and that seed only: never on which batch, rank or world size produced it (beyond the rounding above,
which can change a token only where two candidates tie to within it). That holds in float32. On a GPU in bfloat16
or float16 the matrix kernels round differently for another number of rows, by far more, so a sample's tokens can
change with its batch's size, the world size or a resume (which batches what is left anew): --dtype=float32 is
the way to samples independent of them. The seed is written in the sample's line.

Resume. Each rank appends its finished samples to its own part file (OUT.rankR-of-W.part), flushed per line and
fsynced every FSYNC_SECONDS. Run again with the same command, a rank skips what its part file holds; a torn last
line (a process killed mid-write) is cut off and its sample redone. When every rank is done, rank 0 gathers the
parts (through torch.distributed, so no shared file system is needed), writes OUT in the file's order
(prompt, then sample), and the parts are removed. An OUT that already holds every sample is not redone. A rank
that finishes early waits for the others as long as they take (Ranks.wait_for_all), not a collective's timeout.

Ranks. Under torchrun (WORLD_SIZE > 1) the samples, in the file's order, are cut into one contiguous share per rank
of about equal work; the share depends only on the file, the settings and the world size. A rank on a GPU takes
cuda:LOCAL_RANK (--device=cuda:N is refused: every rank would take GPU N); on a CPU each rank takes cores /
LOCAL_WORLD_SIZE threads (torchrun's own default is one). The collectives here move Python objects (part files,
figures) over gloo, from host memory, also beside NCCL on GPUs. A rank that fails exits, and torchrun stops the
others and reports it: the run never hangs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from configurator import Setting, convert
from errors import UsageError
from runtime import (MEMORY_SHARE, TEXT_BYTES_PER_TOKEN, available_memory, bytes_per_sample, check_sampling,
                     host_memory, kv_cache_bytes, prompt_ids, token_bytes)
from tokenizer import EOT_ID

if TYPE_CHECKING:
    import tiktoken
    import torch

    from model import GPT

# What a .jsonl line may set for its prompt, typed as sample.py's settings of those names (a test holds them equal)
PER_PROMPT = {s.name: s for s in (
    Setting("max_new_tokens", int, False, "tokens generated in each sample"),
    Setting("temperature", float, False, "0 is greedy"),
    Setting("top_k", int, True, "keep only the top_k most likely tokens"),
    Setting("top_p", float, True, "nucleus sampling"),
    Setting("num_samples", int, False, "samples of the prompt"),
    Setting("stop_at_eot", bool, False, "end a sample at <|endoftext|>"),
    Setting("seed", int, True, "the seed of the prompt's samples (null is refused)"),
)}
FSYNC_SECONDS = 10.0  # flushed lines survive a killed process at once; fsync guards them against a machine crash
# What each sample of a prompts file holds in memory by the end of a run: its bookkeeping (measured: about 0.5 KB)
# and its line at the merge (about 1 KB as a string and a parsed record, and so its text twice)
SAMPLE_BYTES, MERGED_TEXT_COPIES = 1536, 2
ROW_TOKEN_BYTES = 36  # a slot's new tokens, a list of Python ints until its sample ends: 8 B a pointer, 28 an int

Key = tuple  # what identifies a line: (id as JSON, sample index) for samples, (id as JSON,) for scores


# ----------------------------------------------------------------------------------------------------------------
# The file


@dataclass
class Prompt:
    id: int | str  # the line's "id", else its line number
    line: int  # its line in the file, for messages
    text: str
    settings: dict = field(default_factory=dict)  # the run's per-prompt settings with the line's own on top


def read_prompts(path: str, text_key: str, settings: Optional[dict[str, Setting]] = None,
                 defaults: Optional[dict] = None, check: Optional[Callable[[dict], None]] = None) -> list[Prompt]:
    """The prompts (or texts) of a .jsonl or text file, each with its settings checked: by type against settings
    (the per-line keys allowed) and by value with check (raising ValueError). UsageError names the line."""
    settings, defaults = settings or {}, defaults or {}
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the {text_key}s file '{path}': {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is not part of the first line
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"the {text_key}s file '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} on line "
                         f"{line}): convert it to UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no other
    jsonl = path.endswith(".jsonl")
    prompts, seen = [], {}
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if jsonl:
            prompt = parse_line(line, where, number, text_key, settings, defaults)
        else:
            prompt = Prompt(number, number, unescape(line), dict(defaults))
        if check is not None:
            try:
                check(prompt.settings)
            except ValueError as e:
                raise UsageError(f"{where}: {e}") from None
        key = json.dumps(prompt.id)
        if key in seen:
            raise UsageError(f"{where}: id {key} is already the id of line {seen[key]}: give each line its own id")
        seen[key] = number
        prompts.append(prompt)
    if not prompts:
        raise UsageError(f"the {text_key}s file '{path}' holds no {text_key}s: write one a line")
    return prompts


def parse_line(line: str, where: str, number: int, text_key: str, settings: dict[str, Setting],
               defaults: dict) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where} is not valid JSON ({e.msg} at column {e.colno}): write one object a line, "
                         f'like {{"id": 1, "{text_key}": "Once upon a time"}}') from None
    if not isinstance(record, dict):
        raise UsageError(f'{where} is not a JSON object: write one a line, like {{"id": 1, "{text_key}": "..."}}')
    if not isinstance(record.get(text_key), str):
        raise UsageError(f'{where} has no "{text_key}" string: each line needs one')
    prompt = Prompt(record.get("id", number), number, record[text_key], dict(defaults))
    if isinstance(prompt.id, bool) or not isinstance(prompt.id, (int, str)):
        raise UsageError(f"{where}: the id must be a string or an integer, got {json.dumps(prompt.id)}")
    for name, value in record.items():
        if name in ("id", text_key):
            continue
        if name not in settings:
            allowed = ", ".join(f'"{k}"' for k in ("id", text_key, *settings))
            raise UsageError(f'{where}: unknown key "{name}": a line may hold {allowed}')
        try:
            prompt.settings[name] = convert(settings[name], value)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
    return prompt


def unescape(line: str) -> str:
    """A text file's line as its prompt: \\n is a newline and \\\\ a backslash; any other backslash stays."""
    return re.sub(r"\\([\\n])", lambda m: "\n" if m.group(1) == "n" else "\\", line)


def sample_seed(seed: int, prompt_id: int | str, sample: int) -> int:
    """The seed of one sample's generator: a hash of the run's (or prompt's) seed, the prompt's id and the sample
    index, so that it does not depend on where or with what else the sample is drawn."""
    digest = hashlib.blake2b(json.dumps([seed, prompt_id, sample]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator takes it


# ----------------------------------------------------------------------------------------------------------------
# Ranks: one process, or one of many under torchrun


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: str = "auto"  # the device setting for this rank
    store: Any = None  # torchrun's key-value store, where a rank that has finished its share says so
    objects: Any = None  # the gloo process group of the collectives here
    waits: int = 0  # wait_for_all calls so far

    def wait_for_all(self, poll_seconds: float = 0.1) -> None:
        """Return once every rank has called this. A rank that finishes its share long before the others waits
        here, asking the store now and then, not in a collective: a collective's wait ends in a timeout (30
        minutes for gloo, 10 for NCCL), and the job would fail at its very end."""
        if self.world == 1:
            return
        key, self.waits = f"finished/{self.waits}", self.waits + 1
        try:
            self.store.add(key, 1)
            while self.store.add(key, 0) < self.world:
                time.sleep(poll_seconds)
        except RuntimeError as e:  # the store has gone: torchrun is stopping the job
            raise SystemExit(f"rank {self.rank}: stopping, the job's store has gone ({str(e).splitlines()[0]})")

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        objs = [None] * self.world if self.rank == 0 else None
        self._collective("gather_object", obj, objs, dst=0)
        return objs if self.world > 1 else [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank."""
        objs = [obj]
        self._collective("broadcast_object_list", objs, src=0)
        return objs[0]

    def barrier(self) -> None:
        self._collective("barrier")

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    def _collective(self, name: str, *args, **kwargs) -> None:
        """torch.distributed's function `name` over the gloo group, with one process a no-op: what moves is Python
        objects, which gloo takes from host memory (NCCL would copy them through the GPU). When another rank has
        died, this one ends with one line, not a traceback: torchrun reports the rank that failed first."""
        if self.world == 1:
            return
        import torch.distributed as dist

        try:
            getattr(dist, name)(*args, group=self.objects, **kwargs)
        except RuntimeError as e:  # gloo and NCCL report a lost peer as a RuntimeError
            raise SystemExit(f"rank {self.rank}: stopping, another rank has failed ({str(e).splitlines()[0]})")


def start_ranks(device: str, timeout: Optional[timedelta] = None) -> Ranks:
    """This process's rank. Under torchrun: cuda:LOCAL_RANK for device auto or cuda (an indexed GPU is refused:
    every rank would take it), on a CPU an equal part of the cores for each of this machine's ranks, and the
    process groups: the default one (NCCL on GPUs, gloo on CPUs) and a gloo one for the collectives here. timeout:
    the limit of each of those collectives (None: torch's default); the wait for the slowest rank is not one
    (wait_for_all)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(device=device)
    if device.startswith("cuda:"):
        raise UsageError(f"--device={device} under torchrun: every process would take that one GPU (and NCCL "
                         f"refuses a GPU shared by two ranks). Use --device=cuda (or auto): each process takes the "
                         f"GPU of its LOCAL_RANK; CUDA_VISIBLE_DEVICES chooses which GPUs those are")
    import torch
    import torch.distributed as dist

    from runtime import pick_device

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = pick_device(device)  # a device this machine lacks is named before any group forms
    if dev.type == "cuda":
        if local_world > torch.cuda.device_count():
            raise UsageError(f"torchrun started {local_world} processes on this machine, which has "
                             f"{torch.cuda.device_count()} GPU(s): one process a GPU (--nproc_per_node="
                             f"{torch.cuda.device_count()}), or --device=cpu")
        device = f"cuda:{local_rank}"
        pick_device(device)  # the current GPU from here on
    elif dev.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local_world))
    store, rank, world = next(dist.rendezvous("env://"))  # torchrun's store: init_process_group's, kept for us
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    return Ranks(rank, world, device, store, dist.new_group(backend="gloo", timeout=timeout))


def share(items: list, cost: Callable[[Any], float], ranks: Ranks) -> list:
    """This rank's contiguous share of items, cut so that each rank's items cost about the same."""
    if ranks.world == 1:
        return items
    costs = [cost(item) for item in items]
    total, done, mine = sum(costs), 0.0, []
    for item, c in zip(items, costs):
        if min(ranks.world - 1, int((done + c / 2) * ranks.world / total)) == ranks.rank:
            mine.append(item)
        done += c
    return mine


# ----------------------------------------------------------------------------------------------------------------
# The output: a part file per rank, merged into one file in order at the end


class Output:
    """A job's JSONL output. keys: every line's key in the output's order; mine: this rank's share of them;
    key_of: a parsed line's key."""

    def __init__(self, path: str, ranks: Ranks, keys: list[Key], mine: Iterable[Key], key_of: Callable[[dict], Key]):
        self.path, self.ranks, self.keys, self.mine, self.key_of = Path(path), ranks, keys, set(mine), key_of
        self.part = self.path.with_name(f"{self.path.name}.rank{ranks.rank}-of-{ranks.world}.part")
        self.file = None
        self.synced = time.monotonic()

    def finished(self) -> bool:
        """True when OUT already holds this job's every line (a finished run: nothing to do). Rank 0 decides for
        all: UsageError when OUT is something else."""
        verdict = None
        if self.ranks.rank == 0 and self.path.exists():
            verdict = "finished"
            try:
                keys = [self.key_of(json.loads(line)) for line in self.path.read_text(encoding="utf-8").splitlines()]
            except (OSError, ValueError, KeyError, TypeError):
                keys = None
            if keys != self.keys:
                verdict = (f"{self.path} exists and is not this job's finished output: move it away, or write to "
                           f"another --out")
        verdict = self.ranks.broadcast(verdict)
        if verdict not in (None, "finished"):
            raise UsageError(verdict)
        if verdict == "finished":
            self.part.unlink(missing_ok=True)  # left by a run stopped between writing OUT and removing its parts
        return verdict == "finished"

    def resume(self) -> set[Key]:
        """The keys this rank's part file already holds; a torn last line is cut off. Opens the part to append."""
        others = [p.name for p in self.path.parent.glob(f"{self.path.name}.rank*-of-*.part")
                  if not p.name.endswith(f"-of-{self.ranks.world}.part")]
        if others:
            raise UsageError(f"{self.path.parent} holds parts of an unfinished run with another number of processes "
                             f"({', '.join(sorted(others))}): resume it with that many, or delete them to start over")
        done = set()
        try:
            data = self.part.read_bytes() if self.part.exists() else b""
            good = 0  # bytes of whole, valid lines
            lines = data.split(b"\n")
            for number, line in enumerate(lines[:-1], 1):  # the piece after the last newline is never whole
                try:
                    key = self.key_of(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    if number < len(lines) - 1:
                        raise UsageError(f"{self.part} line {number} is not a line of this job: delete the file to "
                                         f"start this rank over") from None
                    break  # the last line, torn by a crash: redone
                if key not in self.mine:
                    raise UsageError(f"{self.part} line {number} holds {key}, not one of this rank's samples: it "
                                     f"is another job's part; delete it or write to another --out")
                done.add(key)
                good += len(line) + 1
            if good < len(data):
                print(f"{self.part}: cut a torn last line ({len(data) - good} bytes); its work is redone",
                      file=sys.stderr)
                os.truncate(self.part, good)
            self.file = open(self.part, "ab")
        except OSError as e:
            raise UsageError(f"cannot write the part file {self.part}: {e.strerror or e}") from None
        return done

    def write(self, line: str) -> None:
        """Append one finished line: flushed now (a killed process loses none), fsynced now and then."""
        self.file.write(line.encode("utf-8") + b"\n")
        self.file.flush()
        if time.monotonic() - self.synced > FSYNC_SECONDS:
            os.fsync(self.file.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def merge(self) -> Optional[list[dict]]:
        """Every rank's part, on rank 0, written to OUT in order; the parts removed. Rank 0 gets the parsed lines
        in order, the other ranks None."""
        self.close()
        self.ranks.wait_for_all()  # the ranks that finished first wait for the last here, without a timeout
        parts = self.ranks.gather(self.part.read_text(encoding="utf-8").splitlines())
        records = None
        if self.ranks.rank == 0:
            by_key = {}
            for line in (line for part in parts for line in part):
                by_key[self.key_of(json.loads(line))] = line
            missing = [k for k in self.keys if k not in by_key]
            if missing:
                raise UsageError(f"the parts lack {len(missing)} lines (the first: {missing[0]}): rerun to finish")
            temporary = self.path.with_name(self.path.name + ".merging")
            with open(temporary, "w", encoding="utf-8") as f:
                f.writelines(by_key[k] + "\n" for k in self.keys)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)  # whole or not at all
            records = [json.loads(by_key[k]) for k in self.keys]
        self.ranks.barrier()  # OUT is written: only now may the parts go
        self.part.unlink()
        return records


# ----------------------------------------------------------------------------------------------------------------
# Progress on stderr


class Progress:
    """A tqdm bar on rank 0's stderr over its share: prompts/s and tokens/s of this run, and the ETA; then a
    summary of every rank's figures."""

    def __init__(self, ranks: Ranks, total: int, done: int, unit: str):
        from tqdm import tqdm

        self.ranks, self.unit = ranks, unit
        self.start = time.perf_counter()
        self.prompts = self.tokens = self.batches = self.rows = 0
        self.busy = 0  # with slots (continuous batching): busy rows summed over the steps, which `batches` counts
        self.slots: Optional[int] = None
        label = f"rank 0 of {ranks.world}" if ranks.world > 1 else None
        self.bar = tqdm(total=total, initial=done, unit=unit, desc=label, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5, disable=ranks.rank != 0, smoothing=0)

    def update(self, rows: int, finished_prompts: int, tokens: int, busy: Optional[int] = None) -> None:
        """rows finished: a batch's, or a step's of the slots (busy of them busy during it), or none of those."""
        self.prompts += finished_prompts
        self.tokens += tokens
        self.batches += busy is not None or self.slots is None
        self.rows += rows
        elapsed = time.perf_counter() - self.start
        occupancy = ""
        if busy is not None:
            self.busy += busy
            occupancy = f", slots {busy}/{self.slots} busy"
        self.bar.set_postfix_str(f"{self.prompts / elapsed:.2f} prompts/s, {self.tokens / elapsed:.0f} tokens/s"
                                 f"{occupancy}", refresh=False)
        self.bar.update(rows)

    def summary(self, what: str, out: str) -> None:
        """Every rank's figures, added up, as one line on rank 0's stderr."""
        self.bar.close()
        mine = (self.prompts, self.rows, self.tokens, self.batches, self.busy, (self.slots or 0) * self.batches,
                time.perf_counter() - self.start)
        figures = self.ranks.gather(mine)
        if figures is None:
            return
        prompts, rows, tokens, batches, busy, slot_steps = (sum(f[i] for f in figures) for i in range(6))
        elapsed = max(f[6] for f in figures)
        processes = f" on {self.ranks.world} processes" if self.ranks.world > 1 else ""
        rate = f"{prompts / elapsed:.2f} {what}/s, {tokens / elapsed:.1f} tokens/s" if elapsed > 0 else "no time"
        if self.slots is None:
            mean_rows = f"{rows / batches:.1f}" if batches else "0"
            work = f"{batches} batches, {mean_rows} rows on average"
        else:
            steps = max(1, batches)
            work = f"{batches} steps, {busy / steps:.1f} of {slot_steps / steps:.0f} slots busy on average"
        print(f"{rows} {self.unit}s of {prompts} {what} ({tokens} tokens) in {elapsed:.2f} s{processes}: {rate}; "
              f"{work}; wrote {out}", file=sys.stderr)


def run_job(output: Output, progress: Progress, steps: Iterator[None], what: str) -> int:
    """Run a job's steps (each writes its finished lines and counts them in progress), then merge the parts into
    the output and report. Returns the exit status: 130 on Ctrl-C, which keeps every finished line for the next
    run."""
    try:
        for _ in steps:
            pass
    except KeyboardInterrupt:
        output.close()
        progress.bar.close()
        print(f"interrupted: the finished lines are in {output.part}; run the same command to go on",
              file=sys.stderr)
        return 130
    output.merge()
    progress.summary(what, str(output.path))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Sampling a prompts file


@dataclass
class Sample:
    prompt: Prompt
    index: int  # which of the prompt's samples
    seed: int
    ids: list[int]

    @property
    def key(self) -> Key:
        return (json.dumps(self.prompt.id), self.index)

    @property
    def steps(self) -> int:
        """The decode steps it holds a slot for, at most."""
        return self.prompt.settings["max_new_tokens"]


@dataclass
class SampleJob:
    prompts: list[Prompt]
    path: str
    out: str
    batch_size: int
    kv_cache_mb: int

    @classmethod
    def read(cls, path: Optional[str], out: Optional[str], batch_size: int, kv_cache_mb: int,
             defaults: dict) -> "SampleJob":
        """The job of sampling every prompt of the file at path to out, with the run's settings `defaults` (one
        value for each name in PER_PROMPT) under each line's own; the file is read and checked here."""
        if path is None or out is None:
            raise UsageError("--prompts and --out go together: --prompts=prompts.jsonl --out=samples.jsonl")
        if defaults["seed"] is None:
            raise UsageError("--prompts needs a seed (an int), so that a resumed run draws the samples it would "
                             "have drawn")
        if batch_size < 1 or kv_cache_mb < 1:
            raise UsageError(f"batch_size and kv_cache_mb must be >= 1, got {batch_size} and {kv_cache_mb}")
        d = defaults  # the run's settings are checked as a line's are, but named as the settings they are
        check_sampling(d["max_new_tokens"], d["temperature"], d["top_k"], d["top_p"], d["num_samples"])
        prompts = read_prompts(path, "prompt", PER_PROMPT, defaults, check_line)
        check_held(prompts, path, host_memory())
        return cls(prompts, path, out, batch_size, kv_cache_mb)


def check_held(prompts: list[Prompt], path: str, available: Optional[int]) -> None:
    """UsageError, before any model loads, for a file whose samples could not all be held in the memory available
    (estimated, so only what surely cannot be held is refused): a run keeps every sample's bookkeeping, and rank 0
    the text of all of them at the merge. The message says about how many samples of the file's lengths fit."""
    if available is None:
        return
    total = sum(p.settings["num_samples"] for p in prompts)
    need = sum(p.settings["num_samples"] * (SAMPLE_BYTES + MERGED_TEXT_COPIES * TEXT_BYTES_PER_TOKEN *
                                              p.settings["max_new_tokens"]) for p in prompts)
    if need > available:
        most = int(total * available // need)
        line = max(prompts, key=lambda p: p.settings["num_samples"] * p.settings["max_new_tokens"])
        asks = f"line {line.line} asks for {line.settings['num_samples']:,} of {line.settings['max_new_tokens']:,}"
        raise UsageError(f"{path} asks for {total:,} samples, which take about {need / 1e6:,.0f} MB to keep track of "
                         f"and to merge, more than the {available / 1e6:,.0f} MB available: " +
                         (f"about {most:,} samples of these lengths fit. Lower num_samples or max_new_tokens ({asks} "
                          f"tokens), or split the file" if most else
                          f"too long to hold even one ({asks} tokens): lower max_new_tokens"))


def check_line(settings: dict) -> None:
    """A prompt's settings, its line's over the run's, as generate_stream checks them: ValueError if wrong."""
    from sampling import check_sampling_args

    if settings["seed"] is None:
        raise ValueError("seed must be an int here, not null")
    check_sampling_args(settings["max_new_tokens"], settings["temperature"], settings["top_k"], settings["top_p"],
                        settings["num_samples"])


def make_samples(job: SampleJob, enc: tiktoken.Encoding, model: GPT) -> list[Sample]:
    """Every sample of every prompt, in the file's order, each with its prompt's token ids (an empty prompt starts
    from <|endoftext|>; a prompt longer than the context keeps its end, as sample.py does)."""
    samples, cropped = [], 0
    block_size = model.config.block_size
    for prompt in job.prompts:
        ids, length = prompt_ids(enc, prompt.text, model.config, f"{job.path} line {prompt.line}: the prompt")
        cropped += length > block_size
        seed = prompt.settings["seed"]
        samples += [Sample(prompt, k, sample_seed(seed, prompt.id, k), ids)
                    for k in range(prompt.settings["num_samples"])]
    if cropped:
        print(f"warning: {cropped} prompts are longer than the model's context of {block_size}: each keeps its "
              f"last {block_size} tokens", file=sys.stderr)
    return samples


def slot_count(samples: list[Sample], job: SampleJob, model: GPT, compile: bool) -> int:
    """The rows of the KV cache: batch_size, fewer where the cache would pass kv_cache_mb (each row holds the
    positions of the longest prompt plus its new tokens, up to the context; compile: a static cache of the whole
    context per row) or where the rows would not fit in the memory available, and no more than there are
    samples."""
    config, itemsize = model.config, model.transformer.wpe.weight.element_size()
    longest = max(len(s.ids) + s.steps for s in samples)
    row_bytes = kv_cache_bytes(config, longest, 0, itemsize, compile)
    # A row in memory: its cache, a step's logits (and a window step's activations past the context), and the new
    # tokens of its longest sample
    row_held = bytes_per_sample(config, longest, 0, itemsize, compile) + max(s.steps for s in samples) * ROW_TOKEN_BYTES
    available = available_memory(model.transformer.wpe.weight.device)
    in_memory = job.batch_size if available is None else int(MEMORY_SHARE * available // row_held)
    return max(1, min(job.batch_size, job.kv_cache_mb * 2 ** 20 // row_bytes, in_memory, len(samples)))


def admission_order(samples: list[Sample], slots: int) -> list[Sample]:
    """The order in which samples take free slots, planned so that the slots' work ends at about the same step.

    Taking the longest first (LPT) leaves a tail of steps with few busy rows: on bench.py's spread file (96
    samples of 8 to 88 new tokens, 32 slots) 156 steps where 144 would do. MULTIFIT does better: the samples'
    steps packed first-fit-decreasing into `slots` bins of the least capacity (by bisection, to within 1%) that
    holds them all (145 steps there), then ordered by the step at which each starts in its bin. A free slot takes
    the next sample, so with every sample running its max_new_tokens the run follows the plan; one that stops
    early only brings the rest forward.
    """
    import numpy as np

    by_size = sorted(samples, key=lambda s: -s.steps)
    steps = np.array([s.steps for s in by_size], dtype=np.int64)

    def starts(capacity: int) -> Optional[np.ndarray]:
        """Each sample's start step in its bin, first-fit decreasing; None if the bins cannot hold them."""
        loads, start = np.zeros(slots, dtype=np.int64), np.empty(len(steps), dtype=np.int64)
        for i, n in enumerate(steps):
            fits = np.flatnonzero(loads <= capacity - n)
            if not fits.size:
                return None
            start[i], loads[fits[0]] = loads[fits[0]], loads[fits[0]] + n
        return start

    low = max(-(-int(steps.sum()) // slots), int(steps[0]))  # no plan ends sooner
    high = 2 * low  # always holds them: a sample that fits in no bin would need every bin fuller than low
    plan = starts(high)
    while high - low > max(1, high // 100):
        middle = (low + high) // 2
        attempt = starts(middle)
        low, high, plan = (low, middle, attempt) if attempt is not None else (middle, high, plan)
    return [by_size[i] for i in np.argsort(plan, kind="stable")]


def row_groups(slots: int) -> int:
    """Runs of rows a decode step's attention takes apart (KVCache.groups), each over its own keys: one run per 8
    slots, at most 4 (more cost an attention call each and save less)."""
    return max(1, min(4, slots // 8))


def place(lengths: list[Optional[int]], new: list[int], groups: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Rows for new rows of these lengths (the order given), among rows kept ordered by length from run to run of
    `groups` (the shortest first; KVCache.visible's runs): for each, the moves (src, dst) that keep the order, in
    order, and the row it then takes, each the free row needing the fewest moves. Rows grow alike, so the order holds
    until rows start or end; a move costs a copy of one row's cached keys, far less than every step's attention over
    stale keys. lengths: each row's, None where free (not changed)."""
    from model import row_runs

    B, lengths, plans = len(lengths), list(lengths), []
    bounds = row_runs(B, groups)
    run_of = [g for g, (a, b) in enumerate(bounds) for _ in range(a, b)]  # each row's run

    def plan(row: int, length: int) -> tuple[list[tuple[int, int]], int]:
        """From the free row `row`: a longer row comes up from the run below, or a shorter one down from above, until
        the new row fits where it stands."""
        g, moves, now = run_of[row], [], list(lengths)

        def held(h: int) -> list[int]:  # the rows run h holds, as the moves so far leave them
            return [r for r in range(*bounds[h]) if now[r] is not None] if 0 <= h < len(bounds) else []

        while True:
            below, above = held(g - 1), held(g + 1)
            if below and length < max(now[r] for r in below):
                src, g = max(below, key=now.__getitem__), g - 1
            elif above and length > min(now[r] for r in above):
                src, g = min(above, key=now.__getitem__), g + 1
            else:
                return moves, row
            moves.append((src, row))
            now[row], now[src], row = now[src], None, src

    for length in new:
        firsts = {}  # the first free row of each run: any other of the run plans the same moves
        for r in range(B):
            if lengths[r] is None:
                firsts.setdefault(run_of[r], r)
        moves, row = min((plan(r, length) for r in firsts.values()), key=lambda p: len(p[0]))
        for src, dst in moves:
            lengths[dst], lengths[src] = lengths[src], None
        lengths[row] = length
        plans.append((moves, row))
    return plans


def run_slots(model: GPT, samples: list[Sample], slots: int,
              compile: bool) -> Iterator[tuple[list[tuple[Sample, list[int], str]], int]]:
    """Continuous batching over `slots` rows of one generate.Decoder, the samples taking free rows in their order.
    Each step yields the samples that finished (their new tokens, without the stop token, and "stop" or "length")
    and how many rows were busy. A free row with no sample left is parked and draws greedily, touching no
    generator."""
    from collections import deque
    from contextlib import nullcontext

    import torch

    from generate import COMPILED_TURN, Decoder, TokenHistory, cpu_thread_chooser
    from sampling import sample_next_token

    device = model.transformer.wpe.weight.device
    block_size = model.config.block_size
    longest = max(len(s.ids) + s.steps for s in samples)
    queue, idle = deque(samples), (0.0, None, None)
    running: list[Optional[Sample]] = [None] * slots
    made: list[list[int]] = [[] for _ in range(slots)]  # each row's new tokens so far
    settings = [idle] * slots  # each row's (temperature, top_k, top_p)
    generators = [torch.Generator(device=device) for _ in range(slots)]
    with COMPILED_TURN if compile else nullcontext():
        decoder = Decoder(model, slots, min(longest, block_size), device, compile)
        decoder.cache.groups = 1 if compile else row_groups(slots)  # a captured step has one run
        history = TokenHistory.for_slots(slots, longest, block_size, device)
        chooser = cpu_thread_chooser(device, compile)
        token = None

        def take(new: list[Sample]) -> list[int]:
            """Free rows for the new samples, which are put in the order of their rows; rows that make way (place)
            move with all they hold."""
            new.sort(key=lambda s: len(s.ids))
            lengths = [None if s is None else int(n) for s, n in zip(running, decoder.cache.lengths)]
            rows = []
            for moves, row in place(lengths, [len(s.ids) for s in new], decoder.cache.groups):
                for src, dst in moves:
                    decoder.move(src, dst, history)
                    running[dst], made[dst], settings[dst] = running[src], made[src], settings[src]
                    running[src], made[src], settings[src] = None, [], idle
                    generators[dst], generators[src] = generators[src], generators[dst]
                    token[dst] = token[src]
                rows.append(row)
            return rows

        def turn(free: list[int], new: list[Sample]) -> tuple[torch.Tensor, int]:
            """One step: the network's pass, with the new samples' prompts prefilled into the free rows, and
            every row's draw; the tokens drawn [slots] and how many rows are parked."""
            rows = torch.tensor(free, dtype=torch.long)
            prompts = [torch.tensor(s.ids, device=device) for s in new]
            if token is None:  # the first step: every row starts
                logits = decoder.admit(rows, prompts, history)
            else:
                logits = decoder.step(token, history, (rows, prompts) if new else None)
            for row, s in zip(free, new):
                running[row], made[row] = s, []
                settings[row] = tuple(s.prompt.settings[k] for k in ("temperature", "top_k", "top_p"))
                generators[row].manual_seed(s.seed)
            parked = [row for row, s in enumerate(running) if s is None]
            if parked:
                decoder.park(torch.tensor(parked), history)
                for row in parked:
                    settings[row] = idle
            temperature, top_k, top_p = (list(column) for column in zip(*settings))
            drawn = sample_next_token(logits, temperature, top_k, top_p, generators=generators)
            history.append(drawn[:, None])
            return drawn, len(parked)

        while queue or any(s is not None for s in running):
            new = [queue.popleft() for _ in range(min(len(queue), running.count(None)))]
            free = take(new)
            if chooser is None:
                token, parked = turn(free, new)
            else:  # a step that prefills prompts too, or slides a row's window, is not timed as a plain step
                token, parked = chooser.run(turn, free, new, timed=not new and not decoder.slides())
            finished = []
            for row, t in enumerate(token.tolist()):  # the one wait for the device a step
                s = running[row]
                if s is None:
                    continue
                if s.prompt.settings["stop_at_eot"] and t == EOT_ID:
                    finished.append((s, made[row], "stop"))
                else:
                    made[row].append(t)
                    if len(made[row]) < s.steps:
                        continue
                    finished.append((s, made[row], "length"))
                running[row] = None
            yield finished, slots - parked


def sample_prompts(job: SampleJob, model: GPT, enc: tiktoken.Encoding, ranks: Ranks, compile: bool = False) -> int:
    """Run the job on this rank: its share of the samples, appended to its part, then merged into job.out; compile:
    generate_stream's. Returns the exit status (130 when interrupted: what was finished is kept for the next
    run)."""
    samples = make_samples(job, enc, model)
    mine = share(samples, lambda s: s.steps + 1, ranks)
    output = Output(job.out, ranks, [s.key for s in samples], [s.key for s in mine],
                    lambda record: (json.dumps(record["id"]), record["sample"]))
    if output.finished():
        print(f"{job.out} already holds every sample of {job.path}: nothing to do (move it away to sample again)",
              file=sys.stderr)
        ranks.close()
        return 0
    done = output.resume()
    todo = [s for s in mine if s.key not in done]
    progress = Progress(ranks, len(mine), len(mine) - len(todo), "sample")

    def write(finished: list[tuple[Sample, list[int], str]]) -> None:
        for s, tokens, finish in finished:
            text = token_bytes(enc, tokens).decode("utf-8", errors="replace")
            output.write(json.dumps(dict(id=s.prompt.id, sample=s.index, text=text, tokens=len(tokens),
                                         finish=finish, seed=s.seed), ensure_ascii=False))

    def counted(finished: list[tuple[Sample, list[int], str]], busy: Optional[int] = None) -> None:
        last = sum(s.index == s.prompt.settings["num_samples"] - 1 for s, _, _ in finished)  # a prompt counts once
        progress.update(len(finished), last, sum(len(tokens) for _, tokens, _ in finished), busy)

    def steps() -> Iterator[None]:
        work = [s for s in todo if s.steps > 0]
        progress.slots = slot_count(work, job, model, compile) if work else 0
        nothing = [(s, [], "length") for s in todo if s.steps == 0]  # max_new_tokens 0: no slot needed
        write(nothing)
        counted(nothing)
        if not work:
            return
        for finished, busy in run_slots(model, admission_order(work, progress.slots), progress.slots, compile):
            write(finished)
            counted(finished, busy)
            yield

    status = run_job(output, progress, steps(), "prompts")
    ranks.close()
    return status
