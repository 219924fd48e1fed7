"""
Speed of this project's GPT-2 generation on this machine, side by side in one run with transformers and nanoGPT's
no-cache method, on the same weights, prompts and lengths:

    python bench.py [--key=value ...]            (--help lists every setting)
    python bench.py --quick                      (a smoke test: tiny model, seconds)
    python bench.py --fidelity                   (int8, fp16 and bfloat16 against float32 on the trained model)
    python bench.py --peers                      (CTranslate2 and llama.cpp too, where installed: peers.py)
    python bench.py --busy_core                  (chosen and fixed thread counts, one core kept busy)
    python bench.py --gpu_check                  (every GPU check at once, under 8 minutes: the gpu tests, cuda rows)

Systems: (a) ours, model.generate_stream with the KV cache; (b) transformers' GPT2LMHeadModel.generate, greedy,
KV cache on; (c) ours without the cache (use_kv_cache=False, nanoGPT's method); (d) sample.py's default workload;
(s) ours float32 with speculative decoding (generate's draft=), an int8 and an fp16 draft; (f) with --busy_core,
while another process spins on one core: (a) at sample.py's default CPU weights, and sample.py's default workload
on the trained model, each at the thread count generation chooses step by step and at each fixed count it chooses
from; (p) with --peers, CTranslate2 and llama.cpp on the same weights (peers.py), and (m) the peak memory of an
int8 run against llama.cpp q8_0's, each in a fresh process.
--prompts_file_bench runs only (e): prompts files through batch.py's continuous batching at GPT-2 124M's shape, 96
prompts of lengths and max_new_tokens spread wide against 96 of the same totals evenly (40 tokens, 48 new), and
the spread file by bucketing (the job before) and by model.generate looped; then sample.py --prompts as 2
processes x 1 thread (torchrun) against 1 process x 2 threads (and 1 x 1), pinned to the same two cores.
Each measurement is the median of `repeats` runs after one warm-up run. Time to first token is the time until
the first step is yielded (prefill plus the first sampling); decode tokens/s counts the remaining steps. The
roofline is the weight bytes a decode step reads over the read bandwidth measured in this run: the most decode
steps per second the memory allows.

Exit status: 0 done, the float32 greedy tokens of (a), (b) and (c) identical; 3 done, but those tokens differ (a
correctness failure, not a crash); 2 a wrong setting (a one-line message, sizes past the memory included); 1 a
crash (with its traceback), memory that ran out (a message), or with --gpu_check a part that failed or ran out of
its time; 130 Ctrl-C, 143 SIGTERM.
"""

if __name__ == "__main__":  # first, before the imports below: Ctrl-C or SIGTERM while they load ends quietly
    from startup import quiet_startup

    quiet_startup()

import contextlib
import copy
import json as jsonlib
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn as nn

from cli import run_main
from configurator import configure, read_settings
from errors import UsageError
from generate import DRAFT_TOKENS_LIMIT
from linear import decode_bytes
from load import CONV1D_WEIGHTS, config_from_hf
from model import GPT, GPTConfig
from peers import llama_instructions, missing, open_peers
from runtime import MEMORY_SHARE, available_memory, bytes_per_sample, native_bf16, pick_device, prompt_ids

# -----------------------------------------------------------------------------
init_from: str | None = None  # a checkpoint (hub name, folder, nanoGPT ckpt.pt); None: random weights shaped below
n_layer: int = 12  # random weights' shape (default GPT-2 124M)
n_head: int = 12  # random weights' heads
n_embd: int = 768  # random weights' width
vocab_size: int = 50257  # random weights' vocabulary
block_size: int = 1024  # random weights' context
prompt_len: int = 32  # prompt tokens per row (random ids, the same for every system; each row its own prompt)
new_tokens: int = 64  # greedy tokens generated per row
batch_sizes: str = '1,10'  # comma-separated batch sizes
dtype: str = 'float32,bfloat16'  # weight dtypes for (a) and (b), comma-separated; float32 always runs (the baseline)
quantize: str | None = 'int8,fp16'  # also run (a) with int8 and/or fp16 weights (GPT.quantize_int8/_fp16); None skips
draft: str | None = 'int8,fp16'  # (s): float32 decoded speculatively with these drafts (int8, fp16; CPU); None skips
draft_tokens: int | None = None  # (s): tokens a draft proposes a round; None: chosen each round (generate.py)
slow_batches: str = '1'  # batch sizes for (b) in dtypes other than float32 (bfloat16 at batch 10 takes minutes)
repeats: int = 3  # timed runs per measurement (the median is reported), after one warm-up run
max_seconds: float = 30.0  # fewer repeats (at least one) for a system whose runs take longer than this in all
reference: bool = True  # run (c), the no-cache path, at batch 1 (once: it is slow)
workload: bool = True  # run (d): sample.py's default shape, (a) against (c) sample after sample
workload_samples: int = 10  # (d)'s samples
workload_tokens: int = 500  # (d)'s new tokens per sample
fidelity: bool = False  # measure int8, fp16 and bfloat16 against float32 on the trained model over assets/heldout.txt
fidelity_model: str = '../shared/tiny-gpt2-en'  # the trained model for --fidelity and --prompts_file_bench
prompts_file_bench: bool = False  # only (e): prompts files, continuous batching against bucketing, generate looped
bandwidth_mb: int = 2048  # size of the buffer read to measure memory bandwidth (far larger than the caches)
threads: int | None = None  # torch's thread count; None keeps its default (one per core)
device: str = 'cpu'  # cpu or cuda (int8 and fp16 run on the CPU only)
peers: bool = False  # (p): CTranslate2 and llama.cpp on the same weights, where installed (peers.py; CPU)
busy_core: bool = False  # (f): with one core kept busy, ours at the chosen thread count and at each fixed one (CPU)
busy_samples: int = 10  # (f)'s sample.py workload on the trained model: samples (sample.py's default)
busy_tokens: int = 300  # (f)'s sample.py workload: new tokens per sample
compile: bool = False  # also run (a) compiled (compile=True: static KV cache, CUDA graphs on a GPU)
gpu_check: bool = False  # only every GPU check, under 8 minutes: the tests marked gpu, then this table's cuda rows
quick: bool = False  # smoke test: a tiny model, few tokens, one repeat, short workload (explicit settings still win)
json: bool = False  # print the results as JSON instead of tables
seed: int = 1337  # seed of the random weights and prompts
# -----------------------------------------------------------------------------

MISMATCH = 3  # exit status when the greedy tokens differ
QUICK = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=128, prompt_len=8, new_tokens=8,
             repeats=1, workload_samples=2, workload_tokens=16, bandwidth_mb=256, slow_batches='1,10', busy_samples=2,
             busy_tokens=16)
QUICK_DEFAULTS = {name: globals()[name] for name in QUICK}  # read at import, before configure sets any
ROOT = Path(__file__).resolve().parent


@dataclass
class Result:
    system: str  # e.g. "ours float32"
    batch: int
    prefill_tok_s: float  # prompt tokens (all rows) over the time to first token
    decode_tok_s: float  # new tokens (all rows) after the first step, over their time
    ttft_ms: float
    memory_growth_mb: float  # peak memory growth during the warm-up run: resident (CPU) or allocated (GPU)
    weight_mb: float  # bytes a decode step reads from weights
    roofline: Optional[float] = None  # decode steps/s reached over the most the bandwidth allows
    runs: int = 0
    accepted: Optional[float] = None  # (s): the share of the draft's tokens the model accepted (last run)
    tokens_per_round: Optional[float] = None  # (s): tokens a row made per round of one model step (last run)
    tokens: list = field(default_factory=list, repr=False)  # greedy tokens of the last run, (batch, new_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Machine


# What caps the instruction set below the CPU's (an AVX2-only machine's kernels, on an AVX-512 one): torch's own,
# oneDNN's, fbgemm's, MKL's and CTranslate2's. llama.cpp's is chosen when it is built.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS",
            "CT2_FORCE_CPU_ISA")


def cpu_description(device: str) -> dict:
    """CPU model and the instruction-set flags that decide which kernels are fast."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    if device.startswith("cuda"):
        model = f"{torch.cuda.get_device_name(device)} (host: {model})"
    return dict(model=model, cores=os.cpu_count(), threads=torch.get_num_threads(),
                flags=[f for f in wanted if f in flags], kernels=torch.backends.cpu.get_cpu_capability(),
                isa_caps={k: v for k, v in os.environ.items() if k in ISA_CAPS},
                bf16_instructions=bool({"avx512_bf16", "amx_bf16"} & flags),
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)


def sync(device: str | torch.device) -> None:
    """Wait for the device, so that a clock read after it counts the work queued before it (on that GPU: another
    one's synchronize would not wait for it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(nbytes: int, device: str, repeats: int = 7) -> list[float]:
    """Bytes/s of a streaming read (a sum) of a buffer far larger than the caches, on all of torch's threads
    (or the GPU's memory)."""
    buffer = torch.ones(nbytes // 4, device=device)
    buffer.sum()  # fault the pages in before timing
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        buffer.sum()
        sync(device)
        rates.append(buffer.nbytes / (time.perf_counter() - start))
    return rates


class PeakRSS:
    """Growth of this process's resident memory over a block, sampled every 2 ms from /proc/self/statm (Linux;
    elsewhere it reports nan). Only the warm-up run is sampled, so the sampling thread never slows a timed run."""

    def __enter__(self) -> "PeakRSS":
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self.page
        except OSError:
            return math.nan

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6


class PeakGPU:
    """Growth of the GPU memory torch has allocated over a block, at its peak (torch.cuda.max_memory_allocated):
    the KV cache, activations and, compiled, the CUDA graphs' pool. The host's memory says nothing of it."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    def __enter__(self) -> "PeakGPU":
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6


def peak_memory(device: str | torch.device) -> PeakRSS | PeakGPU:
    """What measures a run's memory on device: the GPU's own allocations, or this process's resident memory."""
    return PeakGPU(device) if torch.device(device).type == "cuda" else PeakRSS()


# The peak of this process's own memory since it started (Linux, kB). Not getrusage's ru_maxrss: a child keeps the
# larger of its own peak and the parent's size when it was forked, so under bench.py's gigabytes every run reads alike.
PEAK_RSS = ("print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))"
            " * 1024)")
OURS_INT8_RUN = """
import sys, torch
from model import GPT
model = GPT.from_pretrained(sys.argv[1], quantize="int8")
model.generate(torch.tensor(eval(sys.argv[2])), int(sys.argv[3]), temperature=0)
"""
LLAMA_Q8_RUN = """
import sys
from peers import LlamaEngine
LlamaEngine(sys.argv[1], int(sys.argv[4])).greedy(eval(sys.argv[2]), int(sys.argv[3]))
"""


def peak_rss(code: str, *args: str, threads: int) -> int:
    """Peak resident bytes of a fresh Python process running code (in this project's folder, with args)."""
    done = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK_RSS}", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"a memory measurement failed: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def memory_figures(model: GPT, idx: torch.Tensor, steps: int, threads: int, llama: bool) -> dict:
    """(m): the peak resident memory of a whole int8 run in a fresh process (load a Hugging Face folder of these
    weights, quantizing each tensor as it is read, then greedy generation of idx), less that of a process that
    only imports torch; and, where installed, llama.cpp's q8_0 run of the same weights and prompts less a process
    that only imports llama_cpp. Both peaks are Linux's VmHWM, the whole life of the process."""
    import tempfile

    from save import write_gguf, write_hf

    config_args = dict(vars(model.config))
    state_dict = model.state_dict()
    prompts, figures = repr(idx.tolist()), {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        write_hf(Path(tmp), config_args, state_dict, None)
        print("bench.py: (m) peak memory of an int8 run", file=sys.stderr, flush=True)
        figures["ours_int8_mb"] = (peak_rss(OURS_INT8_RUN, tmp, prompts, str(steps), threads=threads)
                                   - peak_rss("import torch", threads=threads)) / 1e6
        if llama:
            gguf = Path(tmp) / "q8_0.gguf"
            write_gguf(gguf, config_args, state_dict, "q8_0")
            figures["llama_q8_0_mb"] = (peak_rss(LLAMA_Q8_RUN, str(gguf), prompts, str(steps), str(threads),
                                                 threads=threads)
                                        - peak_rss("import llama_cpp", threads=threads)) / 1e6
    return figures


# ----------------------------------------------------------------------------------------------------------------
# Models: ours, and transformers' built from the same tensors


def transformers_model(model: GPT):
    """transformers' GPT2LMHeadModel holding our model's tensors (Conv1D weights are stored transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, activation_function="gelu_new")).eval()
    state = {name: (t.t() if name.endswith(CONV1D_WEIGHTS) else t) for name, t in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers' GPT-2 does not fit our tensors: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    # A plain greedy run of exactly max_new_tokens: no stop token, no padding logic.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    return hf


# ----------------------------------------------------------------------------------------------------------------
# Timing: one generation, as a list of step timestamps


def run_ours(model: GPT, idx: torch.Tensor, steps: int, use_kv_cache: bool = True, compiled: bool = False,
             **speculation) -> tuple[list[float], torch.Tensor]:
    """Greedy generation through the project's generate_stream; the start time and each step's time. On a GPU only
    the first and the last step wait for the device (as a user's loop would not wait at all), so the times
    between are when steps were queued, and only the first and last are exact. speculation: generate_stream's
    draft, draft_tokens and stats (a round's tokens then come at once: only the last step's time counts)."""
    times, tokens = [time.perf_counter()], []
    for token in model.generate_stream(idx, steps, temperature=0, use_kv_cache=use_kv_cache, compile=compiled,
                                       **speculation):
        if not tokens or len(tokens) == steps - 1:
            sync(idx.device)
        times.append(time.perf_counter())
        tokens.append(token)
    return times, torch.stack(tokens, dim=1)


def run_transformers(hf, idx: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
    """transformers' greedy generate with its KV cache; a streamer stamps each step as it is produced."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # called with the prompt first (before any work), then once per step
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    start = time.perf_counter()
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False, use_cache=True, streamer=clock)
    sync(idx.device)
    return [start] + clock.times[1:-1] + [time.perf_counter()], out[:, idx.size(1):]


@dataclass(frozen=True)
class Timing:
    """How every system is timed: new_tokens greedy steps a run, the median of `repeats` runs after a warm-up run,
    fewer (at least one) once they have taken max_seconds."""
    new_tokens: int
    repeats: int
    max_seconds: float


def measure(system: str, run: Callable[[], tuple[list[float], torch.Tensor]], idx: torch.Tensor, timing: Timing,
            weight_bytes: int) -> Result:
    """Warm-up (memory sampled), then the timed runs of `run` on the prompts idx; medians."""
    batch, prompt = idx.shape
    print(f"bench.py: {system}, batch {batch}", file=sys.stderr, flush=True)  # progress: a full run takes minutes
    with torch.no_grad(), peak_memory(idx.device) as memory:
        run()
    ttfts, rates = [], []
    tokens = None
    start = time.perf_counter()
    for _ in range(timing.repeats):
        if ttfts and time.perf_counter() - start > timing.max_seconds:
            break
        with torch.no_grad():
            times, tokens = run()
        ttfts.append(times[1] - times[0])
        if len(times) > 2:
            rates.append((len(times) - 2) * batch / (times[-1] - times[1]))
    ttft = statistics.median(ttfts)
    return Result(system, batch, prefill_tok_s=batch * prompt / ttft,
                  decode_tok_s=statistics.median(rates) if rates else math.nan, ttft_ms=ttft * 1e3,
                  memory_growth_mb=memory.growth_mb, weight_mb=weight_bytes / 1e6, runs=len(ttfts),
                  tokens=tokens.tolist())


def measure_ours(model: GPT, variant: str, idx: torch.Tensor, timing: Timing, compiled: bool = False) -> Result:
    """(a): ours with the KV cache, weights of `variant` (a dtype, int8 or fp16), compiled or eager."""
    return measure(f"(a) ours {variant}{' compiled' if compiled else ''}",
                   lambda: run_ours(model, idx, timing.new_tokens, compiled=compiled), idx, timing, decode_bytes(model))


def measure_speculative(model: GPT, draft: str, idx: torch.Tensor, timing: Timing,
                        draft_tokens: Optional[int]) -> Result:
    """(s): ours float32 (model) decoded speculatively with the draft `draft` (int8, fp16), with the share of its
    tokens accepted and the tokens per round of the last run. weights MB/step stays the float32 model's, so the
    roofline column can pass 100%: one read of the weights serves several tokens."""
    stats = {}
    options = dict(draft=draft, stats=stats) | ({} if draft_tokens is None else dict(draft_tokens=draft_tokens))

    def run() -> tuple[list[float], torch.Tensor]:
        stats.clear()
        return run_ours(model, idx, timing.new_tokens, **options)

    result = measure(f"(s) ours float32, {draft} draft", run, idx, timing, decode_bytes(model))
    if stats.get("rounds"):
        result.accepted = stats["accepted"] / stats["proposed"]
        result.tokens_per_round = stats["tokens"] / stats["rounds"] / idx.size(0)
    return result


def measure_transformers(hf, dtype: str, idx: torch.Tensor, timing: Timing, weight_bytes: int) -> Result:
    """(b): transformers' generate with its KV cache, in dtype; weight_bytes: ours in that dtype."""
    return measure(f"(b) transformers {dtype}", lambda: run_transformers(hf, idx, timing.new_tokens), idx, timing,
                   weight_bytes)


def measure_no_cache(model: GPT, idx: torch.Tensor, timing: Timing) -> Result:
    """(c): ours without the cache, nanoGPT's method, timed once (it is slow)."""
    return measure("(c) ours no cache float32", lambda: run_ours(model, idx, timing.new_tokens, False), idx,
                   replace(timing, repeats=1), decode_bytes(model))


def measure_peer(peer, idx: torch.Tensor, timing: Timing) -> Result:
    """(p): a peer engine (peers.py) on the same weights and prompts."""
    return measure(f"(p) {peer.name}", lambda: peer.generate(idx, timing.new_tokens), idx, timing, peer.weight_bytes)


class BusyCore:
    """Another process spinning on one core (the last this process may use) while the block runs: the load that
    makes a multi-threaded operation wait for its descheduled thread."""

    def __enter__(self) -> "BusyCore":
        self.spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.spinner.pid, {max(os.sched_getaffinity(0))})
        return self

    def __exit__(self, *exc) -> None:
        self.spinner.kill()
        self.spinner.wait()


@contextlib.contextmanager
def thread_count(count: Optional[int]):
    """Generation at count threads for every step (None: torch's default count with generation's own choice,
    generate.ThreadChooser, step by step)."""
    import generate

    default, chooser = torch.get_num_threads(), generate.ThreadChooser
    if count is not None:
        torch.set_num_threads(count)
        # A choice between the same count twice.
        generate.ThreadChooser = lambda *args, **options: chooser((count, count))
    try:
        yield
    finally:
        torch.set_num_threads(default)
        generate.ThreadChooser = chooser


def under_load_settings() -> list[tuple[str, Optional[int]]]:
    """(f)'s thread settings with one core busy: generation's own choice, then each fixed count it chooses from."""
    default = torch.get_num_threads()
    return [("chosen", None), ("1 thread", 1)] + ([(f"{default} threads", default)] if default > 1 else [])


def measure_under_load(model: GPT, variant: str, idx: torch.Tensor, timing: Timing) -> dict[str, Result]:
    """(f): ours (weights of `variant`) on idx with one core busy, at each of under_load_settings()."""
    results = {}
    for setting, count in under_load_settings():
        with thread_count(count), BusyCore():
            results[setting] = measure(f"(f) busy core, {variant}, {setting}",
                                       lambda: run_ours(model, idx, timing.new_tokens), idx, timing,
                                       decode_bytes(model))
    return results


def workload_under_load(folder: Path, samples: int, tokens: int, repeats: int) -> dict:
    """(f) on sample.py's default workload: the trained model at its default weights on a CPU, `samples` samples x
    `tokens` tokens from one token, temperature 0.8, top-k 200, one core busy, at each of under_load_settings();
    tokens/s of the whole call (the median of `repeats`, after a warm-up)."""
    from runtime import CPU_WEIGHTS

    model = GPT.from_pretrained(str(folder), quantize=CPU_WEIGHTS)
    newline = torch.tensor([[198]])
    figures = dict(model=str(folder), weights=CPU_WEIGHTS, samples=samples, new_tokens=tokens, tok_s={})
    for setting, count in under_load_settings():
        print(f"bench.py: (f) sample.py's workload, busy core, {setting}", file=sys.stderr, flush=True)
        times = []
        with thread_count(count), BusyCore():
            for _ in range(repeats + 1):
                start = time.perf_counter()
                model.generate(newline, tokens, temperature=0.8, top_k=200, num_samples=samples, seed=1337)
                times.append(time.perf_counter() - start)
        figures["tok_s"][setting] = samples * tokens / statistics.median(times[1:])
    return figures


@dataclass
class Rows:
    """One batch size's results, each kept under what it measured: the checks and ratios are read from here."""
    batch: int
    ours: dict[str, Result] = field(default_factory=dict)  # (a) by variant: float32, bfloat16, ..., int8, fp16
    speculative: dict[str, Result] = field(default_factory=dict)  # (s) by draft: int8, fp16
    compiled: dict[str, Result] = field(default_factory=dict)  # (a) compiled, by variant
    transformers: dict[str, Result] = field(default_factory=dict)  # (b) by dtype
    under_load: dict[str, Result] = field(default_factory=dict)  # (f) by thread setting, one core busy
    peers: dict[str, Result] = field(default_factory=dict)  # (p) by engine name
    no_cache: Optional[Result] = None  # (c)

    def results(self) -> list[Result]:
        """Every row, in the order they were measured."""
        rows = []
        for variant, result in self.ours.items():
            rows += [result] + [r[variant] for r in (self.compiled, self.transformers) if variant in r]
        rows += list(self.speculative.values()) + list(self.under_load.values()) + list(self.peers.values())
        return rows + ([self.no_cache] if self.no_cache else [])


def measure_batch(idx: torch.Tensor, ours: dict[str, nn.Module], theirs: dict[str, nn.Module], slow: list[int],
                  compile: bool, busy_core: bool, engines: list, reference: bool, timing: Timing,
                  drafts: list[str], draft_tokens: Optional[int]) -> Rows:
    """Every system on the prompts idx, one measurement a row: (a) each of our variants (and compiled, unless
    quantized), (b) transformers' in each dtype (other than float32 only at the slow batch sizes), (s) float32
    with each draft, (f) under load, (p) each peer, and (c) at batch 1."""
    rows = Rows(idx.size(0))
    for variant, model in ours.items():
        rows.ours[variant] = measure_ours(model, variant, idx, timing)
        if compile and variant in theirs:
            rows.compiled[variant] = measure_ours(model, variant, idx, timing, compiled=True)
        if variant in theirs and (variant == "float32" or rows.batch in slow):
            rows.transformers[variant] = measure_transformers(theirs[variant], variant, idx, timing,
                                                              decode_bytes(model))
    for draft in drafts:
        rows.speculative[draft] = measure_speculative(ours["float32"], draft, idx, timing, draft_tokens)
    if busy_core:
        from runtime import CPU_WEIGHTS

        variant = CPU_WEIGHTS if CPU_WEIGHTS in ours else "float32"  # sample.py's default where measured
        rows.under_load = measure_under_load(ours[variant], variant, idx, timing)
    for peer in engines:
        rows.peers[peer.name] = measure_peer(peer, idx, timing)
    if reference and rows.batch == 1:
        rows.no_cache = measure_no_cache(ours["float32"], idx, timing)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (d): sample.py's default workload


def workload_times(model: GPT, samples: int, steps: int, repeats: int, device: str) -> dict:
    """sample.py's default call (one '\\n' token, temperature 0.8, top-k 200, all samples in one batch, KV cache)
    timed whole; and nanoGPT's way (no cache, sample after sample) estimated from its step times.

    Running (c) in full takes many minutes at 124M, so each of its steps is timed instead at five context lengths
    (a no-cache step at context n is one forward pass over n tokens: generate_stream of a length-n prompt for one
    token), and the per-step time is interpolated linearly between them and summed over the `steps` steps of
    one sample, times `samples`.
    """
    newline = torch.tensor([[198 % model.config.vocab_size]], device=device)
    options = dict(temperature=0.8, top_k=200)
    ours = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(newline, steps, num_samples=samples, seed=1337, **options)
        sync(device)
        ours.append(time.perf_counter() - start)
    span = min(steps, model.config.block_size)
    contexts = sorted({max(1, round(span * f)) for f in (0, 0.25, 0.5, 0.75, 1.0)})
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(device) for n in contexts]
    step_s = [math.inf] * len(contexts)
    for _ in range(3):  # rounds over every context, the fastest of each kept: a burst of load skews no one context
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            for _ in model.generate_stream(prompt, 1, use_kv_cache=False, seed=0, **options):
                pass
            sync(device)
            step_s[i] = min(step_s[i], time.perf_counter() - start)
    per_sample = 0.0
    for n in range(1, steps + 1):  # the context of step n holds n tokens (the prompt's one, then n - 1 new)
        c = min(n, span)
        i = max(j for j in range(len(contexts)) if contexts[j] <= c or j == 0)
        if i + 1 < len(contexts):
            w = (c - contexts[i]) / (contexts[i + 1] - contexts[i])
            per_sample += step_s[i] * (1 - w) + step_s[i + 1] * w
        else:
            per_sample += step_s[i]
    ours_s = statistics.median(ours)
    reference_s = per_sample * samples
    return dict(samples=samples, new_tokens=steps, ours_s=ours_s, ours_tok_s=samples * steps / ours_s,
                reference_s_estimated=reference_s, reference_tok_s=samples * steps / reference_s,
                reference_contexts=contexts, reference_step_ms=[s * 1e3 for s in step_s],
                speedup=reference_s / ours_s)


# ----------------------------------------------------------------------------------------------------------------
# Fidelity of int8 and bfloat16 on the trained model


def fidelity_figures(folder: Path) -> dict:
    """Mean KL(float32 || variant) of the next-token distribution and top-1 agreement, per position of the
    held-out text (windows of the model's context, each position predicted from the text before it)."""
    from tokenizer import load_tokenizer

    text = (ROOT / "assets" / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.tensor(load_tokenizer(folder).encode_ordinary(text))
    base = GPT.from_pretrained(str(folder))
    window = base.config.block_size
    chunks = [ids[i:i + window][None] for i in range(0, len(ids) - 1, window)]
    variants = {"int8": copy.deepcopy(base).quantize_int8(), "fp16": copy.deepcopy(base).quantize_fp16(),
                "bfloat16": copy.deepcopy(base).to(torch.bfloat16)}
    figures = {"text_tokens": len(ids), "model": str(folder)}
    with torch.no_grad():
        reference = [base(chunk, all_logits=True)[0][0].float().log_softmax(-1) for chunk in chunks]
        for name, model in variants.items():
            kl, agree, n = 0.0, 0, 0
            for chunk, ref in zip(chunks, reference):
                out = model(chunk, all_logits=True)[0][0].float().log_softmax(-1)
                kl += float((ref.exp() * (ref - out)).sum())
                agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
                n += ref.size(0)
            figures[name] = dict(mean_kl=kl / n, top1_agreement=agree / n, positions=n)
    return figures


FIDELITY_BOUNDS = dict(mean_kl=1e-5, top1_agreement=0.999)  # what a CPU's default precision must keep


def default_precision_line(fidelity: dict, one: Optional["Rows"]) -> str:
    """Which precision this run says should be the CPU default: of those within FIDELITY_BOUNDS of float32 on the
    trained model (float32 itself always), the fastest at batch 1, where two within 3% of each other (a tie, on a
    machine whose speed moves that much from run to run) count as one and the fewer weight bytes wins; and whether
    runtime.CPU_WEIGHTS is it."""
    from runtime import CPU_WEIGHTS

    within = ["float32"] + [v for v in ("fp16", "int8", "bfloat16") if fidelity[v]["mean_kl"] <= FIDELITY_BOUNDS[
        "mean_kl"] and fidelity[v]["top1_agreement"] >= FIDELITY_BOUNDS["top1_agreement"]]
    timed = [v for v in within if one is not None and v in one.ours]
    if not timed:
        return f"default precision: within the fidelity bounds {', '.join(within)} (batch 1 not timed in this run)"
    best = max(one.ours[v].decode_tok_s for v in timed)
    fastest = min((v for v in timed if one.ours[v].decode_tok_s >= 0.97 * best), key=lambda v: one.ours[v].weight_mb)
    speeds = ", ".join(f"{v} {one.ours[v].decode_tok_s:.1f} tok/s" for v in timed)
    return (f"default precision on a CPU: within mean KL {FIDELITY_BOUNDS['mean_kl']:g} nats and top-1 "
            f"{100 * FIDELITY_BOUNDS['top1_agreement']:g}% of float32: {', '.join(within)}; fastest at batch 1 "
            f"(within 3%: the fewer bytes): "
            f"{fastest} ({speeds}); sample.py's default: {CPU_WEIGHTS} weights "
            f"({'agrees' if fastest == CPU_WEIGHTS else 'DISAGREES with this run'})")


# ----------------------------------------------------------------------------------------------------------------
# (e): a prompts file, batched, against generate looped prompt by prompt; processes against threads

SPREAD = dict(prompts=96, lengths=(2, 78), new_tokens=(8, 88))  # and its even counterpart: 40 and 48 each
FILE_SETTINGS = dict(temperature=0.8, top_k=200, top_p=None, num_samples=1, stop_at_eot=False)


def spread_file(enc, seed: int, even: bool = False) -> list:
    """The prompts of (e): SPREAD's 96 prompts, lengths evenly spread over 2..78 tokens and max_new_tokens over
    8..88, each order shuffled on its own; even=True, the same totals as 40 and 48 each. The texts are slices of
    assets/heldout.txt holding exactly their number of tokens. A list of batch.Prompt."""
    import random

    import batch

    n, (low, high), (new_low, new_high) = SPREAD["prompts"], SPREAD["lengths"], SPREAD["new_tokens"]
    rng = random.Random(seed)
    lengths = [round(low + (high - low) * i / (n - 1)) for i in range(n)]
    news = [round(new_low + (new_high - new_low) * i / (n - 1)) for i in range(n)]
    rng.shuffle(lengths)
    rng.shuffle(news)
    if even:
        lengths, news = [sum(lengths) // n] * n, [sum(news) // n] * n
    text = enc.encode_ordinary((ROOT / "assets" / "heldout.txt").read_text(encoding="utf-8"))
    prompts = []
    for i, (length, new) in enumerate(zip(lengths, news), 1):
        while True:  # a slice whose text encodes to the same number of tokens (merges across its ends can differ)
            start = rng.randrange(len(text) - length)
            piece = enc.decode(text[start:start + length])
            if len(enc.encode_ordinary(piece)) == length:
                break
        prompts.append(batch.Prompt(i, i, piece, dict(FILE_SETTINGS, max_new_tokens=new, seed=seed)))
    return prompts


def bucketed(model: GPT, samples: list) -> None:
    """How prompts files ran before continuous batching: samples of the same prompt length and settings in
    batches of up to 32, each batch running until its every row is done."""
    buckets = {}
    for s in samples:
        buckets.setdefault((len(s.ids), s.steps), []).append(s)
    for bucket in buckets.values():
        for i in range(0, len(bucket), 32):
            rows = bucket[i:i + 32]
            generators = [torch.Generator().manual_seed(s.seed) for s in rows]
            list(model.generate_stream(torch.tensor([s.ids for s in rows]), rows[0].steps,
                                       FILE_SETTINGS["temperature"], FILE_SETTINGS["top_k"], generators=generators))


def prompts_file_figures(folder: Path, seed: int, repeats: int, device: str) -> dict:
    """New tokens per second of batch.py's prompts-file job (continuous batching, batch size 32) on SPREAD's
    file and on its even counterpart, GPT-2 124M's shape with random weights (GPT-2's tokenizer, from the trained
    model's folder); on the spread file also bucketing (the job before continuous batching) and model.generate
    called prompt by prompt; then sample.py --prompts on the spread file with the trained model, as processes.
    The job's runs are the median of repeats, interleaved; the slower two run once. Each run's CPU time (this
    process's) is kept beside its wall time: with one thread, the work done, whatever else shares the machine.
    device: only named in the figures (the machine's description), as the rest runs on the CPU."""
    import tempfile

    import batch
    from tokenizer import load_tokenizer

    enc = load_tokenizer(folder)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=50257)).eval()
    scratch = Path(tempfile.mkdtemp())
    files = {name: spread_file(enc, seed, even=name == "even") for name in ("even", "spread")}
    new_tokens = {name: sum(p.settings["max_new_tokens"] for p in prompts) for name, prompts in files.items()}
    figures = {"model": "GPT-2 124M shape, random weights", "batch_size": 32, "threads": torch.get_num_threads(),
               "machine": cpu_description(device), "prompts": SPREAD["prompts"], "new_tokens": new_tokens,
               "prompt_tokens": {name: sum(len(enc.encode_ordinary(p.text)) for p in prompts)
                                 for name, prompts in files.items()}}
    def timed(run: Callable[[], object]) -> tuple[float, float]:
        began, cpu = time.perf_counter(), time.process_time()
        run()
        return time.perf_counter() - began, time.process_time() - cpu

    times = {"even": [], "spread": []}
    for run in range(repeats):
        for name, prompts in files.items():
            print(f"bench.py: (e) {name} file, continuous batching, run {run + 1} of {repeats}", file=sys.stderr,
                  flush=True)
            job = batch.SampleJob(prompts, name, str(scratch / f"{name}-{run}.jsonl"), 32, 2048)
            times[name].append(timed(lambda: batch.sample_prompts(job, model, enc, batch.Ranks())))
    samples = batch.make_samples(batch.SampleJob(files["spread"], "spread", "", 32, 2048), enc, model)
    print("bench.py: (e) spread file, bucketing", file=sys.stderr, flush=True)
    times["bucketing"] = [timed(lambda: bucketed(model, samples))]
    print("bench.py: (e) spread file, generate looped", file=sys.stderr, flush=True)
    times["looped"] = [timed(lambda: [model.generate(torch.tensor([s.ids]), s.steps, FILE_SETTINGS["temperature"],
                                                     FILE_SETTINGS["top_k"], seed=s.seed) for s in samples])]
    for name, runs in times.items():
        tokens = new_tokens["even" if name == "even" else "spread"]
        figures[name] = dict(runs_s=[wall for wall, _ in runs], cpu_s=[cpu for _, cpu in runs],
                             tok_s=tokens / statistics.median(wall for wall, _ in runs),
                             cpu_tok_s=tokens / statistics.median(cpu for _, cpu in runs))
    (scratch / "spread-prompts.jsonl").write_text(
        "".join(jsonlib.dumps(dict(id=p.id, prompt=p.text, max_new_tokens=p.settings["max_new_tokens"])) + "\n"
                for p in files["spread"]), encoding="utf-8")
    figures["processes"] = process_figures(folder, scratch / "spread-prompts.jsonl", seed)
    return figures


def process_figures(folder: Path, prompts: Path, seed: int) -> dict:
    """sample.py --prompts as 1 process x 1 thread, 1 x 2 and 2 x 1 (torchrun), each pinned to the same two
    cores: the generation's own time and rate, from its summary line, and the wall time with start-up."""
    import re
    cores = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else None
    common = [f"--init_from={folder}", f"--prompts={prompts}", "--num_samples=1", "--device=cpu", f"--seed={seed}"]
    runs = {"1 process x 1 thread": ([sys.executable, "sample.py"], "1"),
            "1 process x 2 threads": ([sys.executable, "sample.py"], "2"),
            "2 processes x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", "sample.py"], "1")}
    figures = {}
    for name, (command, omp) in runs.items():
        print(f"bench.py: (e) sample.py --prompts, {name}", file=sys.stderr, flush=True)
        out = prompts.with_name(f"out-{len(figures)}.jsonl")
        began = time.perf_counter()
        done = subprocess.run([*command, *common, f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": omp},
                              preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        wall = time.perf_counter() - began
        summary = re.search(r"in ([\d.]+) s(?: on \d+ processes)?: ([\d.]+) prompts/s, ([\d.]+) tokens/s", done.stderr)
        if done.returncode != 0 or summary is None:
            raise RuntimeError(f"sample.py --prompts ({name}) failed: {done.stderr[-2000:]}")
        figures[name] = dict(generation_s=float(summary[1]), prompts_s=float(summary[2]),
                             tokens_s=float(summary[3]), wall_s=wall, output=out.read_bytes())
    outputs = {f.pop("output") for f in figures.values()}
    figures["identical_outputs"] = len(outputs) == 1
    return figures


def prompts_file_table(f: dict) -> str:
    m = f["machine"]

    def row(label: str, name: str) -> str:
        e = f[name]
        runs = ", ".join(f"{wall:.1f}" for wall in e["runs_s"])
        return f"  {label:<46} {e['tok_s']:7.1f} {e['cpu_tok_s']:9.1f}   ({runs} s)"

    def target(label: str, num: str, den: str, goal: float) -> str:
        ratios = [f[num][key] / f[den][key] for key in ("tok_s", "cpu_tok_s")]
        met = "met" if ratios[0] >= goal else "NOT met"
        return f"  {label:<46} {ratios[0]:6.2f}x {ratios[1]:8.2f}x   (target >= {goal}x: {met})"

    lines = [f"machine: {m['model']}, {m['cores']} cores; load average at start "
             f"{' '.join(f'{x:.2f}' for x in m['load_average'] or [])}",
             f"(e) prompts files of {f['prompts']} prompts, {f['model']}, batch size {f['batch_size']}, temperature "
             f"0.8, top-k 200, {f['threads']} torch threads",
             f"  even file: {f['prompt_tokens']['even']} prompt tokens (40 each), {f['new_tokens']['even']} new (48 "
             f"each); spread file: {f['prompt_tokens']['spread']} prompt tokens (2-78), {f['new_tokens']['spread']} "
             "new (8-88)",
             f"  {'new tokens/s (median; by CPU time in the next column)':<46} {'wall':>7} {'CPU time':>9}   (runs)",
             row("even file, continuous batching", "even"),
             row("spread file, continuous batching", "spread"),
             row("spread file, bucketing (the job before)", "bucketing"),
             row("spread file, generate looped", "looped"),
             target("spread / even", "spread", "even", 0.9),
             target("spread: continuous batching / bucketing", "spread", "bucketing", 3),
             target("spread: continuous batching / generate looped", "spread", "looped", 5),
             "  sample.py --prompts on the spread file with the trained model, pinned to two cores (generation time "
             "from its summary; wall time with start-up):"]
    for name, p in f["processes"].items():
        if isinstance(p, dict):
            lines.append(f"    {name:<24} {p['generation_s']:6.1f} s, {p['prompts_s']:6.2f} prompts/s, "
                         f"{p['tokens_s']:7.1f} tokens/s; wall {p['wall_s']:.1f} s")
    lines.append(f"    outputs byte-identical: {'yes' if f['processes']['identical_outputs'] else 'NO'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# --gpu_check: every GPU check in one run


def gpu_check_parts(dev: torch.device) -> list[tuple[str, list[str], float]]:
    """--gpu_check's parts, each (what it is, its command, the seconds it may take; under 8 minutes in all): every
    test marked gpu (tests/test_gpu.py's, and the others'), then this table's cuda rows: eager in float32 and the
    GPU's half precision (bfloat16 where native, else float16) at batch 1 and 10 with sample.py's workload, and
    compiled in float32 at batch 1 (a compiled variant or batch size costs a compilation of a minute or so)."""
    half = "bfloat16" if native_bf16(dev) else "float16"
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider"]
    rows = [sys.executable, str(ROOT / "bench.py"), f"--device={dev}", "--quantize=None"]
    return [("the tests marked gpu", tests, 280),
            ("bench.py's cuda rows, eager", rows + [f"--dtype=float32,{half}", "--batch_sizes=1,10"], 70),
            ("bench.py's cuda rows, compiled", rows + ["--dtype=float32", "--compile=True", "--batch_sizes=1",
                                                       "--reference=False", "--workload=False"], 100)]


def run_part(command: list[str], seconds: float) -> tuple[Optional[int], float]:
    """command run in this project's folder, its output going to ours, stopped with every process it started once
    it has taken `seconds` (or on Ctrl-C); its exit status (None if stopped) and the seconds it took."""
    start = time.monotonic()
    part = subprocess.Popen(command, cwd=ROOT, start_new_session=True)  # its own group: stopped whole
    try:
        status = part.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        if part.poll() is None:
            os.killpg(part.pid, signal.SIGKILL)
            part.wait()
    return status, time.monotonic() - start


def run_gpu_check(device: str) -> int:
    """Every GPU check, one part after another, each part's output as it comes; then a line for each part: passed,
    failed, or out of time. device: the GPU to check (cuda unless --device names one). Exit status 0 when every
    part passed, else 1."""
    if not torch.cuda.is_available():
        raise UsageError("--gpu_check runs the checks that need a GPU, and CUDA is not available here: run it on a "
                         "machine with an NVIDIA GPU")
    dev = pick_device(device if device.startswith("cuda") else "cuda")
    outcomes, start = [], time.monotonic()
    for name, command, seconds in gpu_check_parts(dev):
        print(f"bench.py --gpu_check: {name} ({seconds:.0f} s at most): {shlex.join(command)}", flush=True)
        status, took = run_part(command, seconds)
        verdict = "passed" if status == 0 else "OUT OF TIME" if status is None else f"FAILED (exit status {status})"
        outcomes.append((name, verdict, took))
    print(f"\nbench.py --gpu_check on {torch.cuda.get_device_name(dev)}, {time.monotonic() - start:.0f} s:")
    for name, verdict, took in outcomes:
        print(f"  {name}: {verdict} in {took:.0f} s")
    return 0 if all(verdict == "passed" for _, verdict, _ in outcomes) else 1


# ----------------------------------------------------------------------------------------------------------------
# Report


def agreement(a: list, b: list) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def tables(report: dict) -> str:
    m = report["machine"]
    bw = report["bandwidth_gb_s"]
    lines = [f"machine: {m['model']}, {m['cores']} cores, torch threads {m['threads']}, flags "
             f"{' '.join(m['flags']) or '-'}; bf16 instructions: {'yes' if m['bf16_instructions'] else 'no'}; "
             f"torch's kernels {m['kernels']}"
             f"{''.join(f', {k}={v}' for k, v in m['isa_caps'].items())}; "
             f"{'llama.cpp built for ' + m['llama_cpp'] + '; ' if m.get('llama_cpp') else ''}"
             f"load average at start {' '.join(f'{x:.2f}' for x in m['load_average'] or [])}",
             f"torch {torch.__version__}, transformers {report['transformers']}; model {report['model']}; "
             f"prompt {report['prompt_len']} tokens, {report['new_tokens']} greedy new tokens per row; median of "
             f"the timed runs (column 'runs') after a warm-up",
             f"read bandwidth (sum of a {report['bandwidth_mb']} MB buffer, {m['threads']} threads): median "
             f"{bw['median']:.1f} GB/s (min {bw['min']:.1f}, max {bw['max']:.1f}, {bw['samples']} samples at start "
             f"and end)", ""]
    gpu = torch.device(report["device"]).type == "cuda"
    memory = "GPU peak MB" if gpu else "RSS growth MB"
    head = (f"{'system':<30} {'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} {'TTFT ms':>9} "
            f"{'weights MB/step':>15} {'roofline':>8} {memory:>13} {'runs':>4}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        roof = f"{100 * r['roofline']:.0f}%" if r["roofline"] is not None else "-"
        lines.append(f"{r['system']:<30} {r['batch']:>5} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f} "
                     f"{r['ttft_ms']:>9.1f} {r['weight_mb']:>15.1f} {roof:>8} {r['memory_growth_mb']:>13.1f} "
                     f"{r['runs']:>4}")
    memory = ("GPU peak: the most GPU memory torch allocated during the warm-up run, over what it held before "
              "(the weights)" if gpu else "RSS growth: peak resident memory growth during the warm-up run, in this "
              "one process (weights were already resident)")
    lines += ["", "roofline: decode steps/s reached x weight bytes per step / median read bandwidth (1 = the most "
              f"the memory allows; the KV cache's reads are not counted; (s) counts tokens, several a read of the "
              f"weights, and can pass 1). {memory}.", ""]
    for line in report["ratios"]:
        lines.append(line)
    lines.append("")
    for line in report["checks"]:
        lines.append(line)
    if report.get("workload"):
        w = report["workload"]
        lines += ["", f"(d) sample.py's default workload, {w['samples']} samples x {w['new_tokens']} tokens from one "
                  f"token (temperature 0.8, top-k 200):",
                  f"  (a) ours, one batch, KV cache: {w['ours_s']:.2f} s ({w['ours_tok_s']:.1f} tok/s, measured)",
                  f"  (c) no cache, sample after sample: {w['reference_s_estimated']:.1f} s "
                  f"({w['reference_tok_s']:.2f} tok/s), ESTIMATED: one no-cache step (fastest of 3) at contexts "
                  f"{w['reference_contexts']} ({', '.join(f'{s:.0f}' for s in w['reference_step_ms'])} ms), "
                  f"interpolated linearly, summed over {w['new_tokens']} steps, x {w['samples']} samples",
                  f"  speed-up (a) over (c): {w['speedup']:.1f}x"]
    if report.get("busy_workload"):
        w = report["busy_workload"]
        lines += ["", f"(f) sample.py's default workload with one core busy ({w['model']}, {w['weights']} weights, "
                  f"{w['samples']} samples x {w['new_tokens']} tokens, temperature 0.8, top-k 200): "
                  + ", ".join(f"{k} {v:.1f} tok/s" for k, v in w["tok_s"].items())]
    if report.get("memory"):
        m = report["memory"]
        lines += ["", f"(m) peak resident memory of a whole run (load, then {report['new_tokens']} greedy tokens at "
                  f"batch 1), each in a fresh process: ours int8 (quantized while loading from a safetensors "
                  f"folder) {m['ours_int8_mb']:.0f} MB more than `import torch` alone"
                  + (f"; llama.cpp q8_0 {m['llama_q8_0_mb']:.0f} MB more than `import llama_cpp` alone"
                     if "llama_q8_0_mb" in m else "")]
    if report.get("fidelity"):
        f = report["fidelity"]
        lines += ["", f"fidelity on {f['model']} over assets/heldout.txt ({f['text_tokens']} tokens), against "
                  f"float32 at every position:"]
        for name in ("int8", "fp16", "bfloat16"):
            lines.append(f"  {name:<9} mean KL {f[name]['mean_kl']:.2e} nats, top-1 agreement "
                         f"{100 * f[name]['top1_agreement']:.1f}% of {f[name]['positions']} positions")
    return "\n".join(lines)


def parse_sizes(name: str, text: str) -> list[int]:
    """--name's comma-separated batch sizes, each a positive int and none twice."""
    try:
        sizes = [int(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise UsageError(f"--{name}='{text}' is not a comma-separated list of batch sizes such as 1,10") from None
    if any(size < 1 for size in sizes) or len(set(sizes)) != len(sizes):
        raise UsageError(f"--{name}='{text}': each batch size must be at least 1, and given once")
    return sizes


def check_settings(s: SimpleNamespace) -> tuple[list[int], list[int], list[str], list[str], list[str]]:
    """Every setting in s checked before anything slow runs, as sample.py does; the batch sizes, the slow ones, the
    dtypes, the quantized variants and the drafts."""
    at_least = dict(prompt_len=1, new_tokens=2, repeats=1, bandwidth_mb=1, workload_samples=1, workload_tokens=1,
                    busy_samples=1, busy_tokens=1,
                    n_layer=1, n_head=1, n_embd=1, vocab_size=1, block_size=1)
    for name, low in at_least.items():
        if getattr(s, name) < low:
            why = " (decode speed is timed from the second token on)" if name == "new_tokens" else ""
            raise UsageError(f"--{name}={getattr(s, name)}: it must be at least {low}{why}")
    cpus = os.cpu_count() or 1
    if s.threads is not None and not 1 <= s.threads <= cpus:
        raise UsageError(f"--threads={s.threads}: give from 1 to this machine's {cpus} CPUs, or None for torch's "
                         f"default (more threads than CPUs only take turns on them, and tens of thousands crash "
                         f"torch's thread pool)")
    if s.max_seconds <= 0:
        raise UsageError(f"--max_seconds={s.max_seconds}: give a time limit above 0 seconds")
    if s.n_embd % s.n_head:
        raise UsageError(f"--n_embd={s.n_embd} is not a multiple of --n_head={s.n_head}")
    if not s.init_from and s.prompt_len + s.new_tokens > s.block_size:
        raise UsageError(f"--prompt_len={s.prompt_len} plus --new_tokens={s.new_tokens} is more than --block_size="
                         f"{s.block_size}: transformers' GPT-2 (b) cannot generate past its context")
    if not 0 <= s.seed < 2 ** 64:
        raise UsageError(f"--seed={s.seed}: give a seed from 0 to 2**64-1")
    dev = pick_device(s.device)
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device={s.device}: bench.py runs on cpu or cuda")
    batches = parse_sizes("batch_sizes", s.batch_sizes)
    if not batches:
        raise UsageError("--batch_sizes is empty: give at least one batch size, such as 1")
    slow = parse_sizes("slow_batches", s.slow_batches)
    dtypes = ["float32"] + [d for d in s.dtype.split(",") if d and d != "float32"]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"unknown dtype '{d}': use float32, bfloat16 or float16")
    if dev.type == "cuda" and "bfloat16" in dtypes and not native_bf16(dev):
        capability = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        raise UsageError(f"--dtype={s.dtype}: {torch.cuda.get_device_name(dev)} has no native bfloat16 (compute "
                         f"capability {capability}, under 8.0) and would time its emulation: use "
                         f"--dtype=float32,float16")
    quantized = [q for q in (s.quantize or "").split(",") if q]  # int8, fp16, both or none
    if not set(quantized) <= {"int8", "fp16"}:
        raise UsageError(f"quantize must be int8, fp16, int8,fp16 or None, got '{s.quantize}'")
    drafts = [d for d in (s.draft or "").split(",") if d]
    if not set(drafts) <= {"int8", "fp16"}:
        raise UsageError(f"draft must be int8, fp16, int8,fp16 or None, got '{s.draft}'")
    if s.draft_tokens is not None and not 1 <= s.draft_tokens <= DRAFT_TOKENS_LIMIT:
        raise UsageError(f"--draft_tokens={s.draft_tokens}: a draft proposes 1 to {DRAFT_TOKENS_LIMIT} tokens a round")
    check_memory(s, batches, len(dtypes) - 1 + len(quantized), len(drafts) if dev.type == "cpu" else 0,
                 available_memory(dev))
    return batches, slow, dtypes, quantized, drafts


def parameter_count(c: GPTConfig) -> int:
    """GPT-2's parameters at shape c: the token and position tables, each layer's attention, MLP and two layer
    norms, and the final layer norm."""
    return (c.vocab_size + c.block_size) * c.n_embd + c.n_layer * (12 * c.n_embd ** 2 + 13 * c.n_embd) + 2 * c.n_embd


def check_memory(s: SimpleNamespace, batches: list[int], variants: int, drafts: int,
                 available: Optional[int]) -> None:
    """UsageError, before anything is built, for sizes the memory available cannot hold: the random weights in
    every copy bench.py keeps (ours and transformers' in float32, 4 bytes a parameter more for each other dtype or
    quantized variant, which starts from a float32 copy, and 2 for each draft, int8 or fp16 weights beside the
    float32 model), then beside them the largest batch (ours' and transformers' KV caches and logits), (d)'s batch,
    (f)'s on the trained model, and the buffer read for the bandwidth. Each message says the most that fits. A
    checkpoint (init_from) is measured as it loads; (e) alone (--prompts_file_bench) builds none of these."""
    if available is None or s.prompts_file_bench:
        return
    room = MEMORY_SHARE * available
    mb = f"MB available on {s.device}"
    shape = GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head,
                      n_embd=s.n_embd)
    weights = 0 if s.init_from else parameter_count(shape) * (8 + 4 * variants + 2 * drafts)
    if weights > room:
        raise UsageError(f"random weights of {parameter_count(shape):,} parameters (--n_layer, --n_embd, --vocab_size, "
                         f"--block_size), in every copy bench.py compares, take about {weights / 1e6:,.0f} MB, more "
                         f"than the {available / 1e6:,.0f} {mb}: make the model smaller, or compare fewer --dtype, "
                         f"--quantize and --draft variants")
    room -= weights
    row = 2 * bytes_per_sample(shape, s.prompt_len, s.new_tokens, 4)
    if not s.init_from and max(batches) * row > room:
        raise UsageError(f"--batch_sizes={s.batch_sizes}: a batch of {max(batches):,} rows takes about "
                         f"{max(batches) * row / 1e6:,.0f} MB beside the model's {weights / 1e6:,.0f} MB, more than "
                         f"the {available / 1e6:,.0f} {mb} allow: at most {int(room // row):,} rows fit")
    workloads = [("(d)", "workload", s.workload and not s.init_from, shape, s.workload_samples, s.workload_tokens)]
    config = trained_folder(s.fidelity_model) / "config.json"
    if s.busy_core and s.device == "cpu" and config.is_file():  # (f) runs the trained model, whatever the shape
        workloads.append(("(f)", "busy", True, GPTConfig(**config_from_hf(config)), s.busy_samples, s.busy_tokens))
    for part, prefix, runs, model_shape, samples, tokens in workloads:
        sample = bytes_per_sample(model_shape, 1, tokens, 4)
        if runs and samples * sample > room:
            most = int(room // sample)
            setting = f"--{prefix}_samples={samples}" if most else f"--{prefix}_tokens={tokens}"
            raise UsageError(f"{setting}: {part}'s {samples:,} samples of {tokens:,} tokens take about "
                             f"{samples * sample / 1e6:,.0f} MB beside the model's {weights / 1e6:,.0f} MB, more than "
                             f"the {available / 1e6:,.0f} {mb} allow: "
                             + (f"at most {most:,} samples fit" if most else "not one sample fits: fewer tokens"))
    if s.bandwidth_mb * 2 ** 20 > room:
        raise UsageError(f"--bandwidth_mb={s.bandwidth_mb}: the buffer read to measure bandwidth does not fit beside "
                         f"the model in the {available / 1e6:,.0f} {mb}: at most {int(room // 2 ** 20):,}")


def trained_folder(name: str) -> Path:
    """A model folder named on the command line, relative to this project's folder unless absolute."""
    folder = Path(name)
    return (folder if folder.is_absolute() else ROOT / folder).resolve()


def bench_model(init_from: Optional[str], shape: GPTConfig, prompt_len: int,
                new_tokens: int) -> tuple[GPT, str]:
    """The model every system runs: init_from's, or random weights of shape; and its description."""
    if init_from:
        model = GPT.from_pretrained(init_from)
        name = init_from
    else:
        model = GPT(shape).eval()
        name = (f"random weights, {shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} wide, vocabulary "
                f"{shape.vocab_size}")
    name += f" ({model.get_num_params(non_embedding=False) / 1e6:.1f}M parameters)"
    if prompt_len + new_tokens > model.config.block_size:
        raise UsageError(f"--prompt_len={prompt_len} plus --new_tokens={new_tokens} is more than {init_from}'s "
                         f"context of {model.config.block_size}: transformers' GPT-2 (b) cannot generate past it")
    return model, name


def variants(model: GPT, dtypes: list[str], quantized: list[str],
             device: str) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Ours in each dtype and quantized variant (int8 and fp16 on the CPU only), and transformers' in each dtype,
    all holding model's weights (model itself is ours in float32)."""
    ours = {d: model if d == "float32" else copy.deepcopy(model).to(getattr(torch, d)) for d in dtypes}
    theirs = {d: transformers_model(model).to(device=device, dtype=getattr(torch, d)) for d in dtypes}
    if device == "cpu":
        for q in quantized:
            ours[q] = getattr(copy.deepcopy(model), f"quantize_{q}")()
    return ours, theirs


def token_checks(rows: Rows, engines: list) -> tuple[list[str], bool]:
    """One batch's greedy tokens compared: the lines that say so, and whether the float32 tokens of (a), (b), (c)
    and (s) are identical."""
    a = rows.ours["float32"].tokens
    same = a == rows.transformers["float32"].tokens
    line = (f"batch {rows.batch}: float32 greedy tokens, (a) ours vs (b) transformers: "
            f"{'identical' if same else 'DIFFER'}")
    if rows.no_cache is not None:
        same_c = a == rows.no_cache.tokens
        line += f"; (a) vs (c) no cache: {'identical' if same_c else 'DIFFER'}"
        same = same and same_c
    lines = [line]
    for variant, result in rows.ours.items():
        if variant != "float32":
            text = (f"batch {rows.batch}: {variant} greedy tokens equal to float32's at "
                    f"{100 * agreement(result.tokens, a):.0f}% of steps")
            if variant in rows.transformers:
                text += (f"; equal to transformers {variant}'s at "
                         f"{100 * agreement(result.tokens, rows.transformers[variant].tokens):.0f}%")
            lines.append(text)
    for draft, result in rows.speculative.items():
        same_s = result.tokens == a  # speculative decoding keeps the model's own greedy tokens
        same = same and same_s
        text = (f"batch {rows.batch}: float32 with the {draft} draft, greedy tokens "
                f"{'identical to' if same_s else 'DIFFER from'} (a) float32's")
        if result.accepted is not None:
            text += (f"; {100 * result.accepted:.1f}% of the draft's tokens accepted, {result.tokens_per_round:.2f} "
                     f"tokens a row per round (one float32 step)")
        lines.append(text)
    for peer in engines:
        if peer.like in rows.ours:
            agree = agreement(rows.peers[peer.name].tokens, rows.ours[peer.like].tokens)
            lines.append(f"batch {rows.batch}: {peer.name} greedy tokens equal to ours {peer.like}'s at "
                         f"{100 * agree:.0f}% of steps")
    return lines, same


def ratio_lines(rows: dict[int, Rows], engines: list) -> list[str]:
    """Decode speed, one row of this run over another (where both ran), each with the target it is held to."""
    lines = []

    def ratio(text: str, num: Optional[Result], den: Optional[Result], target: Optional[float] = None) -> None:
        if num is not None and den is not None:
            x = num.decode_tok_s / den.decode_tok_s
            goal = f" (target >= {target}x: {'met' if x >= target else 'NOT met'})" if target else ""
            roofs = ""
            if num.roofline is not None and den.roofline is not None:  # each one's share of the bandwidth limit
                roofs = f"; {100 * num.roofline:.0f}% and {100 * den.roofline:.0f}% of the read-bandwidth limit"
            lines.append(f"{text}: {x:.2f}x{goal}{roofs}")

    one, ten = rows.get(1, Rows(1)), rows.get(10, Rows(10))  # batch sizes 1 and 10, empty where they did not run
    ratio("batch 1 decode, ours float32 / transformers float32", one.ours.get("float32"),
          one.transformers.get("float32"), 2.0)
    ratio("batch 10 decode, ours float32 / transformers float32", ten.ours.get("float32"),
          ten.transformers.get("float32"), 1.5)
    ratio("ours float32 decode, batch 10 / batch 1 (aggregate tokens/s)", ten.ours.get("float32"),
          one.ours.get("float32"), 3.0)
    ratio("batch 1 decode, ours int8 / transformers float32", one.ours.get("int8"), one.transformers.get("float32"),
          3.5)
    ratio("batch 10 decode, ours int8 / transformers float32", ten.ours.get("int8"), ten.transformers.get("float32"))
    for b, r in rows.items():
        ratio(f"batch {b} decode, ours bfloat16 / transformers bfloat16", r.ours.get("bfloat16"),
              r.transformers.get("bfloat16"), 1.0)
        ratio(f"batch {b} decode, ours fp16 / ours float32", r.ours.get("fp16"), r.ours.get("float32"))
        if r.under_load:
            chosen, fixed = r.under_load["chosen"], [v for k, v in r.under_load.items() if k != "chosen"]
            best = max(fixed, key=lambda f: f.decode_tok_s)
            ratio(f"batch {b} decode, one core busy, ours chosen threads / the better fixed count "
                  f"({best.system.rpartition(', ')[2]})", chosen, best, 0.9)
        halves = [r.ours[v] for v in ("fp16", "bfloat16") if v in r.ours]
        half = max(halves, key=lambda h: h.decode_tok_s) if halves else None
        for peer in engines:
            ours = r.ours.get(peer.like)
            if peer.like == "fp16" and half is not None:  # half precision: the faster of fp16 and bfloat16
                ours, name = half, half.system.removeprefix("(a) ours ")
                ratio(f"batch {b} decode, ours half precision ({name}) / {peer.name}", ours, r.peers.get(peer.name),
                      1.0)
                continue
            ratio(f"batch {b} decode, ours {peer.like} / {peer.name}", ours, r.peers.get(peer.name), 1.0)
        for draft, result in r.speculative.items():
            ratio(f"batch {b} decode, ours float32 with the {draft} draft / ours float32", result,
                  r.ours.get("float32"), 1.5 if b == 1 else None)
            for peer in engines:
                if peer.like == "float32":
                    ratio(f"batch {b} decode, ours float32 with the {draft} draft / {peer.name}", result,
                          r.peers.get(peer.name), 1.0 if b == 1 else None)
    return lines


def main() -> int:
    s = SimpleNamespace(**{name: globals()[name] for name in read_settings(__file__)})
    if s.gpu_check:
        return run_gpu_check(s.device)
    if s.quick:  # a tiny model and short runs, except for the settings given another value
        for name, value in QUICK.items():
            if getattr(s, name) == QUICK_DEFAULTS[name]:
                setattr(s, name, value)
    batches, slow, dtypes, quantized, drafts = check_settings(s)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if s.prompts_file_bench:
        figures = prompts_file_figures(trained_folder(s.init_from or s.fidelity_model), s.seed, s.repeats,
                                       s.device)
        print(jsonlib.dumps(figures, indent=1) if s.json else prompts_file_table(figures))
        return 0 if figures["processes"]["identical_outputs"] else 1
    torch.manual_seed(s.seed)
    import transformers
    transformers.logging.set_verbosity_error()

    machine = cpu_description(s.device)  # the load average before this run adds its own
    if s.peers:
        machine["llama_cpp"] = llama_instructions()
    bandwidth = read_bandwidth(s.bandwidth_mb * 2 ** 20, s.device)
    shape = GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head,
                      n_embd=s.n_embd)
    model, name = bench_model(s.init_from, shape, s.prompt_len, s.new_tokens)
    vocab = model.config.vocab_size
    model = model.to(s.device)
    ours, theirs = variants(model, dtypes, quantized, s.device)
    timing = Timing(s.new_tokens, s.repeats, s.max_seconds)

    rows, checks, ok = {}, [], True
    with contextlib.ExitStack() as peer_engines:
        engines = []
        if s.peers and s.device == "cpu":

            checks += [f"peers: {engine} skipped, not installed ({install})" for engine, install in missing().items()]
            print("bench.py: (p) converting the weights for the peer engines", file=sys.stderr, flush=True)
            engines = peer_engines.enter_context(open_peers(theirs["float32"], model.state_dict(),
                                                            torch.get_num_threads()))
        generator = torch.Generator().manual_seed(s.seed)
        prompts = {}
        for batch in batches:
            prompts[batch] = idx = torch.randint(0, vocab, (batch, s.prompt_len), generator=generator).to(s.device)
            rows[batch] = measure_batch(idx, ours, theirs, slow, s.compile, s.busy_core and s.device == "cpu",
                                        engines, s.reference, timing, drafts if s.device == "cpu" else [],
                                        s.draft_tokens)
            lines, same = token_checks(rows[batch], engines)
            checks += lines
            ok = ok and same
    bandwidth += read_bandwidth(s.bandwidth_mb * 2 ** 20, s.device)
    bw = statistics.median(bandwidth)
    results = [r for batch_rows in rows.values() for r in batch_rows.results()]
    for r in results:
        if not math.isnan(r.decode_tok_s):
            r.roofline = (r.decode_tok_s / r.batch) * (r.weight_mb * 1e6) / bw
    ratios = ratio_lines(rows, engines)

    report = dict(machine=machine, device=s.device, transformers=transformers.__version__, model=name,
                  prompt_len=s.prompt_len, new_tokens=s.new_tokens, repeats=s.repeats, bandwidth_mb=s.bandwidth_mb,
                  bandwidth_gb_s=dict(median=bw / 1e9, min=min(bandwidth) / 1e9, max=max(bandwidth) / 1e9,
                                      samples=len(bandwidth)),
                  results=[asdict(r) for r in results], ratios=ratios, checks=checks, identical=ok)
    if s.workload:
        print("bench.py: (d) sample.py's workload", file=sys.stderr, flush=True)
        report["workload"] = workload_times(model, s.workload_samples, s.workload_tokens, 1, s.device)
        ratios.append(f"(d) sample.py's workload, ours / no cache sample after sample: "
                      f"{report['workload']['speedup']:.1f}x (target >= 30x: "
                      f"{'met' if report['workload']['speedup'] >= 30 else 'NOT met'})")
    if s.busy_core and s.device == "cpu":
        report["busy_workload"] = w = workload_under_load(trained_folder(s.fidelity_model), s.busy_samples,
                                                          s.busy_tokens, s.repeats)
        best = max((k for k in w["tok_s"] if k != "chosen"), key=w["tok_s"].get)
        x = w["tok_s"]["chosen"] / w["tok_s"][best]
        ratios.append(f"(f) sample.py's workload, one core busy, chosen threads / the better fixed count ({best}): "
                      f"{x:.2f}x (target >= 0.9x: {'met' if x >= 0.9 else 'NOT met'})")
    if s.peers and s.device == "cpu" and 1 in prompts:
        report["memory"] = m = memory_figures(model, prompts[1], s.new_tokens, torch.get_num_threads(),
                                              "llama.cpp" not in missing())
        if m.get("llama_q8_0_mb", 0) > 0:  # a model of a few MB can stay within the import's own pages
            x = m["ours_int8_mb"] / m["llama_q8_0_mb"]
            ratios.append(f"(m) peak memory of an int8 run less import torch / llama.cpp q8_0's less import "
                          f"llama_cpp: {m['ours_int8_mb']:.0f} / {m['llama_q8_0_mb']:.0f} MB = {x:.2f}x (target <= "
                          f"1.25x: {'met' if x <= 1.25 else 'NOT met'})")
    if s.fidelity:
        report["fidelity"] = fidelity_figures(trained_folder(s.fidelity_model))
        ratios.append(default_precision_line(report["fidelity"], rows.get(1)))
    if s.json:
        for r in report["results"]:
            del r["tokens"]
        print(jsonlib.dumps(report, indent=1))
    else:
        print(tables(report))
    return 0 if ok else MISMATCH


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    run_main(main)
