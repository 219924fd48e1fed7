"""
The log-probability and perplexity of each text in a file, and of the whole corpus, under a GPT-2 model:

    python score.py --init_from=gpt2 --texts=corpus.jsonl --out=scores.jsonl [--stride=512]
    torchrun --nproc_per_node=4 score.py --init_from=gpt2 --texts=corpus.jsonl --out=scores.jsonl

The texts file is read as sample.py reads a prompts file (batch.py): `.jsonl` lines {"id": ..., "text": ...}, or
one text a line with `\\n` for a newline. Each text is scored with the sliding-window method of transformers'
perplexity guide: windows of block_size tokens start every `stride` tokens, and each window scores only the
tokens past the previous window's end, so every token after the first is scored exactly once, with at least
block_size - stride tokens of context once the text is longer than a window. (With stride = block_size the windows
do not overlap, and each window's first token goes unscored, as in the guide. The guide weights each window's mean
by its label count less one; here every token's log-probability is added up, which is the exact sum.)

Each line of --out holds the text's id, the tokens scored, their summed log-probability (natural log) and the
perplexity exp(-logprob / tokens) (null for a text of one token, which has nothing to score). The corpus's figures
(all tokens together) are printed to stdout as one JSON object. Windows of the same length share a batch, at most
batch_size of them and fewer where their logits would pass logits_mb or the memory available; the output is
resumable and sharded across torchrun's ranks as sample.py's prompts files are. A score depends on the batch it was
computed in only through float rounding (about 1e-7 relative).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below: Ctrl-C or SIGTERM while they load ends quietly
    from startup import quiet_startup

    quiet_startup()

import json
import math
import sys
from typing import TYPE_CHECKING, Iterator, Optional

from cli import memory_named, run_main
from configurator import configure
from errors import UsageError
from tokenizer import EOT

if TYPE_CHECKING:
    import tiktoken

    import batch

# -----------------------------------------------------------------------------
init_from: str = 'gpt2'  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub repo id, a model folder or a nanoGPT ckpt.pt
texts: str | None = None  # the texts file (.jsonl with "id" and "text", or text with one text a line)
out: str | None = None  # the JSONL file of per-text scores; rerun the same command to resume
stride: int | None = None  # tokens between window starts; None: half the model's context (block_size // 2)
batch_size: int = 8  # the most windows scored together
logits_mb: int = 2048  # the most memory one batch's logits (and their log-softmax) may take
device: str = 'auto'  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
dtype: str = 'float32'  # float32 (the default, for scores to compare), bfloat16, float16, or auto as sample.py
quantize: str | None = None  # int8 (per-row scales) or fp16 weights (CPU only); None keeps dtype's
tiktoken_file: str | None = None  # GPT-2's gpt2.tiktoken rank file (else $GPT2_TIKTOKEN_FILE, the model's vocab.json)
# -----------------------------------------------------------------------------


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) of each window over a text of n tokens: the window is tokens [begin, end), and it scores
    the tokens from `first` to end, each predicted from the window's tokens before it. A window's first token has
    no context in it and is never scored: token 0, and with stride = block_size each window's first (as in the
    guide, whose labels are shifted out of the window)."""
    spans, scored_to = [], 0
    for begin in range(0, n, stride):
        end = min(begin + block_size, n)
        first = max(scored_to, begin + 1)
        if end > first:
            spans.append((begin, end, first))
        scored_to = end
        if end == n:
            break
    return spans


def score_batch(model, rows: list[list[int]], firsts: list[int]) -> list[float]:
    """The summed log-probability of each row's tokens from its `first` on (rows of one length)."""
    import torch
    from torch.nn import functional as F

    device = model.transformer.wpe.weight.device
    idx = torch.tensor(rows, device=device)
    with torch.no_grad():
        logits = model(idx, all_logits=True)[0][:, :-1].float()  # position j predicts token j + 1
        # One row per position: cross_entropy over a [B, V, T] view (vocabulary in the middle) adds up its
        # log-softmax less accurately, 1e-4 nats a token on the trained model.
        logprobs = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1),
                                    reduction="none").view(len(rows), -1)  # [B, T - 1]
    return [logprobs[i, first - 1:].double().sum().item() for i, first in enumerate(firsts)]


def score_texts(model, texts: list[list[int]], stride: int, batch_size: int,
                logits_mb: int) -> list[tuple[float, int]]:
    """(summed log-probability, tokens scored) of each text. Windows of one length, from any of the texts, share
    a batch: at most batch_size, and fewer where their logits (three copies: the logits, their log-softmax, a
    float32 copy) would pass logits_mb or the memory available."""
    from runtime import MEMORY_SHARE, available_memory

    available = available_memory(model.transformer.wpe.weight.device)
    budget = logits_mb * 2 ** 20 if available is None else min(logits_mb * 2 ** 20, MEMORY_SHARE * available)
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    logprob, count = [0.0] * len(texts), [0] * len(texts)
    spans = sorted(((end - begin, t, begin, first) for t, ids in enumerate(texts)
                    for begin, end, first in windows(len(ids), block_size, stride)), reverse=True)
    while spans:
        length = spans[0][0]
        rows = max(1, min(batch_size, int(budget // (3 * length * vocab_size * 4))))
        chunk = [span for span in spans[:rows] if span[0] == length]
        spans = spans[len(chunk):]
        sums = score_batch(model, [texts[t][b:b + n] for n, t, b, _ in chunk], [f - b for _, _, b, f in chunk])
        for (n, t, b, f), value in zip(chunk, sums):
            logprob[t] += value
            count[t] += b + n - f
    return list(zip(logprob, count))


def main() -> int:
    if texts is None or out is None:
        raise UsageError("--texts and --out go together: --texts=corpus.jsonl --out=scores.jsonl")
    if batch_size < 1 or logits_mb < 1 or (stride is not None and stride < 1):
        raise UsageError(f"batch_size, logits_mb and stride must be >= 1, got {batch_size}, {logits_mb}, {stride}")
    import batch
    from runtime import load_model, pick_device

    items = batch.read_prompts(texts, "text")  # before the model loads: a bad file answers at once
    ranks = batch.start_ranks(device)
    model, enc = load_model(init_from, pick_device(ranks.device), dtype, quantize, tiktoken_file)
    with memory_named(f"lower --batch_size (now {batch_size}) or --logits_mb (now {logits_mb}), or free some memory; "
                      f"the scores finished are kept: run the same command again to go on"):
        return score_file(model, enc, items, texts, out, ranks, stride, batch_size, logits_mb)


def score_file(model, enc: tiktoken.Encoding, items: list[batch.Prompt], texts: str, out: str, ranks: batch.Ranks,
               stride: Optional[int], batch_size: int, logits_mb: int) -> int:
    """Score this rank's share of the texts (items, read from the file `texts`) into out, resumably; rank 0 then
    prints the corpus's figures, and the ranks close. The exit status: 0, or 130 when interrupted (what was
    finished is kept for the next run)."""
    import batch
    from runtime import check_vocabulary

    step = model.config.block_size // 2 if stride is None else stride
    if step > model.config.block_size:
        raise UsageError(f"stride {step} is longer than the model's context of {model.config.block_size}: tokens "
                         f"between windows would go unscored")
    ids = [enc.encode(item.text, allowed_special={EOT}) for item in items]
    for item, tokens in zip(items, ids):
        check_vocabulary(tokens, model.config.vocab_size, f"{texts} line {item.line}: the text")

    keys = [(json.dumps(item.id),) for item in items]
    order = sorted(range(len(items)), key=lambda i: (len(ids[i]), i))  # texts of a length together
    mine = batch.share(order, lambda i: len(ids[i]) + 1, ranks)
    output = batch.Output(out, ranks, keys, [keys[i] for i in mine], lambda record: (json.dumps(record["id"]),))
    if output.finished():
        print(f"{out} already holds every score of {texts}: nothing to do", file=sys.stderr)
    else:
        done = output.resume()
        todo = [i for i in mine if keys[i] not in done]
        progress = batch.Progress(ranks, len(mine), len(mine) - len(todo), "text")

        def steps() -> Iterator[None]:
            for group in text_groups(todo, ids, model.config.block_size, step, batch_size * 4):
                scores = score_texts(model, [ids[i] for i in group], step, batch_size, logits_mb)
                for i, (logprob, n) in zip(group, scores):
                    output.write(json.dumps(dict(id=items[i].id, tokens=n, logprob=logprob,
                                                 perplexity=math.exp(-logprob / n) if n else None)))
                progress.update(len(group), len(group), sum(n for _, n in scores))
                yield

        if batch.run_job(output, progress, steps(), "texts") != 0:
            return 130
    if ranks.rank == 0:  # the corpus: every token of every text together
        records = [json.loads(line) for line in open(out, encoding="utf-8")]
        n, total = sum(r["tokens"] for r in records), sum(r["logprob"] for r in records)
        print(json.dumps(dict(texts=len(records), tokens=n, logprob=total,
                              perplexity=math.exp(-total / n) if n else None)))
    ranks.close()
    return 0


def text_groups(todo: list[int], ids: list[list[int]], block_size: int, stride: int,
                max_windows: int) -> Iterator[list[int]]:
    """The texts to do, in groups of about max_windows windows (at least one text each): a group's windows are
    batched together and its texts' lines written when it is done."""
    group, count = [], 0
    for i in todo:
        group.append(i)
        count += len(windows(len(ids[i]), block_size, stride))
        if count >= max_windows:
            yield group
            group, count = [], 0
    if group:
        yield group


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    run_main(main)
