"""bench.py end to end in its --quick mode: every system runs, and the float32 greedy tokens of ours, transformers'
and the no-cache reference are identical. Its GPU side with CUDA's answers mocked: the device synchronised, the
GPU's peak allocation, bfloat16 refused without native support, and --gpu_check's parts and time limits."""

import json
import subprocess
import sys

import torch


def test_quick_bench_runs_every_system_with_identical_tokens(root_dir):
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--json"], cwd=root_dir, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["identical"] is True
    systems = {(r["system"], r["batch"]) for r in report["results"]}
    for batch in (1, 10):
        for system in ("(a) ours float32", "(b) transformers float32", "(a) ours int8", "(a) ours fp16",
                       "(a) ours bfloat16", "(b) transformers bfloat16", "(s) ours float32, int8 draft",
                       "(s) ours float32, fp16 draft"):
            assert (system, batch) in systems
    speculative = [r for r in report["results"] if r["system"].startswith("(s)")]
    assert all(0 < r["accepted"] <= 1 and 1 <= r["tokens_per_round"] for r in speculative)
    assert ("(c) ours no cache float32", 1) in systems
    for r in report["results"]:
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and 0 < r["roofline"]
    assert report["bandwidth_gb_s"]["median"] > 0
    assert report["workload"]["speedup"] > 0
    assert all("DIFFER" not in line for line in report["checks"])


def test_table_names_the_checks_and_the_estimate(root_dir):
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--dtype=float32", "--quantize=None",
                           "--batch_sizes=1", "--busy_core"], cwd=root_dir, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(a) ours vs (b) transformers: identical; (a) vs (c) no cache: identical" in done.stdout
    for setting in ("chosen", "1 thread"):  # float32: the only variant run here
        assert f"(f) busy core, float32, {setting}" in done.stdout
    assert "batch 1 decode, one core busy, ours chosen threads / the better fixed count (" in done.stdout
    assert "(f) sample.py's workload, one core busy, chosen threads / the better fixed count (" in done.stdout
    assert "ESTIMATED" in done.stdout and "read bandwidth" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# The GPU side, on this CPU: CUDA's answers mocked


def test_sync_waits_for_the_gpu_it_is_given(monkeypatch):
    """torch.cuda.synchronize() alone waits for the current GPU: timing cuda:1 from cuda:0 would not wait."""
    import bench

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    bench.sync("cuda:1")
    bench.sync("cpu")
    assert [torch.device(d) for d in waited] == [torch.device("cuda:1")]


def test_gpu_rows_report_the_gpus_peak_allocation(monkeypatch):
    """A cuda row's memory is torch.cuda.max_memory_allocated's peak over what was allocated when its warm-up
    began (the host's resident memory says nothing of a GPU's)."""
    import bench

    allocated = {"now": 500e6, "peak": 500e6}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocated.update(peak=500e6))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    with bench.peak_memory("cuda:1") as memory:
        allocated.update(peak=800e6)  # a KV cache and activations, freed again before the end
    assert isinstance(memory, bench.PeakGPU) and memory.growth_mb == 300
    assert isinstance(bench.peak_memory("cpu"), bench.PeakRSS)


def test_bfloat16_rows_are_refused_on_a_gpu_without_it(run_script, two_gpus):
    code, _, err = run_script("bench.py", "--device=cuda:0")  # the mocked T4; float32,bfloat16 by default
    assert code == 2
    assert ("--dtype=float32,bfloat16: Tesla T4 has no native bfloat16 (compute capability 7.5, under 8.0) and "
            "would time its emulation: use --dtype=float32,float16") in err


def test_gpu_check_needs_a_gpu(run_script):
    code, _, err = run_script("bench.py", "--gpu_check")
    assert code == 2 and "--gpu_check runs the checks that need a GPU, and CUDA is not available here" in err


def test_gpu_check_runs_every_gpu_test_and_the_cuda_rows_in_under_8_minutes(two_gpus):
    import bench

    for dev, half in ((torch.device("cuda:0"), "float16"), (torch.device("cuda:1"), "bfloat16")):
        parts = bench.gpu_check_parts(dev)
        commands = [" ".join(command) for _, command, _ in parts]
        assert "-m pytest -m gpu" in commands[0]
        assert all(f"bench.py --device={dev}" in c for c in commands[1:])
        assert f"--dtype=float32,{half}" in commands[1] and "--compile=True" in commands[2]
        assert sum(seconds for _, _, seconds in parts) <= 8 * 60 - 30  # its own start-up and the summary


def test_a_gpu_check_part_is_stopped_whole_at_its_time():
    import bench

    status, took = bench.run_part(["sh", "-c", "sleep 30 & sleep 30"], 1)
    assert status is None and took < 10
    assert bench.run_part([sys.executable, "-c", "raise SystemExit(3)"], 30)[0] == 3
