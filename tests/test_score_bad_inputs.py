"""score.py against sizes past the memory: windows batched within what the memory holds, however large batch_size
and logits_mb are, and an allocation that fails anyway named with the settings to lower (exit status 1, no
traceback). Its texts files are checked in test_score.py and test_batch.py."""

import pytest

import runtime
import score
from model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")
ALLOCATION_FAILED = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 1827545548 bytes. Error code 12 (Cannot allocate "
                                 "memory)")


def test_windows_batched_within_the_memory(small_dir, monkeypatch):
    """batch_size and logits_mb are caps: past the memory, the memory decides how many windows share a batch."""
    model = GPT.from_pretrained(str(small_dir))
    rows = []

    def score_batch(model, batch, firsts):
        rows.append(len(batch))
        return [0.0] * len(batch)

    monkeypatch.setattr(score, "score_batch", score_batch)
    window = 3 * 64 * 50257 * 4  # a 64-token window's logits, three times over
    monkeypatch.setattr(runtime, "available_memory", lambda dev: int(2.5 * window / 0.8))
    score.score_texts(model, [[1] * 64] * 5, 32, batch_size=10 ** 12, logits_mb=10 ** 12)
    assert rows == [2, 2, 1]


def test_memory_running_out(run_script, small_dir, tmp_path, monkeypatch):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "Hello there"}\n')
    monkeypatch.setattr(GPT, "forward", lambda self, *args, **kwargs: (_ for _ in ()).throw(ALLOCATION_FAILED))
    status, out, err = run_script("score.py", f"--init_from={small_dir}", f"--texts={texts}",
                                  f"--out={tmp_path / 'scores.jsonl'}")
    assert status == 1 and out == "" and "Traceback" not in err
    assert "score.py: error: out of memory (an allocation of 1,828 MB failed): lower --batch_size (now 8) or " \
           "--logits_mb (now 2048), or free some memory; the scores finished are kept: run the same command again " \
           "to go on" in err
