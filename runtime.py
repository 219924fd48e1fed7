"""
What every script stands on between its settings and the model: the device and dtype, a model loaded for a script,
a prompt as the ids generation starts from, the memory a batch of samples takes, and the one call that drives
generation for the command line and for prompts files.

Everything here takes its settings as arguments (a script's main reads them once and passes them down) and reports
a user's mistake as a UsageError. torch is imported inside the functions, so that a script's settings are checked
before its slow import.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

from errors import UsageError
from tokenizer import EOT, EOT_ID, load_tokenizer

if TYPE_CHECKING:
    import tiktoken
    import torch

    from model import GPT, GPTConfig

DTYPE_NAMES = ("float32", "bfloat16", "float16")
MEMORY_SHARE = 0.8  # of the memory available, what a batch (KV caches, logits, text) may take: the rest is slack
TEXT_BYTES_PER_TOKEN = 8  # a sample's text, held as bytes until it is written: about 4 a GPT-2 token, with room


# ----------------------------------------------------------------------------------------------------------------
# Device, dtype and the model


def pick_device(name: str) -> torch.device:
    """--device's name as a torch.device: auto is cuda, then mps, then cpu. UsageError for one this machine lacks."""
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
        if dev.index is not None:
            # The chosen GPU becomes the current one: what takes no device (an event, a stream, a synchronize)
            # acts on the current GPU, and on cuda:0 it would not wait for work queued on cuda:N.
            torch.cuda.set_device(dev)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device={name} but MPS is not available here: use --device=cpu (or auto)")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return dev


def native_bf16(dev: torch.device) -> bool:
    """Whether the GPU dev computes in bfloat16 itself: compute capability 8 or more (A100, RTX 30 and later), or
    ROCm. Older GPUs (T4, V100) only emulate it, many times slower than float16, and torch.cuda.is_bf16_supported()
    counts that emulation and asks about the current GPU, not dev."""
    import torch

    return bool(torch.version.hip) or torch.cuda.get_device_capability(dev)[0] >= 8


def pick_dtype(name: str, dev: torch.device) -> torch.dtype:
    """--dtype's name as a torch.dtype that dev runs: auto is bfloat16 on a GPU with native bfloat16, else float16
    there and on MPS, float32 on a CPU."""
    import torch

    if name == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if native_bf16(dev) else torch.float16
        return torch.float16 if dev.type == "mps" else torch.float32
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype '{name}': use auto, {', '.join(DTYPE_NAMES)}")
    dt = getattr(torch, name)
    # Emulated bfloat16 is refused rather than run many times slower than float16.
    if dev.type == "cuda" and dt == torch.bfloat16 and not native_bf16(dev):
        raise UsageError(f"{torch.cuda.get_device_name(dev)} has no native bfloat16 (compute capability "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}, under 8.0): use "
                         f"--dtype=float16, or float32")
    try:  # what the model does, in miniature: the device either runs it or says why not
        x = torch.ones(2, 2, dtype=dt, device=dev)
        (x @ x).softmax(-1).sum().item()
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {dev} cannot run {name} ({str(e).splitlines()[0]}): "
                         f"use --dtype=float32") from None
    return dt


def open_checkpoint(name: str) -> Path:
    """The checkpoint `name` resolved once (the model and its tokenizer both come from it), with the cheap checks
    that read no weights: a broken model folder is named as such, not as a tokenizer that cannot be found."""
    from load import check_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(name)
    check_checkpoint(checkpoint)
    return checkpoint


def model_from(checkpoint: Path, dev: torch.device, dt: torch.dtype, quantize_mode: Optional[str] = None) -> GPT:
    """The checkpoint's model on dev in dt, or with int8 or fp16 weights if quantize_mode asks (CPU only; the
    weights are rounded as they are read, and the rest computes in float32)."""
    import torch

    from model import GPT

    if quantize_mode is None:
        return GPT.from_pretrained(str(checkpoint)).to(device=dev, dtype=dt)
    if quantize_mode not in ("int8", "fp16") or dev.type != "cpu":
        raise UsageError(f"--quantize takes int8 or fp16 on the CPU only, got {quantize_mode!r} on {dev}")
    if dt != torch.float32:
        raise UsageError(f"--quantize={quantize_mode} multiplies its weights in float32: leave --dtype at auto or "
                         f"float32")
    return GPT.from_pretrained(str(checkpoint), quantize=quantize_mode)


# --dtype=auto on a CPU: float16 weights (Fp16Linear) with float32 sums. Of the precisions whose fidelity on the
# trained model is within 1e-5 nats of mean KL and 99.9% top-1 of float32 (float32 and fp16: KL 1.4e-6, top-1
# 100%; bfloat16 and int8 are not), the faster on every CPU measured (AVX2, AVX-512, AMX): the README's speed tables.
CPU_WEIGHTS = "fp16"


def check_draft(name: Optional[str], draft_tokens: Optional[int], dev: torch.device, quantize_mode: Optional[str],
                compile: bool) -> None:
    """--draft and --draft_tokens checked before any model loads: UsageError for a draft that cannot serve."""
    from generate import DRAFT_TOKENS_LIMIT
    from sampling import check_int

    if name is None:
        if draft_tokens is not None:
            raise UsageError(f"--draft_tokens={draft_tokens} without --draft: give a draft (int8, fp16 or a smaller "
                             "model) for it to propose tokens")
        return
    if draft_tokens is not None:
        try:
            check_int("--draft_tokens", draft_tokens, 1, DRAFT_TOKENS_LIMIT)
        except (TypeError, ValueError) as e:
            raise UsageError(e) from None
    if compile:
        raise UsageError("--draft does not take --compile=True: speculative decoding runs eagerly")
    if name in ("int8", "fp16"):
        if dev.type != "cpu":
            raise UsageError(f"--draft={name} runs on the CPU only (fbgemm's products), not on {dev}: give a "
                             "smaller model of the same vocabulary as the draft instead, such as --draft=distilgpt2")
        if quantize_mode is not None:
            raise UsageError(f"--draft={name} is a quantized copy of the float model, and --quantize={quantize_mode} "
                             "leaves no float model to copy: drop one of them")
    else:
        try:
            open_checkpoint(name)  # a draft that is not there is said now, before the model loads
        except UsageError as e:
            raise UsageError(f"--draft={name}: {e}") from None


def load_draft(name: Optional[str], model: GPT, dev: torch.device, dtype_name: str) -> Union[None, str, GPT]:
    """--draft's draft for speculative decoding (checked by check_draft): "int8" or "fp16", which generation makes
    from the model's own weights, or the model `name` loaded on dev in dtype_name's dtype, which must share the
    model's vocabulary."""
    if name is None or name in ("int8", "fp16"):
        return name
    t0 = time.perf_counter()
    draft = model_from(open_checkpoint(name), dev, pick_dtype(dtype_name, dev))
    if draft.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"--draft={name} has a vocabulary of {draft.config.vocab_size} tokens and the model one of "
                         f"{model.config.vocab_size}: a draft must propose the model's own token ids; use a model "
                         f"of the same family (distilgpt2 or gpt2 for GPT-2's 50257 tokens), or int8 or fp16")
    print(f"loaded the draft {name} ({draft.get_num_params(non_embedding=False):,} params) in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return draft


def load_model(name: str, dev: torch.device, dtype_name: str, quantize_mode: Optional[str],
               tiktoken_path: Optional[str]) -> tuple[GPT, tiktoken.Encoding]:
    """The model `name` on dev, in dtype_name's dtype (and int8 or fp16 weights if asked), and its tokenizer, which
    must fit it (load_tokenizer checks it against the checkpoint's vocab_size, the one the model is built with); the
    load is reported on stderr. The tokenizer is found before the weights load, so that a missing one is said at
    once."""
    dt = pick_dtype(dtype_name, dev)
    weights = "" if quantize_mode is None else f" with {quantize_mode} weights"
    if quantize_mode is None and dtype_name == "auto" and dev.type == "cpu":
        quantize_mode = CPU_WEIGHTS
        weights = f" with {CPU_WEIGHTS} weights (the CPU default; --dtype=float32 for float32 weights)"
    checkpoint = open_checkpoint(name)
    enc = load_tokenizer(checkpoint, tiktoken_path)
    t0 = time.perf_counter()
    model = model_from(checkpoint, dev, dt, quantize_mode)
    dt_name = str(dt).removeprefix("torch.")
    print(f"loaded {name} ({model.get_num_params(non_embedding=False):,} params) on {dev}/{dt_name}{weights} "
          f"in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model, enc


# ----------------------------------------------------------------------------------------------------------------
# Prompts and sampling arguments


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                   num_samples: int, seed: Optional[int] = None) -> None:
    """generate_stream's own checks of these arguments, run before any model loads, a mistake as a UsageError."""
    from sampling import check_sampling_args

    try:
        check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples, seed)
    except (TypeError, ValueError) as e:
        raise UsageError(e) from None


def check_vocabulary(ids: list[int], vocab_size: int, where: str) -> None:
    """UsageError, naming where the ids came from ("FILE line N: the prompt"), for a token past the model's
    vocabulary: the tokenizer does not belong to the model."""
    if ids and max(ids) >= vocab_size:
        raise UsageError(f"{where} holds token {max(ids)}, outside the model's vocabulary of {vocab_size}: this "
                         f"tokenizer does not fit the model")


def prompt_ids(enc: tiktoken.Encoding, text: str, config: GPTConfig, where: str) -> tuple[list[int], int]:
    """The ids generation starts from, and how many tokens the text has: the text's tokens (<|endoftext|> in it is
    the special token), <|endoftext|> alone for an empty text, the last block_size of them for a text longer than
    the model's context."""
    ids = enc.encode(text, allowed_special={EOT}) or [EOT_ID]
    check_vocabulary(ids, config.vocab_size, where)
    return ids[-config.block_size:], len(ids)


def token_bytes(enc: tiktoken.Encoding, tokens: list[int]) -> bytes:
    """The tokens' text as bytes (a character may span tokens, so only whole texts decode). nanoGPT checkpoints pad
    the vocabulary past the tokenizer's; such a token has no text and stands as U+FFFD, the replacement character
    (spelled as a number: a \\N{...} name makes Python load a module while compiling this file, where a Ctrl-C
    would become a SyntaxError)."""
    return b"".join(enc.decode_single_token_bytes(t) if t < enc.n_vocab else "\ufffd".encode() for t in tokens)


def sample_steps(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                 top_p: Optional[float], stop_at_eot: bool, compile: bool = False,
                 **options) -> Iterator[torch.Tensor]:
    """Each step's new tokens from model.generate_stream, ending a row at <|endoftext|> when stop_at_eot: the call
    behind sample.py's samples (a prompts file's run in batch.py's slots). options: how the rows draw their noise
    (num_samples, generator, generators) and speculative decoding's (draft, draft_tokens, stats)."""
    return model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p=top_p,
                                 stop_tokens=[EOT_ID] if stop_at_eot else None, compile=compile, **options)


# ----------------------------------------------------------------------------------------------------------------
# Memory


def available_memory(dev: torch.device) -> Optional[int]:
    """Bytes that dev can still allocate: CUDA's free memory plus what torch holds unused, what Metal recommends less
    what it holds for MPS, or for the CPU the host's (host_memory); None where it is not known."""
    import torch

    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    if dev.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    if dev.type == "cpu":
        return host_memory()
    return None


def host_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Bytes this process can still allocate on the host: the least of what the machine has available (Linux's
    MemAvailable), the room its control groups leave (a container's limit, which MemAvailable does not show) and
    the room its own limits leave (ulimit -v and -d). proc and cgroups: where /proc and the cgroup file system are.
    None where none of them is known (no /proc, as on Windows)."""
    rooms = [machine_memory(proc / "meminfo"), cgroup_room(proc / "self" / "cgroup", cgroups),
             rlimit_room(proc / "self" / "status")]
    known = [room for room in rooms if room is not None]
    return max(0, min(known)) if known else None


def machine_memory(meminfo: Path) -> Optional[int]:
    """MemAvailable (memory free, plus the caches the kernel can drop); where there is no /proc/meminfo (macOS), the
    free physical pages, or all of them where that is not known."""
    fields = read_fields(meminfo)
    if "MemAvailable" in fields:
        return fields["MemAvailable"] * 1024  # given in kB
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or not that name
            continue
    return None


def cgroup_room(self_cgroup: Path, cgroups: Path) -> Optional[int]:
    """The least room the process's control groups leave it: at its own group and at each one above it (a limit
    set on a parent holds its children), the limit less what the group uses, not counting the file cache the
    kernel can drop first. cgroup v2 (memory.max, memory.current) and v1 (memory.limit_in_bytes,
    memory.usage_in_bytes, under cgroups/memory); a group not found under cgroups (a container sees its own group as
    the root) is looked for from its nearest folder that is there. None where no group sets a limit."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)  # hierarchy:controllers:path
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one hierarchy for every controller
            rooms += group_rooms(cgroups, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            rooms += group_rooms(cgroups / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                 "total_inactive_file")
    return min(rooms) if rooms else None


def group_rooms(root: Path, path: str, limit_file: str, usage_file: str, cache_field: str) -> list[int]:
    """limit - (usage - droppable cache) of the group at path under root and of every group above it that sets a
    limit."""
    folder = root / path.strip("/")
    while folder != root and not folder.is_dir():
        folder = folder.parent
    rooms = []
    while True:
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2 ** 60:  # v1 writes "no limit" as a number near 2**63
                usage = int((folder / usage_file).read_text())
                cache = read_fields(folder / "memory.stat", separator=" ").get(cache_field, 0)
                rooms.append(int(limit) - (usage - cache))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            return rooms
        folder = folder.parent


def rlimit_room(status: Path) -> Optional[int]:
    """What the process's own limits leave it: RLIMIT_AS (ulimit -v) less its address space (VmSize), RLIMIT_DATA
    (ulimit -d) less its data (VmData). None where neither is set."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    used = read_fields(status)
    rooms = []
    for limit, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            rooms.append(soft - used.get(field, 0) * 1024)  # given in kB
    return min(rooms) if rooms else None


def read_fields(file: Path, separator: str = ":") -> dict[str, int]:
    """A /proc or cgroup file of `name<separator> number ...` lines as {name: number}; {} where it cannot be read."""
    fields = {}
    try:
        for line in file.read_text().splitlines():
            name, _, rest = line.partition(separator)
            value = rest.split()
            if value and value[0].isdigit():
                fields[name.strip()] = int(value[0])
    except OSError:
        pass
    return fields


def kv_cache_bytes(config: GPTConfig, prompt_len: int, max_new_tokens: int, dtype_bytes: int,
                   compile: bool = False) -> int:
    """One row's KV cache: the keys and values of every layer at every position it will hold (at most the
    model's context). Compiled decoding's static cache holds the whole context, however short the sample."""
    positions = config.block_size if compile else min(config.block_size, prompt_len + max_new_tokens)
    return 2 * config.n_layer * positions * config.n_embd * dtype_bytes


def bytes_per_sample(config: GPTConfig, prompt_len: int, max_new_tokens: int, dtype_bytes: int,
                     compile: bool = False) -> int:
    """What one sample of a batch takes: its KV cache, a step's logits with the sampling's float32 copies of them,
    past the context a window step's activations, and its text, held until it is written."""
    logits = 6 * config.vocab_size * 4
    past_context = prompt_len + max_new_tokens > config.block_size
    window = 12 * config.block_size * config.n_embd * dtype_bytes if past_context else 0
    text = max_new_tokens * TEXT_BYTES_PER_TOKEN
    return kv_cache_bytes(config, prompt_len, max_new_tokens, dtype_bytes, compile) + logits + window + text


def batch_sizes(config: GPTConfig, dtype_bytes: int, prompt_len: int, max_new_tokens: int, num_samples: int,
                dev: torch.device, compile: bool = False) -> Iterator[int]:
    """sample.py's num_samples in one batch if it fits in the memory available, else in as few even batches as
    fit, said on stderr. The sizes come one batch at a time, so that any number of samples starts at once.
    UsageError if not even one sample fits, with the most max_new_tokens that would. compile: decoding is compiled
    (a static cache of the whole context per sample; generation frees one batch's before it takes the next's)."""
    per_sample = bytes_per_sample(config, prompt_len, max_new_tokens, dtype_bytes, compile)
    available = available_memory(dev)
    if available is None or num_samples * per_sample <= MEMORY_SHARE * available:
        return iter([num_samples])
    fit = int(MEMORY_SHARE * available // per_sample)
    if fit < 1:
        # the longest text that fits beside a sample's largest KV cache, logits and window (at the context)
        full = bytes_per_sample(config, config.block_size, 1, dtype_bytes, compile) - TEXT_BYTES_PER_TOKEN
        most = int((MEMORY_SHARE * available - full) // TEXT_BYTES_PER_TOKEN)
        fixes = [f"lower --max_new_tokens (about {most:,} fit)"] if most >= 1 else []
        if compile:
            fixes.append(f"use --compile=False (a compiled cache holds all {config.block_size} positions)")
        fixes.append("use a smaller model, a smaller --dtype or a device with more memory")
        raise UsageError(f"one sample needs about {per_sample / 1e6:,.0f} MB (its KV cache and logits, and the text of "
                         f"its {max_new_tokens:,} tokens, held until it is written) and {dev} has "
                         f"{available / 1e6:,.0f} MB available: {', or '.join(fixes)}")
    n = -(-num_samples // fit)
    print(f"sample.py: {num_samples:,} samples need about {num_samples * per_sample / 1e6:,.0f} MB for their KV "
          f"caches, logits and text, more than the {available / 1e6:,.0f} MB available on {dev} allow: drawing them "
          f"in {n:,} batches of up to {-(-num_samples // n):,} (one seed's samples then differ from one batch's)",
          file=sys.stderr)
    return (num_samples // n + (i < num_samples % n) for i in range(n))
