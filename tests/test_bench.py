"""bench.py end to end in its --quick mode: every system runs, and the float32 greedy tokens of ours, transformers'
and the no-cache reference are identical."""

import json
import subprocess
import sys



def test_quick_bench_runs_every_system_with_identical_tokens(root_dir):
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--json"], cwd=root_dir, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["identical"] is True
    systems = {(r["system"], r["batch"]) for r in report["results"]}
    for batch in (1, 10):
        for system in ("(a) ours float32", "(b) transformers float32", "(a) ours int8", "(a) ours fp16",
                       "(a) ours bfloat16", "(b) transformers bfloat16"):
            assert (system, batch) in systems
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
