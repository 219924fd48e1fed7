"""GPU checks (skipped without CUDA), each against a defect a CPU cannot show: the compiled path (CUDA graphs)
against the plain forward, its cache written in place and freed before a new one, bfloat16 against float32, a
decode loop that never waits on the host (eager and compiled), streamed text, a second GPU, and two processes
over NCCL.

`python bench.py --gpu_check` runs them with bench.py's cuda rows in under 8 minutes; alone, `python -m pytest -m
gpu -v`. CI has no GPU and skips them (the `gpu` marker); the CPU tests check what can be checked without one.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

from model import GPT, GPTConfig
from runtime import native_bf16

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def trained_cuda(trained_dir) -> GPT:
    """The trained model in float32 on cuda:0, shared: a test that changes it works on a copy."""
    return GPT.from_pretrained(str(trained_dir)).to("cuda:0")


def tiny(device: str = "cuda:0") -> GPT:
    """Random weights, 64 positions: 100 new tokens after a 9-token prompt slide the windows from step 56."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=64)).eval().to(device)


def prompts(batch: int, device: str = "cuda:0") -> torch.Tensor:
    return torch.randint(0, 101, (batch, 9), generator=torch.Generator().manual_seed(0)).to(device)


def greedy_misses(reference: GPT, sequence: torch.Tensor, prompt_len: int, tol: float) -> list[tuple[int, int]]:
    """(row, position) of every token of sequence past prompt_len that is not reference's greedy choice to within
    tol: teacher-forced, its logits from the plain forward over the window before it (the last block_size tokens,
    no cache), short of the largest by more than tol. A near-tie may go either way on float rounding; a path that
    goes wrong, at once or after many steps, misses by far more."""
    block = reference.config.block_size
    misses = []
    with torch.no_grad():
        for p in range(prompt_len, sequence.size(1)):
            logits = reference(sequence[:, max(0, p - block):p])[0][:, -1].float()  # [B, V]
            gap = logits.max(dim=-1).values - logits.gather(1, sequence[:, p:p + 1])[:, 0]
            misses += [(row, p) for row in (gap > tol).nonzero()[:, 0].tolist()]
    return misses


# ---------------------------------------------------------------------------------------------------------------
# Float32: every path against the plain forward; the compiled path's cache


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_eager_paths_follow_the_plain_forward_in_float32(use_kv_cache):
    model = tiny()
    out = model.generate(prompts(4), 100, temperature=0, use_kv_cache=use_kv_cache)
    assert out.shape == (4, 109) and greedy_misses(model, out, 9, 1e-3) == []


def test_compiled_path_follows_the_plain_forward_and_writes_the_cache_in_place(cache_copies):
    """compile=True (CUDA graphs): every token of 100 steps, past the context, is the plain forward's greedy
    choice; and Inductor's code for the decode step and the prefill allocates no buffer of a layer's cache shape
    and copies no cache (a copy moves several times the cache's bytes a step, and holds a cache's worth more in the
    CUDA graphs' pool)."""
    from torch._inductor.utils import run_and_get_code

    model = tiny()
    out, codes = run_and_get_code(model.generate, prompts(4), 100, temperature=0, compile=True)
    assert out.shape == (4, 109) and greedy_misses(model, out, 9, 1e-3) == []
    assert len(codes) >= 2  # the decode step and the prefill (of prompts and of sliding windows)
    assert [cache_copies(code) for code in codes] == [[]] * len(codes)


def test_a_new_static_cache_is_taken_only_once_the_old_one_is_freed(old_cache_alive):
    """Another batch size needs a new static cache: the old one, which the captured CUDA graphs wrote, must be
    freed first (both at once may not fit)."""
    model = tiny()
    model.generate(prompts(4), 10, temperature=0, compile=True)
    before = torch.cuda.memory_allocated()
    model.generate(prompts(3), 10, temperature=0, compile=True)
    assert old_cache_alive == [False, False]
    cache_bytes = 2 * 2 * 3 * 64 * 64 * 4  # keys and values, 2 layers, 3 rows, 64 positions, 64 wide, float32
    assert torch.cuda.memory_allocated() - before < cache_bytes  # what the 4-row cache held is free again


# ---------------------------------------------------------------------------------------------------------------
# Half precision


def test_auto_dtype_follows_each_gpus_native_bfloat16():
    from runtime import pick_dtype

    for i in range(torch.cuda.device_count()):
        native = bool(torch.version.hip) or torch.cuda.get_device_capability(i)[0] >= 8
        assert pick_dtype("auto", torch.device(f"cuda:{i}")) == (torch.bfloat16 if native else torch.float16)


def test_bfloat16_is_refused_without_native_support(root_dir, trained_dir):
    if native_bf16(torch.device("cuda:0")):
        pytest.skip("this GPU computes bfloat16 natively")
    done = run_sample(root_dir, trained_dir, "--device=cuda:0", "--dtype=bfloat16", "--max_new_tokens=2")
    assert done.returncode == 2 and "has no native bfloat16" in done.stderr


def test_bfloat16_agrees_with_float32_on_trained_model(trained_cuda):
    """Teacher-forced top-1 agreement over a greedy float32 continuation (bf16 rounding may flip near-ties only),
    then the compiled bfloat16 path's own tokens against float32's greedy choice after them, over its first and
    its last 100 steps apart: a compiled path that goes wrong after 100 steps fails."""
    if not native_bf16(torch.device("cuda:0")):
        pytest.skip("this GPU has no native bfloat16")
    idx = torch.tensor([[50256, 464, 2196, 286, 11361, 318]], device="cuda:0")
    sequence = trained_cuda.generate(idx, 200, temperature=0)
    weights = trained_cuda.lm_head.weight.detach().clone()
    bf16 = copy.deepcopy(trained_cuda).to(torch.bfloat16)  # a copy: .float() would not bring float32's weights back
    with torch.no_grad():
        reference = trained_cuda(sequence, all_logits=True)[0].argmax(-1)
        agreement = (bf16(sequence, all_logits=True)[0].argmax(-1) == reference).float().mean().item()
        compiled = bf16.generate(idx, 200, temperature=0, compile=True)
        choice = trained_cuda(compiled[:, :-1], all_logits=True)[0].argmax(-1)[0, 5:]  # for compiled[0, 6:]
    assert agreement >= 0.95
    follows = (choice == compiled[0, 6:]).float()
    assert follows[:100].mean().item() >= 0.9 and follows[100:].mean().item() >= 0.9
    assert trained_cuda.lm_head.weight.dtype == torch.float32 and torch.equal(trained_cuda.lm_head.weight, weights)


# ---------------------------------------------------------------------------------------------------------------
# The decode loop never waits for the GPU


@pytest.mark.parametrize("workload, compile", [("sampling", False), ("sliding", False), ("sliding", True)])
def test_decode_loop_never_waits_on_the_host(trained_cuda, workload, compile):
    """After the first step (prefill and set-up may wait once) no step waits for the GPU: sampling with top-k and
    top-p on the trained model, and greedy rows past the tiny model's context, which slide their windows every
    step (eager, and compiled: a compiled prefill for each window, the decode step a CUDA graph). Compiled, a
    first run compiles and captures the graphs before the watched one (the shapes of the compiled test above,
    whose compilations Inductor's cache keeps). Sampling runs outside the compiled graphs: eager covers it."""
    if workload == "sampling":
        model, idx, steps = trained_cuda, torch.tensor([[50256]], device="cuda:0"), 50
        options = dict(temperature=0.8, top_k=200, top_p=0.95, num_samples=4, seed=0, compile=compile)
    else:
        model, idx, steps, options = tiny(), prompts(4), 100, dict(temperature=0, compile=compile)
    if compile:
        for _ in model.generate_stream(idx, steps, **options):  # warm-up: compilation waits, and may
            pass
    stream = model.generate_stream(idx, steps, **options)
    next(stream)
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait inside the loop now raises
    try:
        rest = [token for token in stream]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == steps - 1


# ---------------------------------------------------------------------------------------------------------------
# Scripts: streamed text, a second GPU, two processes


def run_sample(root_dir, trained_dir, *args: str, runner: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *runner, "sample.py", f"--init_from={trained_dir}", *args], cwd=root_dir,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("device", ["cuda", pytest.param("cuda:1", marks=two_gpus)])
def test_sample_streams_the_same_text_on_a_gpu(root_dir, trained_dir, device):
    """The live path copies each step's tokens to the host behind the next step and waits on an event for them:
    on cuda:1, an event recorded on cuda:0 (the current GPU, unless the chosen one is made current) is done at
    once, and the host reads the pinned memory before the copy lands. Streamed and piped text must be the same."""
    def run(stream: bool) -> str:
        done = run_sample(root_dir, trained_dir, f"--device={device}", "--num_samples=3", "--max_new_tokens=40",
                          "--stop_at_eot=True", f"--stream={stream}")
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run(True) == run(False)


@two_gpus
@pytest.mark.parametrize("compile", [False, True])
def test_generation_on_the_second_gpu(compile):
    """The model and prompts on cuda:1 while cuda:0 is current: every path as on cuda:0, and a CUDA generator
    draws for either GPU (torch checks a generator's device type, as generate_stream does, not its index)."""
    with torch.cuda.device(0):
        model = tiny("cuda:1")
        out = model.generate(prompts(4, "cuda:1"), 100, temperature=0, compile=compile)
        assert out.device == torch.device("cuda:1") and greedy_misses(model, out, 9, 1e-3) == []
        options = dict(temperature=1.0, top_k=20, compile=compile)
        drawn = [model.generate(prompts(2, "cuda:1"), 30, generator=torch.Generator(d).manual_seed(5), **options)
                 for d in ("cuda:1", "cuda:0")]
        assert torch.equal(*drawn)


@two_gpus
def test_bench_waits_for_the_gpu_it_times():
    """bench.py's clock reads wait for the GPU being timed: queued products on cuda:1 are done after sync('cuda:1'),
    whichever GPU is current."""
    import bench

    with torch.cuda.device(0):
        x = torch.randn(4096, 4096, device="cuda:1")
        for _ in range(200):
            x @ x
        bench.sync("cuda:1")
        assert torch.cuda.current_stream(torch.device("cuda:1")).query()


def test_bench_cuda_rows_report_the_gpus_memory(root_dir):
    import json

    done = subprocess.run([sys.executable, "bench.py", "--quick", "--json", "--device=cuda", "--dtype=float32",
                           "--quantize=None", "--batch_sizes=1", "--workload=False"], cwd=root_dir,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["identical"] and report["device"] == "cuda"
    ours = next(r for r in report["results"] if r["system"] == "(a) ours float32")
    assert ours["memory_growth_mb"] > 0  # its KV cache and activations, on the GPU (the host's RSS would not see)


@two_gpus
def test_prompts_file_on_two_gpus_through_nccl(root_dir, trained_dir, tmp_path):
    """torchrun, 2 processes: each takes cuda:LOCAL_RANK, NCCL forms the default group and gloo carries the part
    files; in float32 the file equals one process's. --device=cuda:1 is refused there (each rank would take it,
    and NCCL refuses a GPU shared by two ranks)."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("".join(f"Section {i} of the license says\n" for i in range(12)), encoding="utf-8")
    args = [f"--prompts={prompts_file}", "--dtype=float32", "--num_samples=2", "--max_new_tokens=16", "--seed=7"]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    one = run_sample(root_dir, trained_dir, *args, f"--out={tmp_path / 'one.jsonl'}", "--device=cuda")
    two = run_sample(root_dir, trained_dir, *args, f"--out={tmp_path / 'two.jsonl'}", "--device=cuda",
                     runner=torchrun)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert "on 2 processes" in two.stderr
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    refused = run_sample(root_dir, trained_dir, *args, f"--out={tmp_path / 'x.jsonl'}", "--device=cuda:1",
                         runner=torchrun)
    assert refused.returncode != 0 and "under torchrun: every process would take that one GPU" in refused.stderr
