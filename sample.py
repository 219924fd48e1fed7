"""
Sample from a GPT-2 model, as nanoGPT's sample.py does:

    python sample.py [config/file.py ...] [--key=value ...]      (--help lists every setting)

Samples go to stdout, each followed by a line of dashes; status lines go to stderr. All samples are drawn together
in one batch, or in as few batches as the memory holds (said on stderr). On a terminal the first unfinished sample
is written as it is generated and the others follow as they finish; piped, the same text is written once each
sample is complete. A stdout whose encoding is not UTF-8 gets UTF-8 (a console: '?' for what it cannot show).

    python sample.py --prompts=prompts.jsonl --out=samples.jsonl [--key=value ...]   (or under torchrun)

samples every prompt of a file to JSONL instead, batched and resumable (batch.py holds that job).

Exit status: 0 done; 2 a mistake in a setting or a file (a one-paragraph message); 130 Ctrl-C and 143 SIGTERM, after
writing every sample as far as it got; 141 the reader of the pipe left; 1 stdout cannot be written (a full disk), or
memory ran out although the batches were planned to fit (after writing every sample as far as it got, a message
naming the setting to lower).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below: Ctrl-C or SIGTERM while they load ends quietly
    from startup import quiet_startup

    quiet_startup()

import codecs
import os
import select
import stat
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, TextIO

from cli import (OutOfMemory, Terminated, flush_stdout, memory_failure, memory_named, out_of_memory, run_main,
                 signals_held, writing_stdout)
from configurator import configure
from errors import UsageError
from runtime import (batch_sizes, check_draft, check_sampling, load_draft, load_model, pick_device, prompt_ids,
                     sample_steps, token_bytes)
from tokenizer import EOT, EOT_ID

if TYPE_CHECKING:
    import tiktoken
    import torch

    from model import GPT

# -----------------------------------------------------------------------------
init_from: str = 'gpt2'  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub repo id, a model folder or a nanoGPT ckpt.pt
start: str = "\n"  # the prompt, or "FILE:prompt.txt" to read it from a file; "" starts from <|endoftext|>
num_samples: int = 10  # number of samples to draw
max_new_tokens: int = 500  # number of tokens generated in each sample
temperature: float = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = always the likeliest
top_k: int | None = 200  # keep only the top_k most likely tokens; None keeps all
top_p: float | None = None  # keep the likeliest tokens whose probabilities add up to top_p (nucleus); None keeps all
stop_at_eot: bool = False  # end a sample at <|endoftext|>
seed: int | None = 1337  # the same seed gives the same samples on the same device; None differs each run
device: str = 'auto'  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
dtype: str = 'auto'  # float32, bfloat16 or float16; auto: bf16 on a GPU with native bf16 (else fp16), fp16 weights on a CPU
compile: bool = False  # compile the decoding step with torch.compile: a slow first step, faster ones after
quantize: str | None = None  # int8 (per-row scales) or fp16 weights, CPU only (GPT.quantize_int8/_fp16); None: dtype's
draft: str | None = None  # speculative decoding's draft: int8 or fp16 (the model's own weights, CPU), or a smaller model
draft_tokens: int | None = None  # tokens the draft proposes a round; None: as many as pay, chosen each round
stream: bool | None = None  # write the first sample as it is generated; None: only when stdout is a terminal
tiktoken_file: str | None = None  # GPT-2's gpt2.tiktoken rank file (else $GPT2_TIKTOKEN_FILE, the model's vocab.json)
prompts: str | None = None  # a prompts file (.jsonl, or text with one prompt a line): their samples go to --out
out: str | None = None  # the JSONL file of --prompts' samples; rerun the same command to resume (see batch.py)
batch_size: int = 32  # --prompts: the most samples generated together
kv_cache_mb: int = 2048  # --prompts: the most memory one batch's KV cache may take (fewer rows for long samples)
# -----------------------------------------------------------------------------

SEPARATOR = "---------------"
MAX_PROMPT_MB = 16  # thousands of times any GPT-2's context; a file that never ends (/dev/zero) is cut off here


def read_prompt(start: str) -> str:
    """The prompt text: start itself, or the contents of the UTF-8 file that 'FILE:path' names."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    limit = MAX_PROMPT_MB * 2 ** 20
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"cannot read the prompt file '{path}': {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"the prompt file '{path}' holds more than {MAX_PROMPT_MB} MB (or never ends, as /dev/zero "
                         f"does): a model sees only its last block_size tokens (1024 for GPT-2, a few KB of text), "
                         f"so give the end of the text")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the prompt
    except UnicodeDecodeError as e:
        raise UsageError(f"the prompt file '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}): convert it to UTF-8") from None


def prepare_stdout() -> TextIO:
    """stdout, able to take every character a model writes. One whose encoding is not UTF-8 (a file or pipe under
    Windows' cp1252, say) is switched to UTF-8, which keeps every character; a console that is not UTF-8 shows '?'
    for what it cannot show. Either is said once on stderr."""
    out = sys.stdout
    if out is None:
        raise UsageError("stdout is closed (the command ends in >&-): the samples would have nowhere to go; send "
                         "them to a file, or to /dev/null")
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        is_utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        is_utf8 = False
    if is_utf8 or not hasattr(out, "reconfigure"):
        return out
    if out.isatty():
        out.reconfigure(errors="replace")
        what = "characters it cannot show are written as '?'"
    else:
        out.reconfigure(encoding="utf-8")
        what = "writing the samples as UTF-8, which keeps every character (PYTHONIOENCODING=utf-8 says so at once)"
    print(f"sample.py: stdout's encoding is {encoding}, not UTF-8: {what}", file=sys.stderr)
    return out


def pipe_watch(out: TextIO) -> Optional[select.poll]:
    """A poller that answers, without waiting, once the reader of out (a pipe) has gone; None if out is no pipe.
    Piped, samples are written only once complete, so without asking, a run whose reader left (`| head`) would go
    on generating for nobody."""
    try:
        fd = out.fileno()
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return None
    if not is_pipe or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(fd, 0)  # no events asked for: only an error (the reader has gone) or a hang-up comes back
    return poller


@dataclass
class SampleText:
    """A sample begun and not yet completely written: its bytes not yet written, its own UTF-8 decoder (a character
    split over two tokens is written only when whole), and whether it has ended."""
    data: bytearray
    decoder: codecs.IncrementalDecoder
    ended: bool = False


class SampleWriter:
    """Writes the samples to out in order, each one its text (prompt included) and a line of dashes.

    Samples begin a batch at a time, and tokens arrive a step at a time for every sample of the batch. live=True
    writes the first unfinished sample as its text grows, flushing each step; the others' bytes wait in memory until
    their turn. Either way the bytes are the same. Only the samples begun and not yet written are kept, so the
    memory holds one batch's text however many samples are asked for.
    """

    def __init__(self, enc: tiktoken.Encoding, prompt: list[int], stop_at_eot: bool, live: bool, out: TextIO):
        self.enc, self.stop_at_eot, self.live, self.out = enc, stop_at_eot, live, out
        self.prompt = token_bytes(enc, prompt)
        self.samples: dict[int, SampleText] = {}  # by index, from self.current on
        self.begun = 0  # samples begun so far
        self.current = 0  # the first sample not completely written

    def begin(self, count: int) -> None:
        """The next count samples (a batch's) start, each from the prompt's text."""
        for i in range(self.begun, self.begun + count):
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.samples[i] = SampleText(bytearray(self.prompt), decoder)
        self.begun += count

    def add(self, tokens: list[int], first: int = 0) -> None:
        """One step's tokens, one per sample, for the samples from `first` on (a batch's)."""
        with signals_held():  # a Ctrl-C waits until the step is written: no text written twice or lost
            for i, token in enumerate(tokens, first):
                sample = self.samples.get(i)
                if sample is None or sample.ended:  # ended, and perhaps written already
                    continue
                if self.stop_at_eot and token == EOT_ID:
                    sample.ended = True
                else:
                    sample.data += token_bytes(self.enc, [token])
            self._write()

    def finish(self) -> None:
        """Every sample begun is as long as it will get (its batch ended, or generation was stopped): write them."""
        with signals_held():
            for sample in self.samples.values():
                sample.ended = True
            self._write()

    def _write(self) -> None:
        with writing_stdout("the samples "):
            while self.current < self.begun:
                sample = self.samples[self.current]
                if self.live or sample.ended:
                    self.out.write(sample.decoder.decode(bytes(sample.data), final=sample.ended))
                    sample.data.clear()
                if not sample.ended:
                    break
                self.out.write(f"\n{SEPARATOR}\n")
                del self.samples[self.current]
                self.current += 1
            if self.live:
                self.out.flush()


def keep_eager_on_a_cpu(compile: bool, dev: torch.device) -> bool:
    """Whether decoding compiles: --compile=True on a CPU turns itself off, in one line on stderr: compiled CPU
    decoding measured 0.6x eager's speed on an AVX2 machine and 0.2x on an AVX-512 one (bench.py --compile=True
    shows both)."""
    if compile and dev.type == "cpu":
        print("--compile=True: decoding stays eager on the CPU, where the compiled step measured 0.2-0.6x eager's "
              "speed (bench.py --compile shows both)", file=sys.stderr)
        return False
    return compile


def main() -> int:
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      num_samples=num_samples, stop_at_eot=stop_at_eot, seed=seed)
    if prompts is not None or out is not None:  # batch.py's job: every prompt of a file to JSONL
        if draft is not None:
            raise UsageError("--draft is for sample.py's own samples: a prompts file's rows each draw from their own "
                             "seed whatever their batch, which speculative decoding's rounds would undo; drop --draft")
        import batch

        job = batch.SampleJob.read(prompts, out, batch_size, kv_cache_mb, sampling)  # before any model loads
        ranks = batch.start_ranks(device)
        dev = pick_device(ranks.device)
        compiled = keep_eager_on_a_cpu(compile, dev)
        model, enc = load_model(init_from, dev, dtype, quantize, tiktoken_file)
        with memory_named(f"lower --batch_size (now {batch_size}) or --kv_cache_mb (now {kv_cache_mb}), or free some "
                          f"memory; the samples finished are kept: run the same command again to go on"):
            return batch.sample_prompts(job, model, enc, ranks, compiled)

    stdout = prepare_stdout()
    prompt = read_prompt(start)  # before torch's slow import: a mistake here answers at once
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples, seed)  # now: no model loads in vain
    if compile and quantize is not None:
        raise UsageError("--compile=True does not take --quantize (torch.compile cannot trace the int8 or fp16 "
                         "products): choose one; their decoding is fast without compiling")
    dev = pick_device(device)
    compiled = keep_eager_on_a_cpu(compile, dev)
    check_draft(draft, draft_tokens, dev, quantize, compiled)
    # A draft speeds up the exact float32 model: with it, --dtype=auto on a CPU keeps float32 weights.
    exact = draft is not None and dtype == "auto" and dev.type == "cpu"
    model, enc = load_model(init_from, dev, "float32" if exact else dtype, quantize, tiktoken_file)
    speculation = {} if draft is None else dict(draft=load_draft(draft, model, dev, dtype), stats={})
    if draft_tokens is not None:
        speculation["draft_tokens"] = draft_tokens
    if enc.eot_token is None and (stop_at_eot or not prompt):
        raise UsageError(f"{init_from} is a character-level model, without {EOT}: " + (
            "--stop_at_eot has nothing to stop at" if stop_at_eot else "give it a prompt to start from (--start)"))
    live = stdout.isatty() if stream is None else stream
    return write_samples(model, enc, prompt, stdout, dev, live=live, compile=compiled, speculation=speculation,
                         **sampling)


def write_samples(model: GPT, enc: tiktoken.Encoding, prompt: str, out: TextIO, dev: torch.device, *,
                  max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                  num_samples: int, stop_at_eot: bool, seed: Optional[int], compile: bool, live: bool,
                  speculation: Optional[dict] = None) -> int:
    """num_samples samples of the prompt written to out as they are made (live) or once each is complete, then
    a line of speed on stderr; the exit status: 0, or 130 and 143 when Ctrl-C or SIGTERM stopped generation, after
    every sample is written as far as it got. OutOfMemory, after the same, if memory ran out. speculation:
    generate_stream's draft, draft_tokens and stats, whose counts are said after the speed."""
    import torch

    ids, length = prompt_ids(enc, prompt, model.config, "the prompt")
    if not prompt:
        print(f"the prompt is empty: starting from {EOT}", file=sys.stderr)
    block_size = model.config.block_size
    if length > block_size:
        print(f"warning: the prompt is {length} tokens, longer than the model's context of {block_size}: "
              f"keeping its last {block_size}", file=sys.stderr)

    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    sizes = batch_sizes(model.config, model.transformer.wpe.weight.element_size(), idx.size(1), max_new_tokens,
                        num_samples, dev, compile)
    writer = SampleWriter(enc, ids if prompt else [], stop_at_eot, live, out)  # "" prints as ""
    generator = None if seed is None else torch.Generator(device=dev).manual_seed(seed)  # shared by the batches
    steps, done, first_step, status, failure = [], [], 0.0, 0, None  # each finished batch's steps and samples
    t0 = time.perf_counter()
    try:
        for count in sizes:
            writer.begin(count)
            stream = sample_steps(model, idx, max_new_tokens, temperature, top_k, top_p, stop_at_eot, compile,
                                  num_samples=count, generator=generator, **(speculation or {}))
            n_steps, step_time = write_batch(stream, writer, writer.begun - count, live, dev)
            steps.append(n_steps)
            done.append(count)
            first_step = first_step or step_time
            writer.finish()  # the batch's samples are complete (a Ctrl-C while they are written stops after them)
    except KeyboardInterrupt:
        status = 130
    except Terminated:
        status = 143
    except (MemoryError, RuntimeError) as e:  # planned to fit, but the memory was not there when asked for
        if not out_of_memory(e):
            raise
        status, failure = 1, OutOfMemory(
            f"{memory_failure(e)} while drawing {count:,} samples at once; each sample above ends where generation "
            f"stopped. Ask for fewer at once (--num_samples={max(1, count // 2)}) or fewer tokens (--max_new_tokens), "
            f"or free some memory")
    with signals_held():  # from here a Ctrl-C waits until every sample is written
        elapsed = time.perf_counter() - t0
        writer.finish()
        flush_stdout()
        if any(steps):
            report_speed(steps, done, elapsed, first_step, compile)
        if speculation and speculation["stats"].get("rounds"):
            report_speculation(speculation["stats"], writer.begun)
        if status in (130, 143):
            print(f"{'interrupted' if status == 130 else 'terminated'}: each sample above ends where generation "
                  f"stopped", file=sys.stderr)
    if failure is not None:
        raise failure
    return status


def write_batch(stream: Iterator[torch.Tensor], writer: SampleWriter, first: int, live: bool,
                dev: torch.device) -> tuple[int, float]:
    """Hand the writer every step of one batch's stream (its samples are the writer's from `first` on), even when
    stopped by Ctrl-C or SIGTERM; the steps made and the first step's time (prompt and compilation)."""
    steps = []  # unless live, a GPU's tokens stay there until the end, so that it never waits for the host
    in_flight = None  # live on a GPU: the last step's tokens, copying to the host while the next step runs
    watch = None if live else pipe_watch(writer.out)
    n_steps, first_step, t0 = 0, 0.0, time.perf_counter()
    try:
        for tokens in stream:
            n_steps += 1
            if n_steps == 1:
                tokens.cpu()  # waits for the device, so the time is the first step's (prompt, compilation)
                first_step = time.perf_counter() - t0
            if watch is not None and watch.poll(0):
                raise BrokenPipeError("the reader of stdout has gone")
            if not live and dev.type != "cpu":
                steps.append(tokens)
            elif dev.type != "cuda":  # a CPU's at once: kept as tensors, they held freed memory back (70-160 KB a step)
                writer.add(tokens.tolist(), first)
            else:
                if in_flight is not None:  # written one step late: by now its copy has landed
                    writer.add(finish_copy(*in_flight), first)
                in_flight = start_copy(tokens)
    finally:  # what was made reaches the writer, whatever stopped the loop, and a Ctrl-C now waits until it has
        with signals_held():
            if in_flight is not None:
                writer.add(finish_copy(*in_flight), first)
            for tokens in steps:
                writer.add(tokens.tolist(), first)
    return n_steps, first_step


def start_copy(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue a copy of a step's tokens to the host behind the GPU's work, without waiting for it."""
    import torch

    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)  # pinned: the copy can be asynchronous
    host.copy_(tokens, non_blocking=True)  # queued on the tokens' GPU's stream: the event must be recorded there
    landed = torch.cuda.Event()
    landed.record(torch.cuda.current_stream(tokens.device))
    return host, landed


def finish_copy(host: torch.Tensor, landed: torch.cuda.Event) -> list[int]:
    landed.synchronize()  # waits for that copy only, not for the steps queued after it
    return host.tolist()


def report_speed(steps: list[int], sizes: list[int], elapsed: float, first_step: float, compile: bool) -> None:
    """One line: tokens, steps and speed, batch by batch's steps and sizes; the first step apart (the prompt, and
    the compilation when compile)."""
    n_tokens = sum(n * size for n, size in zip(steps, sizes))
    shape = f"{steps[0]} steps x {sizes[0]} samples" if len(sizes) == 1 else \
        f"{sum(sizes)} samples in {len(sizes)} batches"
    line = (f"generated {n_tokens} tokens ({shape}) in {elapsed:.2f} s, {n_tokens / elapsed:.1f} tokens/s; "
            f"first step {first_step:.2f} s ({'prompt and compilation' if compile else 'prompt'})")
    if n_tokens > sizes[0] and elapsed > first_step:
        line += f", then {(n_tokens - sizes[0]) / (elapsed - first_step):.1f} tokens/s"
    print(line, file=sys.stderr)


def report_speculation(stats: dict, rows: int) -> None:
    """One line: how the draft did, from generate_stream's counts (rows: the samples, over all batches)."""
    print(f"speculative decoding: {stats['accepted'] / stats['proposed']:.0%} of the draft's tokens accepted, "
          f"{stats['tokens'] / stats['rounds'] / rows:.2f} tokens a sample per round of one model step",
          file=sys.stderr)


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    run_main(main)
