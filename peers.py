"""
Peer engines for `bench.py --peers`: CTranslate2 and llama.cpp (through llama-cpp-python), run on this project's
weights converted on the fly, on the same prompts, lengths and thread count as ours, greedy.

CTranslate2 converts a transformers folder with its own converter; llama.cpp reads a GGUF file that save.py's
`write_gguf` writes (export.py's writer, here without a vocabulary). Neither engine is a requirement of this project:
`missing` names the ones whose packages are absent, with how to install them, and bench.py skips those. Token ids
go in and come out directly: the converted models carry no real vocabulary, which no step of a benchmark on
ids reads.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

if TYPE_CHECKING:  # torch is imported where it is used: bench.py's memory figure runs llama.cpp without it
    import torch
    import torch.nn as nn

# engine: (the Python packages it needs, how to install them)
ENGINES = {
    "CTranslate2": (("ctranslate2",), "pip install ctranslate2"),
    "llama.cpp": (("llama_cpp", "gguf"), 'pip install gguf llama-cpp-python (CMAKE_ARGS="-DGGML_NATIVE=ON" before '
                                         'it builds llama.cpp for this CPU)'),
}


def missing() -> dict[str, str]:
    """Engines whose packages are not installed, each with the command that installs them."""
    return {engine: install for engine, (packages, install) in ENGINES.items()
            if any(find_spec(p) is None for p in packages)}


@dataclass
class Peer:
    name: str  # e.g. "llama.cpp f16"
    like: str  # our variant of the same precision, whose greedy tokens and speed it is held against
    weight_bytes: int  # bytes of weights a decode step reads (for bench.py's roofline)
    generate: Callable[[torch.Tensor, int], tuple[list[float], torch.Tensor]]  # (prompts, steps) -> times, tokens


def weight_bytes(state_dict: dict[str, torch.Tensor], bytes_per_weight: float) -> int:
    """What a decode step reads: the matrices (the tied token table once, as the output) at bytes_per_weight, the
    biases and norms in float32; the position table is read one row a step and is left out."""
    total = 0
    for name, t in state_dict.items():
        if name.endswith("wpe.weight") or name == "lm_head.weight":
            continue
        total += t.numel() * (bytes_per_weight if t.dim() == 2 else 4)
    return int(total)


@contextlib.contextmanager
def open_peers(hf_model: nn.Module, state_dict: dict[str, torch.Tensor], threads: int) -> Iterator[list[Peer]]:
    """Every installed peer engine in every precision it shares with ours, loaded from converted copies of the
    weights in a temporary folder (removed afterwards). hf_model: transformers' GPT2LMHeadModel with our tensors;
    state_dict: ours (model.py's names)."""
    absent = missing()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp, contextlib.ExitStack() as stack:
        folder, peers = Path(tmp), []
        if "CTranslate2" not in absent:
            hf_folder = save_transformers_folder(hf_model, folder / "hf")
            for quantization, like, size in (("float32", "float32", 4), ("int8", "int8", 1)):
                generator = ct2_generator(hf_folder, folder / f"ct2-{quantization}", quantization, threads)
                peers.append(Peer(f"CTranslate2 {quantization}", like, weight_bytes(state_dict, size), generator))
        if "llama.cpp" not in absent:
            from save import write_gguf

            c = hf_model.config
            config_args = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                               n_head=c.n_head, n_embd=c.n_embd, bias=True)
            for kind, like, size in (("f32", "float32", 4), ("f16", "fp16", 2), ("q8_0", "int8", 34 / 32)):
                path = folder / f"gpt2-{kind}.gguf"
                write_gguf(path, config_args, state_dict, kind)  # no vocabulary: the benchmark runs on token ids
                llama = stack.enter_context(contextlib.closing(LlamaEngine(path, threads)))
                peers.append(Peer(f"llama.cpp {kind}", like, weight_bytes(state_dict, size), llama.generate))
        yield peers


# ----------------------------------------------------------------------------------------------------------------
# CTranslate2


def save_transformers_folder(hf_model: nn.Module, folder: Path) -> Path:
    """The model as a transformers folder, with a placeholder GPT-2 vocabulary (CTranslate2's converter reads one;
    the last id is <|endoftext|>, which the converter adds if it is absent)."""
    hf_model.save_pretrained(folder)
    n = hf_model.config.vocab_size
    vocab = {**{f"<id{i}>": i for i in range(n - 1)}, "<|endoftext|>": n - 1}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def ct2_generator(hf_folder: Path, out: Path, quantization: str,
                  threads: int) -> Callable[[torch.Tensor, int], tuple[list[float], torch.Tensor]]:
    import ctranslate2
    import torch

    ctranslate2.converters.TransformersConverter(str(hf_folder)).convert(str(out), quantization=quantization,
                                                                         force=True)
    engine = ctranslate2.Generator(str(out), device="cpu", compute_type="default", intra_threads=threads,
                                   inter_threads=1)
    vocabulary = json.loads((out / "vocabulary.json").read_text(encoding="utf-8"))  # id -> token string

    def generate(idx: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
        times = [time.perf_counter()]

        def stamp(step) -> bool:  # called as each row's token is chosen: row 0 stamps the step
            if step.batch_id == 0:
                times.append(time.perf_counter())
            return False

        # min_length = max_length: exactly `steps` tokens, no stop; the prompt is one prefill, not in the result.
        results = engine.generate_batch([[vocabulary[i] for i in row] for row in idx.tolist()], max_length=steps,
                                        min_length=steps, sampling_topk=1, include_prompt_in_result=False,
                                        callback=stamp)
        return times, torch.tensor([r.sequences_ids[0] for r in results])

    return generate


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp


def amx_int8() -> bool:
    """Whether this CPU has AMX's int8 tiles (the amx_int8 flag of Linux's /proc/cpuinfo)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def llama_instructions() -> Optional[str]:
    """The instruction sets the installed llama.cpp was built to use (fixed when it is built: GGML_NATIVE, or
    GGML_AVX2 and the like), as its system info lists them; None where it is not installed."""
    if "llama.cpp" in missing():
        return None
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return " ".join(part.split("=")[0].split(":")[-1].strip() for part in info.split("|")
                    if part.strip().endswith("= 1"))


_silence = None  # llama.cpp's log callback, kept alive while llama.cpp may call it


class LlamaEngine:
    """A GGUF model in llama.cpp through llama-cpp-python's low-level API: its high-level Llama class cannot set
    the number of sequences (n_seq_max) that a batch of several rows needs. One context per batch shape."""

    def __init__(self, path: Path, threads: int):
        import llama_cpp

        global _silence
        self.L, self.threads, self.contexts = llama_cpp, threads, {}
        llama_cpp.llama_backend_init()
        if _silence is None:  # without it llama.cpp describes the whole model on stderr
            _silence = llama_cpp.llama_log_callback(lambda level, text, user: None)
            llama_cpp.llama_log_set(_silence, None)
        params = llama_cpp.llama_model_default_params()
        # llama.cpp's extra weight layouts (AMX, repacked blocks) crashed llama_decode on q8_0 models on an AVX-512
        # machine with AMX (llama-cpp-python 0.3.36, built with GGML_NATIVE; ggml-org/llama.cpp#20824): there,
        # plain q8_0 kernels instead; elsewhere llama.cpp's own choice
        params.use_extra_bufts = not amx_int8()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def _context(self, rows: int, length: int):
        """A context and a batch for `rows` sequences of `length` positions each (made once per shape)."""
        if (rows, length) not in self.contexts:
            params = self.L.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = rows * length
            params.n_seq_max = rows
            params.kv_unified = True
            params.n_threads = params.n_threads_batch = self.threads
            ctx = self.L.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            self.contexts[rows, length] = ctx, self.L.llama_batch_init(rows * length, 0, rows)
        return self.contexts[rows, length]

    def _decode(self, ctx, batch, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch.n_tokens = len(entries)
        for j, (token, pos, seq, logits) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, pos, 1, logits
            batch.seq_id[j][0] = seq
        if self.L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, ctx, indices) -> list[int]:
        """The likeliest next token at each of these batch entries (their logits are llama.cpp's float arrays)."""
        import numpy as np

        return [int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, j), shape=(self.n_vocab,)).argmax())
                for j in indices]

    def generate(self, idx: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
        """Greedy, each row its own sequence, from an emptied cache (no prompt reused between runs)."""
        import torch

        times, tokens = self.greedy(idx.tolist(), steps)
        return times, torch.tensor(tokens).t()

    def greedy(self, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
        """generate's work on lists (no torch): the step times, and each step's tokens, one per row."""
        rows, T = len(prompts), len(prompts[0])
        ctx, batch = self._context(rows, T + steps)
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)
        times = [time.perf_counter()]
        self._decode(ctx, batch, [(t, pos, s, pos == T - 1) for s, row in enumerate(prompts)
                                  for pos, t in enumerate(row)])
        tokens = [self._argmax(ctx, [s * T + T - 1 for s in range(rows)])]
        times.append(time.perf_counter())
        for step in range(1, steps):
            self._decode(ctx, batch, [(t, T + step - 1, s, True) for s, t in enumerate(tokens[-1])])
            tokens.append(self._argmax(ctx, range(rows)))
            times.append(time.perf_counter())
        return times, tokens

    def close(self) -> None:
        for ctx, batch in self.contexts.values():
            self.L.llama_batch_free(batch)
            self.L.llama_free(ctx)
        self.L.llama_model_free(self.model)
