"""peers.py without the peer engines installed (as in CI): each absent engine is named with how to install it, and
bench.py --peers skips it in one line and runs everything else."""

import subprocess
import sys

import peers


def test_missing_engines_are_named_with_their_install_command(monkeypatch):
    monkeypatch.setattr(peers, "find_spec", lambda name: None)
    assert peers.missing() == {"CTranslate2": "pip install ctranslate2",
                               "llama.cpp": peers.ENGINES["llama.cpp"][1]}
    assert "pip install gguf llama-cpp-python" in peers.missing()["llama.cpp"]
    monkeypatch.setattr(peers, "find_spec", lambda name: None if name == "gguf" else object())
    assert list(peers.missing()) == ["llama.cpp"]  # it needs both of its packages


def test_open_peers_with_no_engine_installed_opens_none(monkeypatch):
    monkeypatch.setattr(peers, "find_spec", lambda name: None)
    with peers.open_peers(None, {}, 1) as engines:
        assert engines == []


def test_bench_peers_skips_absent_engines_in_one_line_each(root_dir, monkeypatch):
    absent = peers.missing()  # what this environment lacks (everything, in CI)
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--peers", "--dtype=float32", "--quantize=None",
                           "--batch_sizes=1", "--workload=False", "--reference=False"], cwd=root_dir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for engine in peers.ENGINES:
        if engine in absent:
            assert f"peers: {engine} skipped, not installed ({absent[engine]})" in done.stdout
            assert f"(p) {engine}" not in done.stdout
        else:
            assert f"(p) {engine}" in done.stdout


def test_llama_instructions_lists_what_its_build_uses(monkeypatch):
    """bench.py's machine line says which instruction sets llama.cpp was built for (an AVX2-only build measured on an
    AVX-512 machine must say so): the features its system info marks 1, none where it is not installed."""
    import types

    monkeypatch.setattr(peers, "find_spec", lambda name: None)
    assert peers.llama_instructions() is None
    monkeypatch.setattr(peers, "find_spec", lambda name: object())
    info = b"CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | AVX512_VNNI = 0 | F16C = 1 | OPENMP = 1 | "
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(llama_print_system_info=lambda: info))
    assert peers.llama_instructions() == "SSE3 AVX AVX2 F16C OPENMP"
