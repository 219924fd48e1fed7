"""
Sample from a GPT-2 model, as nanoGPT's sample.py does:

    python sample.py [config/file.py ...] [--key=value ...]      (--help lists every setting)

Samples go to stdout, each followed by a line of dashes; status lines go to stderr. All samples are drawn together
in one batch. On a terminal the first unfinished sample is written as it is generated and the others follow as
they finish; piped, the same text is written once each sample is complete.
"""

from __future__ import annotations

import codecs
import sys
import time
from typing import TYPE_CHECKING, TextIO

from configurator import UsageError, configure, run_main
from tokenizer import EOT, EOT_ID, check_fits, load_tokenizer

if TYPE_CHECKING:
    import tiktoken
    import torch

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
dtype: str = 'auto'  # float32, bfloat16 or float16; auto: bfloat16 on CUDA where supported, else float16; float32 on CPU
compile: bool = False  # compile the decoding step with torch.compile: a slow first step, faster ones after
quantize: str | None = None  # int8 (per-row scales) or fp16 weights, CPU only (GPT.quantize_int8/_fp16); None: dtype's
stream: bool | None = None  # write the first sample as it is generated; None: only when stdout is a terminal
tiktoken_file: str | None = None  # GPT-2's gpt2.tiktoken rank file (else $GPT2_TIKTOKEN_FILE, the model's vocab.json)
# -----------------------------------------------------------------------------

SEPARATOR = "---------------"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def read_prompt(start: str) -> str:
    """The prompt text: start itself, or the contents of the UTF-8 file that 'FILE:path' names."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the prompt file '{path}': {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the prompt
    except UnicodeDecodeError as e:
        raise UsageError(f"the prompt file '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}): convert it to UTF-8") from None


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device={name} but CUDA is not available here: use --device=cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device={name} but MPS is not available here: use --device=cpu (or auto)")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return dev


def pick_dtype(name: str, dev: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if dev.type == "mps" else torch.float32
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype '{name}': use auto, {', '.join(DTYPE_NAMES)}")
    dt = getattr(torch, name)
    # Older GPUs only emulate bfloat16, slowly: refuse rather than run many times slower than float16.
    if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UsageError(f"{torch.cuda.get_device_name(dev)} does not support bfloat16: use --dtype=float16")
    try:  # what the model does, in miniature: the device either runs it or says why not
        x = torch.ones(2, 2, dtype=dt, device=dev)
        (x @ x).softmax(-1).sum().item()
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {dev} cannot run {name} ({str(e).splitlines()[0]}): "
                         f"use --dtype=float32") from None
    return dt


def token_bytes(enc: tiktoken.Encoding, token: int) -> bytes:
    # nanoGPT checkpoints pad the vocabulary past the tokenizer's; such a token has no text.
    return enc.decode_single_token_bytes(token) if token < enc.n_vocab else "\N{REPLACEMENT CHARACTER}".encode()


class SampleWriter:
    """Writes the samples to out in order, each one its text (prompt included) and a line of dashes.

    Tokens arrive a step at a time for every sample at once. live=True writes the first unfinished sample as
    its text grows, flushing each step; the others wait in memory until their turn. Either way the bytes are
    the same. Each sample's bytes go through its own incremental UTF-8 decoder, so a character split over two
    tokens is written only when whole.
    """

    def __init__(self, enc: tiktoken.Encoding, prompt: list[int], num_samples: int, stop_at_eot: bool,
                 live: bool, out: TextIO):
        self.enc, self.stop_at_eot, self.live, self.out = enc, stop_at_eot, live, out
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
        prompt_bytes = b"".join(token_bytes(enc, t) for t in prompt)
        self.unwritten = [[d.decode(prompt_bytes)] for d in self.decoders]  # text per sample, not yet written
        self.ended = [False] * num_samples
        self.current = 0  # the first sample not completely written

    def add(self, tokens: list[int]) -> None:
        """One step's tokens, one per sample."""
        for i, token in enumerate(tokens):
            if self.ended[i]:
                continue
            if self.stop_at_eot and token == EOT_ID:
                self._end(i)
            else:
                self.unwritten[i].append(self.decoders[i].decode(token_bytes(self.enc, token)))
        self._write()

    def finish(self) -> None:
        """Every sample is as long as it will get (generation ended or was interrupted): write them all."""
        for i, ended in enumerate(self.ended):
            if not ended:
                self._end(i)
        self._write()

    def _end(self, i: int) -> None:
        self.unwritten[i].append(self.decoders[i].decode(b"", final=True))
        self.ended[i] = True

    def _write(self) -> None:
        while self.current < len(self.ended):
            i = self.current
            if self.live or self.ended[i]:
                self.out.write("".join(self.unwritten[i]))
                self.unwritten[i].clear()
            if not self.ended[i]:
                break
            self.out.write(f"\n{SEPARATOR}\n")
            self.current += 1
        if self.live:
            self.out.flush()


def main() -> int:
    prompt = read_prompt(start)  # before the slow imports: a mistake here answers at once

    import torch
    from load import check_checkpoint, resolve_checkpoint
    from model import GPT, check_sampling_args

    try:  # model.generate_stream's own checks, run now so that no model loads in vain
        check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples)
    except ValueError as e:
        raise UsageError(e) from None
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    compiled = compile and dev.type != "cpu"
    if compile and not compiled:
        print("--compile=True: decoding stays eager on the CPU, where the compiled step measured 0.2-0.6x eager's "
              "speed (bench.py --compile shows both)", file=sys.stderr)
    checkpoint = resolve_checkpoint(init_from)
    check_checkpoint(checkpoint)  # a broken model folder is named as such, not as a tokenizer that cannot be found
    enc = load_tokenizer(checkpoint, tiktoken_file)
    if enc.eot_token is None and (stop_at_eot or not prompt):
        raise UsageError(f"{init_from} is a character-level model, without {EOT}: " + (
            "--stop_at_eot has nothing to stop at" if stop_at_eot else "give it a prompt to start from (--start)"))
    ids = enc.encode(prompt, allowed_special={EOT})
    if not ids:
        print(f"the prompt is empty: starting from {EOT}", file=sys.stderr)

    t0 = time.perf_counter()
    model = GPT.from_pretrained(str(checkpoint)).to(device=dev, dtype=dt)  # resolved once, above
    if quantize is not None:
        if quantize not in ("int8", "fp16") or dev.type != "cpu":
            raise UsageError(f"--quantize takes int8 or fp16 on the CPU only, got {quantize!r} on {dev}")
        getattr(model, f"quantize_{quantize}")()
    dt_name = str(dt).removeprefix("torch.")
    print(f"loaded {init_from} ({model.get_num_params(non_embedding=False):,} params) on {dev}/{dt_name} "
          f"in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    check_fits(enc, model.config.vocab_size)
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"warning: the prompt is {len(ids)} tokens, longer than the model's context of {block_size}: "
              f"keeping its last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]

    live = sys.stdout.isatty() if stream is None else stream
    writer = SampleWriter(enc, ids, num_samples, stop_at_eot, live, sys.stdout)  # an empty prompt prints as ""
    idx = torch.tensor([ids or [EOT_ID]], dtype=torch.long, device=dev)
    steps = []  # unless live, tokens stay on the device until the end, so a GPU never waits for the host
    in_flight = None  # live on a GPU: the last step's tokens, copying to the host while the next step runs
    n_steps, first_step, interrupted = 0, 0.0, False
    t0 = time.perf_counter()
    try:
        for tokens in model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p=top_p,
                                            num_samples=num_samples, stop_tokens=[EOT_ID] if stop_at_eot else None,
                                            seed=seed, compile=compiled):
            n_steps += 1
            if n_steps == 1:
                tokens.cpu()  # waits for the device, so the time is the first step's (prompt, compilation)
                first_step = time.perf_counter() - t0
            if not live:
                steps.append(tokens)
            elif dev.type != "cuda":
                writer.add(tokens.tolist())
            else:
                if in_flight is not None:  # written one step late: by now its copy has landed
                    writer.add(finish_copy(*in_flight))
                in_flight = start_copy(tokens)
    except KeyboardInterrupt:
        interrupted = True
    if in_flight is not None:
        writer.add(finish_copy(*in_flight))
    for tokens in torch.stack(steps).tolist() if steps else []:
        writer.add(tokens)
    elapsed = time.perf_counter() - t0
    writer.finish()
    sys.stdout.flush()
    if n_steps:
        report_speed(n_steps, elapsed, first_step, compiled)
    if interrupted:
        print("interrupted: each sample above ends where generation stopped", file=sys.stderr)
        return 130
    return 0


def start_copy(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue a copy of a step's tokens to the host behind the GPU's work, without waiting for it."""
    import torch

    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)  # pinned: the copy can be asynchronous
    host.copy_(tokens, non_blocking=True)
    landed = torch.cuda.Event()
    landed.record()
    return host, landed


def finish_copy(host: torch.Tensor, landed: torch.cuda.Event) -> list[int]:
    landed.synchronize()  # waits for that copy only, not for the steps queued after it
    return host.tolist()


def report_speed(n_steps: int, elapsed: float, first_step: float, compiled: bool) -> None:
    n_tokens = n_steps * num_samples
    line = (f"generated {n_tokens} tokens ({n_steps} steps x {num_samples} samples) in {elapsed:.2f} s, "
            f"{n_tokens / elapsed:.1f} tokens/s; first step {first_step:.2f} s "
            f"({'prompt and compilation' if compiled else 'prompt'})")
    if n_steps > 1:
        line += f", then {(n_tokens - num_samples) / (elapsed - first_step):.1f} tokens/s"
    print(line, file=sys.stderr)


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    run_main(main)
