"""score.py: the sliding windows score every token once; perplexity against transformers' GPT2LMHeadModel run
through the loop of its perplexity guide; the same scores for other batch sizes and two processes."""

import json
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from score import windows
from tokenizer import EOT, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("block_size, stride", [(8, 1), (8, 3), (8, 4), (8, 8), (5, 2)])
def test_windows_score_every_token_once_with_enough_context(block_size, stride):
    for n in range(0, 40):
        scored = []
        for i, (begin, end, first) in enumerate(windows(n, block_size, stride)):
            assert 0 <= begin < first < end <= n and end - begin <= block_size
            if i > 0:
                assert first - begin >= block_size - stride  # a window's own context before what it scores
            scored += range(first, end)
        # Token 0 has nothing before it; nor, when the windows do not overlap, has the first of each window.
        assert scored == [t for t in range(1, n) if stride < block_size or t % block_size]


def guide_perplexity(folder, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide: labels of -100 over each window's context; every label counted."""
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    input_ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss  # the mean over the labels left after the shift
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.fixture
def texts_file(tmp_path, root_dir):
    heldout = (root_dir / "assets" / "heldout.txt").read_text(encoding="utf-8")  # 458 tokens: three windows
    texts = [{"id": "heldout", "text": heldout}, {"id": 2, "text": "Hello"}, {"text": "The license grants you"},
             {"id": "two", "text": heldout[:300]}]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    return path


def test_perplexity_equals_transformers_guide(run_script, trained_dir, texts_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    code, stdout, err = run_script("score.py", f"--init_from={trained_dir}", f"--texts={texts_file}",
                                   f"--out={out}", "--stride=128", "--device=cpu")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["heldout", 2, 3, "two"]
    enc = load_tokenizer(trained_dir)
    heldout = enc.encode(json.loads(texts_file.read_text().splitlines()[0])["text"], allowed_special={EOT})
    assert len(heldout) > 256 + 128  # three windows of 256 at stride 128
    expected, n = guide_perplexity(trained_dir, heldout, 256, 128)
    assert records[0]["tokens"] == n == len(heldout) - 1
    assert abs(records[0]["perplexity"] - expected) <= 1e-4 * expected
    assert records[1] == dict(id=2, tokens=0, logprob=0.0, perplexity=None)  # one token: nothing to score
    for r in records[2:]:
        assert math.isclose(r["perplexity"], math.exp(-r["logprob"] / r["tokens"]))
    corpus = json.loads(stdout)
    tokens, logprob = sum(r["tokens"] for r in records), sum(r["logprob"] for r in records)
    assert corpus["texts"] == 4 and corpus["tokens"] == tokens
    assert math.isclose(corpus["perplexity"], math.exp(-logprob / tokens))


def test_scores_agree_across_batch_sizes_and_processes(run_script, torchrun, trained_dir, texts_file, tmp_path):
    """The same figures to float rounding: windows share batches with others of their length."""
    runs = []
    for batch_size in (1, 3):
        out = tmp_path / f"bs{batch_size}.jsonl"
        code, _, err = run_script("score.py", f"--init_from={trained_dir}", f"--texts={texts_file}", f"--out={out}",
                                  "--stride=100", f"--batch_size={batch_size}", "--device=cpu")
        assert code == 0, err
        runs.append(out)
    out = tmp_path / "two.jsonl"
    run = torchrun("score.py", f"--init_from={trained_dir}", f"--texts={texts_file}", f"--out={out}",
                   "--stride=100", "--batch_size=3", "--device=cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 processes" in run.stderr
    runs.append(out)
    first, *others = [[json.loads(line) for line in path.read_text().splitlines()] for path in runs]
    for other in others:
        assert [(r["id"], r["tokens"]) for r in other] == [(r["id"], r["tokens"]) for r in first]
        for a, b in zip(first, other):
            assert math.isclose(a["logprob"], b["logprob"], rel_tol=1e-6)


def test_bad_texts_file(run_script, trained_dir, tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "wrong key"}\n')
    code, _, err = run_script("score.py", f"--init_from={trained_dir}", f"--texts={path}", f"--out={tmp_path / 'o'}")
    assert code == 2 and 'line 2 has no "text" string' in err
    code, _, err = run_script("score.py", f"--init_from={trained_dir}", f"--texts={path}")
    assert code == 2 and "--texts and --out go together" in err
