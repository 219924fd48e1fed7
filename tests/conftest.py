"""Shared fixtures: offline hub, the trained model in ../shared (loaded once per run), and small random
checkpoints written by transformers."""

import gc
import math
import os
import pickle
import re
import runpy
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from model import GPT

ROOT_DIR = Path(__file__).resolve().parent.parent
SHAKESPEARE_CHARS = "\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"  # nanoGPT's 65


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def root_dir() -> Path:
    """The project's folder, where the scripts are run."""
    return ROOT_DIR


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return ROOT_DIR.parent / "shared"


@pytest.fixture(scope="session")
def trained_dir(shared_dir) -> Path:
    """The small GPT-2-architecture model trained on English prose (4 layers, 128 wide, 256 positions)."""
    return shared_dir / "tiny-gpt2-en"


@pytest.fixture(scope="session")
def trained(trained_dir) -> GPT:
    """The trained model, loaded once for the whole run: tests must not change it (copy it first)."""
    return GPT.from_pretrained(str(trained_dir))


@pytest.fixture(scope="session")
def random_checkpoint(trained_dir) -> Callable[..., Path]:
    """write(folder, safe_serialization=True, seed=0, **GPT2Config arguments): a GPT-2 checkpoint with random
    weights saved by transformers' save_pretrained, with the trained model's tokenizer files beside it as a hub
    repository has them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def write(folder: Path, safe_serialization: bool = True, seed: int = 0, **config) -> Path:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**config)).eval()
        model.save_pretrained(folder)
        if not safe_serialization:  # transformers 5 writes safetensors only: write the pickle as version 4 did
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
        for name in ("vocab.json", "merges.txt"):
            (folder / name).write_bytes((trained_dir / name).read_bytes())
        return folder

    return write


@pytest.fixture(scope="session")
def char_checkpoint() -> Callable[..., Path]:
    """write(folder, meta="plain", dataset="shakespeare_char"): a small character-level nanoGPT checkpoint (65
    tokens, saved as nanoGPT's train.py saves one) as folder/ckpt.pt, with meta.pkl beside it: nanoGPT's own for
    its characters (meta="plain"), none (None), or the bytes given, or the object given, pickled."""
    from model import GPTConfig

    def write(folder: Path, meta: object = "plain", dataset: str = "shakespeare_char") -> Path:
        config = GPTConfig(block_size=32, vocab_size=len(SHAKESPEARE_CHARS), n_layer=1, n_head=2, n_embd=16)
        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model": GPT(config).state_dict(), "model_args": vars(config), "config": {"dataset": dataset}},
                   folder / "ckpt.pt")
        if meta == "plain":
            meta = {"vocab_size": len(SHAKESPEARE_CHARS), "itos": dict(enumerate(SHAKESPEARE_CHARS)),
                    "stoi": {c: i for i, c in enumerate(SHAKESPEARE_CHARS)}}
        if meta is not None:
            (folder / "meta.pkl").write_bytes(meta if isinstance(meta, bytes) else pickle.dumps(meta))
        return folder / "ckpt.pt"

    return write


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, random_checkpoint) -> Path:
    """A 2-layer random GPT-2 with a short context, for fast end-to-end runs."""
    return random_checkpoint(tmp_path_factory.mktemp("small"), n_layer=2, n_head=2, n_embd=64, n_positions=64)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (tiny models, as the subprocesses and torchrun ranks get): on a
    small machine shared with other jobs, torch's spinning worker threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_script(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """run(script, *args): the project's script (sample.py, bench.py, attention.py) run as `python script args`
    would run it, but in this process, sharing its torch import: (exit status, stdout, stderr)."""

    def run(script: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [script, *args])
        monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # startup.quiet_startup's, undone after the run
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # and its signal handlers
        try:
            runpy.run_path(str(ROOT_DIR / script), run_name="__main__")
            status = 0
        except SystemExit as exit_info:
            status = exit_info.code
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="session")
def hf_model():
    """load(folder): transformers' GPT2LMHeadModel of a checkpoint folder, the oracle, in eval mode."""
    from transformers import GPT2LMHeadModel

    return lambda folder: GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def assert_same_logits():
    """check(ours, theirs, T=64, B=2): logits for every position within 1e-4 of transformers', the loss within
    1e-5, and the last-position logits of a plain call."""

    def check(ours: GPT, theirs, T: int = 64, B: int = 2) -> None:
        idx = torch.randint(0, ours.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, _ = ours(idx, all_logits=True)
            expected = theirs(idx).logits
            assert logits.shape == expected.shape
            assert (logits - expected).abs().max().item() <= 1e-4
            # The loss for given targets: ours predicts idx[1:] from idx[:-1]; transformers shifts labels itself.
            _, loss = ours(idx[:, :-1], targets=idx[:, 1:])
            assert abs(loss.item() - theirs(idx, labels=idx).loss.item()) <= 1e-5
            last, none = ours(idx)
            assert none is None and last.shape == (B, 1, ours.config.vocab_size)
            assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-5)  # a 1-row matmul rounds differently

    return check


@pytest.fixture(scope="session")
def cache_copies() -> Callable[[str], list[str]]:
    """copies(code): the lines of one graph's code as Inductor wrote it (torch._inductor.utils.run_and_get_code)
    that copy a KV cache input or allocate a buffer of a layer's cache shape; none where the compiled pass writes
    the cache in place. The cache inputs are the graph's inputs of 4 or more dimensions (weights have 1 or 2, ids
    and positions 2); a layer's shape is their last 4 (sizes may be symbols, in a graph compiled for any shape).
    In the static case a buffer as large as a layer's cache counts too, whatever its shape."""

    def copies(code: str) -> list[str]:
        call = code[re.search(r"def call\(", code).start():]  # the wrapper that runs the kernels, after them
        inputs = dict(re.findall(r"assert_size_stride\((arg\d+_1), \(([^()]*)\)", call))
        cache = {name: tuple(d.strip() for d in dims.split(",") if d.strip()) for name, dims in inputs.items()}
        cache = {name: dims[-4:] for name, dims in cache.items() if len(dims) >= 4}
        assert cache, "no KV cache input in this graph: is it a pass over the cache?"
        sizes = [math.prod(map(int, dims)) for dims in cache.values() if all(d.isdigit() for d in dims)]
        found = []
        for line in call.splitlines():
            allocation = re.search(r"= empty_strided\w*\(\(([^()]*)\)", line)
            if allocation:
                dims = tuple(d.strip() for d in allocation.group(1).split(",") if d.strip())
                big = sizes and all(d.isdigit() for d in dims) and math.prod(map(int, dims)) >= min(sizes)
                if dims in cache.values() or big:
                    found.append(line.strip())
            elif "copy_" in line and any(re.search(rf"\b{name}\b", line) for name in cache):
                found.append(line.strip())
        return found

    return copies


@pytest.fixture
def two_gpus(monkeypatch) -> list:
    """CUDA as this machine would show it with a T4 (compute capability 7.5) as cuda:0, the current device, and an
    A100 (8.0) as cuda:1; torch.cuda.is_bf16_supported() answers as torch's does for the T4, counting emulation.
    Returns the devices torch.cuda.set_device is given."""
    current = [0]
    capability = {0: (7, 5), 1: (8, 0)}

    def index(device=None) -> int:
        return current[0] if device is None or torch.device(device).index is None else torch.device(device).index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[index(device)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: ["Tesla T4", "A100"][index(device)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    chosen = []

    def set_device(device) -> None:
        chosen.append(device)
        current[0] = torch.device(device).index

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return chosen


@pytest.fixture
def old_cache_alive(monkeypatch) -> list[bool]:
    """For each KV cache that generation makes from here on, whether an earlier one was still in memory then (after
    a garbage collection): a new static cache must not be taken while the old one is held."""
    import generate
    from model import KVCache

    made, alive = [], []

    class Watched(KVCache):
        def __init__(self, *args, **kwargs):
            gc.collect()
            alive.append(any(ref() is not None for ref in made))
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self.k[0]))

    monkeypatch.setattr(generate, "KVCache", Watched)
    return alive


@pytest.fixture(scope="session")
def hub_style_tensors(hf_model):
    """tensors(folder, prefix, buffers): a saved checkpoint's tensors renamed as older GPT-2 repositories store
    them: with or without the 'transformer.' prefix, no lm_head, and per-block causal-mask buffers."""

    def tensors(folder: Path, prefix: str, buffers: tuple[str, ...]) -> dict:
        model = hf_model(folder)
        renamed = {}
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight":
                continue
            renamed[prefix + name.removeprefix("transformer.")] = tensor.clone()
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            for buffer in buffers:
                renamed[f"{prefix}h.{i}.attn.{buffer}"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        return renamed

    return tensors


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """run(script, *args, nproc=2, timeout=180): the script under `torchrun --standalone` (a free port, so runs
    beside other jobs do not collide) as nproc processes on this CPU (gloo), one thread each."""

    def run(script: str, *args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   script, *args]
        return subprocess.run(command, cwd=ROOT_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=timeout)

    return run
