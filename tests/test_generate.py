"""Generation: the KV cache against the no-cache reference and transformers' generate; sampling against the
analytic distribution; stop tokens, streaming, batches and argument checks; the thread chooser."""

import math
import os
import time

import pytest
import torch
from transformers import GPT2LMHeadModel

from generate import ThreadChooser
from model import GPT, GPTConfig, KVCache
from sampling import sample_next_token


@pytest.fixture(scope="module")
def short_context_model() -> GPT:
    """Random weights, block_size 48: 200+ new tokens run well past the context."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 4])
def test_cache_equals_no_cache_reference_past_block_size(short_context_model, batch):
    idx = prompts(batch, 10, 97)
    cached = short_context_model.generate(idx, 220, temperature=0)
    reference = short_context_model.generate(idx, 220, temperature=0, use_kv_cache=False)
    assert cached.shape == (batch, 230)
    assert torch.equal(cached, reference)
    assert torch.equal(cached[:, :10], idx)


def test_sampled_cache_equals_no_cache_reference(short_context_model):
    idx = prompts(1, 5, 97)
    options = dict(temperature=1.0, top_k=50, top_p=0.9, num_samples=3, seed=7)
    assert torch.equal(short_context_model.generate(idx, 100, **options),
                       short_context_model.generate(idx, 100, use_kv_cache=False, **options))


def test_static_cache_equals_dynamic_cache(short_context_model):
    """The compiled path's cache layout (whole buffer under a mask), run eagerly, token for token."""
    model = short_context_model
    idx = prompts(2, 7, 97)
    expected = model.generate(idx, 30, temperature=0)[:, 7:]
    cache = KVCache(model.config, 2, model.config.block_size, torch.float32, torch.device("cpu"), static=True)
    with torch.no_grad():
        token = model.prefill(idx, torch.tensor([7, 7]), cache).argmax(-1)
        tokens = [token]
        for pos in range(7, 36):
            token = model.decode_step(token[:, None], torch.full((2, 1), pos), cache)[:, -1].argmax(-1)
            tokens.append(token)
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def hf_greedy(folder, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None  # a plain fixed-length greedy run (see ../shared/README.md)
    return hf.generate(idx, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(idx),
                       pad_token_id=0)


def test_greedy_equals_transformers_on_trained_model(trained, trained_dir):
    idx = torch.tensor([[50256, 464, 2196, 286, 11361, 318]])  # <|endoftext|>The history of Python is
    ours = trained.generate(idx, 150, temperature=0)
    assert torch.equal(ours, hf_greedy(trained_dir, idx, 150))


def test_greedy_equals_transformers_on_124m_shape(tmp_path, random_checkpoint):
    folder = random_checkpoint(tmp_path, seed=3)
    idx = prompts(1, 16, 50257)
    ours = GPT.from_pretrained(str(folder)).generate(idx, 24, temperature=0)
    assert torch.equal(ours, hf_greedy(folder, idx, 24))


def test_batched_samples_share_one_prefill(trained):
    idx = torch.tensor([[50256, 464]])
    out = trained.generate(idx, 20, temperature=1.0, num_samples=4, seed=0)
    assert out.shape == (4, 22) and torch.equal(out[:, :2], idx.expand(4, 2))
    assert len({tuple(row.tolist()) for row in out}) > 1  # rows draw their own noise


def test_same_seed_same_tokens(trained):
    idx = torch.tensor([[50256]])
    a = trained.generate(idx, 30, temperature=0.8, top_k=200, seed=1337)
    b = trained.generate(idx, 30, temperature=0.8, top_k=200, generator=torch.Generator().manual_seed(1337))
    c = trained.generate(idx, 30, temperature=0.8, top_k=200, seed=1338)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_row_generators_make_rows_independent_of_their_batch(trained):
    """With a generator per row, a row draws what it draws alone (a one-row batch with seed=s), whatever else is
    in its batch and in what order. Rows of a batch of 7 round differently from a batch of one (logits within
    about 6e-6), which changes no token here."""
    idx = prompts(7, 9, 50257)
    seeds = [100 + i for i in range(7)]
    options = dict(temperature=1.0, top_k=200, top_p=0.95)

    def rows(order: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seeds[i]) for i in order]
        return trained.generate(idx[order], 24, generators=generators, **options)

    together = rows(list(range(7)))
    assert len({tuple(row.tolist()) for row in together}) == 7
    for i in (0, 3, 6):
        assert torch.equal(together[i], trained.generate(idx[i:i + 1], 24, seed=seeds[i], **options)[0])
    assert torch.equal(rows([6, 2, 0]), together[[6, 2, 0]])


def test_prompt_longer_than_context_keeps_its_end(short_context_model):
    long_prompt = prompts(1, 60, 97)
    out = short_context_model.generate(long_prompt, 5, temperature=0)
    cropped = short_context_model.generate(long_prompt[:, -48:], 5, temperature=0)
    assert torch.equal(out[:, :60], long_prompt) and torch.equal(out[:, 60:], cropped[:, 48:])


def test_stop_tokens_end_rows_independently(trained):
    idx = torch.tensor([[50256, 464]])
    free = trained.generate(idx, 60, temperature=1.0, num_samples=6, seed=3)
    stop = int(free[0, 5])  # a token that row 0 draws at its 4th step
    out = trained.generate(idx, 60, temperature=1.0, num_samples=6, seed=3, stop_tokens=[stop])
    ended_at = []
    for row_free, row in zip(free, out):
        hits = (row_free[2:] == stop).nonzero()
        if len(hits):
            end = 2 + int(hits[0])
            ended_at.append(end)
            assert torch.equal(row[:end + 1], row_free[:end + 1])  # identical up to and including the stop token
            assert (row[end:] == stop).all()  # then padded with it
        else:
            assert torch.equal(row, row_free[:len(row)])
    assert ended_at and min(ended_at) == 5
    # The batch stops when every row has ended, or after 60 steps.
    assert out.size(1) == (max(ended_at) + 1 if len(ended_at) == 6 else 62)


def test_batch_stops_when_every_row_has_ended(trained):
    idx = torch.tensor([[50256]])
    greedy = trained.generate(idx, 10, temperature=0)
    out = trained.generate(idx, 10, temperature=0, num_samples=2, stop_tokens=[int(greedy[0, 3])])
    assert out.shape == (2, 4) and torch.equal(out[0], greedy[0, :4])


def test_stream_yields_what_generate_returns(trained):
    idx = torch.tensor([[50256, 464]])
    options = dict(temperature=0.9, top_p=0.95, num_samples=3, seed=11, stop_tokens=[13])
    steps = list(trained.generate_stream(idx, 40, **options))
    out = trained.generate(idx, 40, **options)
    assert all(step.shape == (3,) for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), out[:, 2:])


def test_zero_new_tokens(trained):
    idx = torch.tensor([[50256, 464]])
    assert torch.equal(trained.generate(idx, 0), idx)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(num_samples=0), "num_samples must be >= 1"),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx is empty"),
    (dict(idx=torch.tensor([[5, 97]])), r"outside the vocabulary: they must be in 0..96"),
    (dict(idx=torch.tensor([[5, -1]])), r"outside the vocabulary"),
    (dict(idx=torch.tensor([5, 6])), r"\(batch, length\) tensor"),
    (dict(generators=[torch.Generator()] * 2), r"one generator per output row \(1\), got 2"),
    (dict(seed=1, generators=[torch.Generator()]), "give one of seed, generator and generators"),
])
def test_bad_arguments_are_named(short_context_model, kwargs, message):
    args = dict(idx=torch.tensor([[1, 2]]), max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        short_context_model.generate(**args)


# ---------------------------------------------------------------------------------------------------------------
# Sampling against the analytic distribution.

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0])
DRAWS = 40_000


def expected_probs(temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """Written out from the definitions, without the code under test."""
    p = torch.softmax(LOGITS.double() / temperature, dim=0)
    keep = torch.ones(len(p), dtype=torch.bool)
    order = torch.argsort(p, descending=True)  # LOGITS are distinct: a strict ranking
    if top_k is not None:
        keep[order[top_k:]] = False
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    if top_p is not None:
        mass = 0.0
        for i in order.tolist():  # keep the most likely tokens until their mass reaches top_p
            if mass >= top_p:
                keep[i] = False
            mass += p[i].item()
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square (Wilson-Hilferty): a false alarm once in ten thousand runs."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.7, None, None), (1.5, None, None), (1.0, 4, None), (1.0, None, 0.8),
    (0.8, 6, 0.9), (2.0, 3, 0.5),
])
def test_sampling_matches_analytic_distribution(temperature, top_k, top_p):
    logits = LOGITS.expand(DRAWS, -1)
    draws = sample_next_token(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    p = expected_probs(temperature, top_k, top_p)
    assert counts[p == 0].sum() == 0, "drew a token outside the top-k / nucleus set"
    support = p > 0
    expected = DRAWS * p[support]
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert statistic < chi_square_critical(int(support.sum()) - 1)


def test_nucleus_edge_cases():
    # One token above top_p: only it is ever drawn. top_p=1 keeps everything.
    logits = torch.tensor([[5.0, 0.0, 0.0]]).expand(2000, -1)
    assert (sample_next_token(logits, 1.0, None, 0.5, torch.Generator().manual_seed(0)) == 0).all()
    draws = sample_next_token(torch.zeros(3000, 3), 1.0, None, 1.0, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}


def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 1000)
    assert torch.equal(sample_next_token(logits, 0.0, 5, 0.5), logits.argmax(-1))


def test_settings_per_row_draw_what_each_row_draws_alone():
    """Rows with their own temperature, top-k and top-p in one call: each row's token is the one its settings
    draw for it alone, from its own generator (which is left where drawing alone leaves it)."""
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    settings = [(0.8, 200, None), (0.0, None, None), (1.0, None, 0.9), (0.8, 200, None), (1.3, 5, 0.5),
                (1.0, None, None)]
    temperature, top_k, top_p = (list(s) for s in zip(*settings))
    together = [torch.Generator().manual_seed(i) for i in range(6)]
    alone = [torch.Generator().manual_seed(i) for i in range(6)]
    for _ in range(3):
        drawn = sample_next_token(logits, temperature, top_k, top_p, generators=together)
        for i, (t, k, p) in enumerate(settings):
            assert drawn[i] == sample_next_token(logits[i:i + 1], t, k, p, generators=alone[i:i + 1])[0]
    # One setting for every row, given per row: the batch is drawn as with scalars.
    same = sample_next_token(logits, [0.8] * 6, 200, [None] * 6, torch.Generator().manual_seed(1))
    assert torch.equal(same, sample_next_token(logits, 0.8, 200, None, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="one value per row"):
        sample_next_token(logits, [0.8] * 5)


def test_compiled_decode_equals_eager(cache_copies):
    """compile=True: the decode step compiled over the static cache, prefill compiled for any length. Both write
    every layer's cache in place: Inductor's code for them (on the CPU here; test_gpu.py on a GPU) allocates no
    buffer of a layer's cache shape and copies no cache (a cache of one tensor for all layers, written a layer's
    slice at a time, took 7 such buffers in this 2-layer decode step, and 4 in the prefill)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=53, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = prompts(2, 6, 53)
    for length in (6, 4):  # a second prompt length reuses the compiled decode step and cache
        expected = model.generate(idx[:, :length], 40, temperature=0)
        if length == 6:  # 6 + 40 positions: window slides too, through the compiled prefill
            compiled, codes = run_and_get_code(model.generate, idx, 40, temperature=0, compile=True)
            assert len(codes) == 2  # the prefill and the decode step
            assert [cache_copies(code) for code in codes] == [[], []]
        else:
            compiled = model.generate(idx[:, :length], 40, temperature=0, compile=True)
        assert torch.equal(compiled, expected)
    options = dict(temperature=1.0, top_k=10, num_samples=2, seed=5)
    assert torch.equal(model.generate(idx[:1], 20, compile=True, **options), model.generate(idx[:1], 20, **options))



def test_a_new_static_cache_is_taken_only_once_the_old_one_is_freed(monkeypatch, old_cache_alive):
    """compile=True keeps one static cache (block_size long) on the model; a generation of another batch size
    needs a new one, and the old one's memory must be free first: both at once may not fit. torch.compile is the
    identity here, so this checks generation's own references; test_gpu.py checks it through compiled CUDA
    graphs."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    model = GPT(GPTConfig(block_size=16, vocab_size=53, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = prompts(2, 3, 53)
    model.generate(idx, 4, compile=True)
    model.generate(idx, 4, compile=True)  # the same batch: the same cache
    model.generate(idx[:1], 4, compile=True)  # another batch size: a new cache
    assert old_cache_alive == [False, False]


# ---------------------------------------------------------------------------------------------------------------
# The decode step over the KV cache: rows at their own positions, several new positions a step, positions taken back.


def decode_positions(model: GPT, prompt_rows: list, new: list, groups: int = 1) -> torch.Tensor:
    """Prefill ragged prompts, then feed each row its `new` tokens in one decode step, its attention in `groups`
    runs of rows; logits [B, S, V]."""
    from generate import padded
    cache = KVCache(model.config, len(prompt_rows), model.config.block_size, torch.float32, torch.device("cpu"))
    cache.groups = groups
    idx, lengths = padded(prompt_rows)
    with torch.no_grad():
        model.prefill(idx, lengths, cache)
        cache.lengths[:] = lengths
        tokens = torch.stack(new)
        return model.decode_step(tokens, cache.positions(tokens.size(1)), cache)


@pytest.mark.parametrize("batch, groups", [(1, 1), (10, 1), (10, 3)])
def test_decode_step_logits_equal_the_plain_forward(trained, batch, groups):
    """Each row at its own length, 1 and 4 new positions a step, attention in one run of rows or in three (each
    over the keys up to its own longest row): logits within 1e-5 of the forward pass over the whole sequence (no
    cache)."""
    g = torch.Generator().manual_seed(batch)
    rows = [torch.randint(0, 50257, (int(n),), generator=g) for n in torch.randint(1, 60, (batch,), generator=g)]
    for steps in (1, 4):
        new = [torch.randint(0, 50257, (steps,), generator=g) for _ in rows]
        got = decode_positions(trained, rows, new, groups)
        for b, (p, n) in enumerate(zip(rows, new)):
            with torch.no_grad():
                expected = trained(torch.cat([p, n])[None], all_logits=True)[0][0, -steps:]
            torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)


def test_runs_of_rows_see_up_to_their_longest_and_a_moved_row_decodes_as_before(trained):
    """KVCache.visible: three runs of rows over 8 rows, each up to its own longest row plus the new positions; a
    row moved to another (KVCache.move) gives there the logits it gave where it was."""
    from generate import padded
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 50257, (n,), generator=g) for n in (3, 5, 4, 20, 21, 30, 9, 1)]
    cache = KVCache(trained.config, 8, 64, torch.float32, torch.device("cpu"))
    cache.groups = 3
    new = torch.randint(0, 50257, (8, 1), generator=g)
    with torch.no_grad():
        trained.prefill(*padded(rows), cache)
        cache.lengths[:] = torch.tensor([r.numel() for r in rows])
        assert cache.visible(1) == [(0, 2, 6), (2, 5, 22), (5, 8, 31)]
        before = trained.decode_step(new, cache.positions(1), cache)
        cache.move(5, 0)
        assert cache.lengths[0] == 30
        moved = trained.decode_step(new[[5, 1, 2, 3, 4, 5, 6, 7]], cache.positions(1), cache)
    torch.testing.assert_close(moved[0], before[5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved[1:5], before[1:5], atol=1e-5, rtol=1e-5)


def test_decode_and_prefill_in_one_pass_equal_each_apart(trained):
    """Packed: a decode step of rows at their own lengths and new prompts (rectangles of one length each) written
    into other rows, in one pass, give the logits and the cache each gives apart (within 1e-5)."""
    from generate import padded
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 50257, (n,), generator=g) for n in (3, 17, 9, 30)]
    new = torch.randint(0, 50257, (4, 1), generator=g)
    prompts = [torch.randint(0, 50257, (n,), generator=g) for n in (12, 12, 25)]  # two of one length: a rectangle
    caches = [KVCache(trained.config, 4, 64, torch.float32, torch.device("cpu")) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            trained.prefill(*padded(rows), cache)
            cache.lengths[:] = torch.tensor([r.numel() for r in rows])
        parts = [(torch.stack(prompts[:2]), torch.tensor([3, 0])), (prompts[2][None], torch.tensor([2]))]
        step, first = trained.decode_and_prefill(new, caches[0].positions(1), caches[0], parts)
        alone = trained.decode_step(new, caches[1].positions(1), caches[1])
        torch.testing.assert_close(step[1], alone[1], atol=1e-5, rtol=1e-5)  # row 1 goes on: the only one kept
        for prompt, row, logits in zip(prompts, (3, 0, 2), torch.cat(first)):
            expected = trained.prefill(prompt[None], torch.tensor([prompt.numel()]), caches[1], torch.tensor([row]))
            torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=1e-5)
            for layer in range(trained.config.n_layer):
                for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
                    torch.testing.assert_close(a[layer][row, :, :prompt.numel()], b[layer][row, :, :prompt.numel()],
                                               atol=1e-5, rtol=1e-5)


def test_lowered_lengths_take_positions_back(trained):
    """Positions past a row's length are unseen: after a step of 4, lowering the length by 3 and feeding other
    tokens gives the logits of the sequence without the dropped ones (a draft's rejected tokens)."""
    from generate import padded
    prompt, fed, other = torch.tensor([464, 3290, 318]), torch.tensor([257, 922, 290, 1110]), torch.tensor([11, 13])
    cache = KVCache(trained.config, 1, 64, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        trained.prefill(*padded([prompt]), cache)
        cache.lengths[:] = 3
        trained.decode_step(fed[None], cache.positions(4), cache)
        cache.lengths[:] = 3 + 1  # keep the first fed token, drop three
        got = trained.decode_step(other[None], cache.positions(2), cache)[0]
    expected = trained(torch.cat([prompt, fed[:1], other])[None], all_logits=True)[0][0, -2:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=3)])
def test_prompts_of_different_lengths_generate_as_each_alone(short_context_model, options):
    """A list of prompts of different lengths, batched: each row's tokens equal its prompt generated alone, past
    block_size too (rows slide their windows at different steps), with the cache and without."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 97, (n,), generator=g) for n in (3, 30, 11, 47)]
    options = dict(options)
    seed = options.pop("seed", None)
    for use_kv_cache in (True, False):
        if seed is not None:
            options["generators"] = [torch.Generator().manual_seed(100 + i) for i in range(len(rows))]
        together = short_context_model.generate(rows, 70, use_kv_cache=use_kv_cache, **options)
        assert [t.numel() for t in together] == [r.numel() + 70 for r in rows]
        for i, r in enumerate(rows):
            if seed is not None:
                options["generators"] = [torch.Generator().manual_seed(100 + i)]
            alone = short_context_model.generate(r[None], 70, **options)[0]
            assert torch.equal(together[i], alone), (i, use_kv_cache)


def test_prompt_list_with_stop_tokens_and_samples(trained):
    """One result per output row (samples of a prompt next to each other), each cut after the stop token that
    ended it, and equal to that prompt's own generate."""
    rows = [torch.tensor([50256]), torch.tensor([464, 3290, 318, 257])]
    out = trained.generate(rows, 40, temperature=0.8, num_samples=2, stop_tokens=[13, 50256],
                           generators=[torch.Generator().manual_seed(i) for i in range(4)])
    assert len(out) == 4
    for i, tokens in enumerate(out):
        prompt = rows[i // 2]
        alone = trained.generate(prompt[None], 40, temperature=0.8, stop_tokens=[13, 50256],
                                 generators=[torch.Generator().manual_seed(i)])[0]
        new = tokens[prompt.numel():]
        assert torch.equal(tokens[:prompt.numel()], prompt)
        if new[-1].item() in (13, 50256):
            assert not torch.isin(new[:-1], torch.tensor([13, 50256])).any()
        assert torch.equal(new, alone[prompt.numel():][:new.numel()])


def run_slots(model: GPT, slots: int, queue: list, packed: bool = True, **settings) -> list[torch.Tensor]:
    """Continuous batching as the prompts-file job does it, over Decoder: queue holds (prompt, new tokens, seed);
    a row that has its new tokens takes the next prompt at the next step (prefilled in that step's pass, or apart
    where packed=False, the compiled route), while the others go on; an idle row is parked. Each prompt's new
    tokens, in the queue's order."""
    from generate import Decoder, TokenHistory
    longest = max(p.numel() + n for p, n, _ in queue)
    block = model.config.block_size
    decoder = Decoder(model, slots, min(longest, block), torch.device("cpu"), compile=False)
    if not packed:
        decoder.decode_and_prefill = None
    history = TokenHistory.for_slots(slots, longest, block, torch.device("cpu"))
    running, made, todo = [None] * slots, [[] for _ in queue], list(range(len(queue)))
    generators = [torch.Generator() for _ in range(slots)]
    token = None
    with torch.no_grad():
        while todo or any(r is not None for r in running):
            take = [(row, todo.pop(0)) for row in [i for i, r in enumerate(running) if r is None][:len(todo)]]
            rows, prompts = torch.tensor([row for row, _ in take], dtype=torch.long), [queue[q][0] for _, q in take]
            if token is None:
                logits = decoder.admit(rows, prompts, history)
            else:
                logits = decoder.step(token, history, (rows, prompts) if take else None)
            for row, q in take:
                running[row] = q
                generators[row].manual_seed(queue[q][2])
            idle = torch.tensor([i for i, r in enumerate(running) if r is None], dtype=torch.long)
            if idle.numel():
                decoder.park(idle, history)
            token = sample_next_token(logits, generators=generators, **settings)
            history.append(token[:, None])
            for row, q in enumerate(running):
                if q is not None:
                    made[q].append(int(token[row]))
                    if len(made[q]) == queue[q][1]:
                        running[row] = None
    return [torch.tensor(m) for m in made]


@pytest.mark.parametrize("packed, settings", [(True, dict(temperature=0)), (True, dict(temperature=0.9, top_k=20)),
                                              (False, dict(temperature=0.9, top_k=20))])
def test_rows_admitted_mid_run_generate_as_each_prompt_alone(short_context_model, packed, settings):
    """Decoder.step(admit=...): a prompt started in a row while the other rows are part way (some past block_size,
    sliding their windows) makes the tokens it makes alone, and the rows that go on are not disturbed; parked rows
    at the end take no part. Packed into the step's pass, and prefilled apart (the compiled route)."""
    g = torch.Generator().manual_seed(2)
    queue = [(torch.randint(0, 97, (length,), generator=g), new, 50 + i)
             for i, (length, new) in enumerate([(5, 10), (40, 60), (12, 25), (44, 30), (2, 20), (30, 3), (7, 90)])]
    made = run_slots(short_context_model, 3, queue, packed, **settings)
    for (prompt, new, seed), tokens in zip(queue, made):
        alone = short_context_model.generate(prompt[None], new, generators=[torch.Generator().manual_seed(seed)],
                                             **settings)[0]
        assert torch.equal(tokens, alone[prompt.numel():]), (prompt.numel(), new)


# ---------------------------------------------------------------------------------------------------------------
# ThreadChooser, on a simulated machine: a fake clock that each step advances by what that step costs at the thread
# count it runs at, so the decisions are checked exactly and nothing is timed.


def simulate(cost_at, steps: int = 500, counts: tuple[int, int] = (2, 1)) -> list[int]:
    """The thread count each step ran at; cost_at(step) gives {count: seconds} for that step."""
    now = 0.0
    chooser = ThreadChooser(counts, clock=lambda: now)
    threads = torch.get_num_threads()
    used = []
    for i in range(steps):
        def step():
            nonlocal now
            now += cost_at(i)[torch.get_num_threads()]
            return torch.get_num_threads()
        used.append(chooser.run(step))
        assert torch.get_num_threads() == threads  # set for the step only
    return used


def steps_at(used: list[int], count: int) -> list[int]:
    return [i for i, c in enumerate(used) if c == count]


def test_thread_chooser_keeps_the_faster_count_and_retries_the_other_at_doubling_intervals():
    # Quiet: two threads 1.8x faster. One opening step at one thread, then retries 32, 64, 128, 256 steps apart.
    assert steps_at(simulate(lambda i: {2: 1.0, 1: 1.8}), 1) == [1, 34, 99, 228, 485]
    # A core busy: two threads 6x slower. A retry costs 5 steps more, so retries wait 32 x 5 = 160 steps at least.
    assert steps_at(simulate(lambda i: {2: 6.0, 1: 1.0}), 2) == [0, 162, 323, 484]


def test_thread_chooser_keeps_a_busy_core_s_cost_within_a_few_percent_on_a_short_run():
    # sample.py's default workload with a core busy: 300 steps, two threads 10x slower (bench.py --busy_core
    # measured 58.8 against 600.7 tokens/s). The opening step and one retry at two threads.
    used = simulate(lambda i: {2: 10.0, 1: 1.0}, steps=300)
    assert steps_at(used, 2) == [0, 290]
    assert sum(10.0 if c == 2 else 1.0 for c in used) < 1.07 * 300


def test_thread_chooser_takes_a_second_pair_when_the_first_is_close():
    used = simulate(lambda i: {2: 1.0, 1: 1.2})
    assert used[:5] == [2, 1, 2, 1, 2] and steps_at(used, 1) == [1, 3, 36, 101, 230, 487]


def test_thread_chooser_follows_load_that_comes_and_goes():
    # Quiet, then from step 100 a core busy (two threads 6x slower), quiet again from step 300.
    def cost_at(i):
        return {2: 6.0, 1: 1.0} if 100 <= i < 300 else {2: 1.0, 1: 1.8}

    used = simulate(cost_at, steps=1500)
    # Two slow steps in a row (over twice the recent median): one thread, two threads, one thread, judged on those
    # fresh steps; one thread wins.
    assert used[100:106] == [2, 2, 1, 2, 1, 1]
    assert steps_at(used[100:300], 2) == [0, 1, 3, 165]  # then two threads only on a retry, 160 steps on
    # Load gone: the next retry wins, confirmed by a second step, and two threads stay.
    assert used[300:426] == [1] * 126 and used[426:460] == [2] * 34
    spent = sum(cost_at(i)[c] for i, c in enumerate(used))
    assert spent < 1.1 * sum(min(cost_at(i).values()) for i in range(len(used)))  # within 10% of the best count


def test_thread_chooser_is_not_moved_by_a_burst_of_noise():
    # Two steps slow at either count (the host busy elsewhere for a moment), then quiet again. The trial's fresh step
    # at two threads shows the burst over: two steps at one thread, not the 32 of judging against the slow steps.
    used = simulate(lambda i: {2: 3.0, 1: 3.0} if i in (100, 101) else {2: 1.0, 1: 1.8}, steps=250)
    assert steps_at(used, 1) == [1, 34, 99, 102, 104, 169]


def test_thread_chooser_is_not_moved_by_one_interrupted_step():
    used = simulate(lambda i: {2: 6.0, 1: 30.0 if i == 200 else 1.0}, steps=400)
    assert steps_at(used, 2) == [0, 162, 323]


def test_thread_chooser_checks_the_count_it_starts_at_with_the_opening_pair():
    # cpu_thread_chooser asks parallel_waits first: with a core busy it starts at one thread, and the opening pair's
    # step at two threads (ten times slower) is the only one until the retry 288 steps on.
    assert steps_at(simulate(lambda i: {2: 10.0, 1: 1.0}, 300, counts=(1, 2)), 2) == [1, 290]
    # Told wrong (quiet, two threads faster: the host's noise fooled the probe), the opening pair finds out at once;
    # taking the verdict on trust cost 32 steps at one thread.
    used = simulate(lambda i: {2: 1.0, 1: 1.8}, 300, counts=(1, 2))
    assert used[:3] == [1, 2, 2] and steps_at(used, 1) == [0, 34, 99, 228]


def test_parallel_waits_with_a_core_busy():
    # A pinned spinner makes the busy case. A thread waking from sleep often runs ahead of the spinner and fools the
    # probe, the more so for probes back to back (5 of 20 in a row saw the busy core here, 19 of 20 taken 50 ms
    # apart, as generations take it), and generation then finds out from its opening steps; so the probe, 50 ms
    # apart, must see it at least once in ten, and a quiet machine is not tested (another program may share this
    # one).
    import generate
    from bench import BusyCore

    threads = torch.get_num_threads()
    if threads < 2 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    with BusyCore():
        time.sleep(0.3)
        assert any(generate.parallel_waits(threads) or time.sleep(0.05) for _ in range(10))
    assert torch.get_num_threads() == threads


def test_generation_starts_at_the_count_the_probe_favours(monkeypatch):
    # Busy: one thread first, so the prompts' pass runs there. Quiet: every core. Either is checked by the opening
    # pair of steps (the probe is fooled both ways now and then).
    import generate

    threads = 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(generate, "parallel_waits", lambda count: True)
    chooser = generate.cpu_thread_chooser(torch.device("cpu"), compile=False)
    assert (chooser.chosen, chooser.other, chooser.trials) == (1, threads, [1, threads])
    monkeypatch.setattr(generate, "parallel_waits", lambda count: False)
    chooser = generate.cpu_thread_chooser(torch.device("cpu"), compile=False)
    assert (chooser.chosen, chooser.other, chooser.trials) == (threads, 1, [threads, 1])
    assert generate.cpu_thread_chooser(torch.device("cpu"), compile=True) is None


def test_thread_chooser_runs_untimed_steps_at_the_chosen_count_while_a_trial_waits():
    # A prompts file admits prompts in most steps, and those steps are not timed. They ran at the count on trial,
    # unjudged, until a timed step came: on bench.py's spread file, 39 of 144 steps at one thread on a quiet machine.
    now = 0.0
    chooser = ThreadChooser((2, 1), clock=lambda: now)

    def step(seconds: dict = {2: 1.0, 1: 1.8}) -> int:
        nonlocal now
        now += seconds[torch.get_num_threads()]
        return torch.get_num_threads()

    assert chooser.run(step) == 2  # the opening pair's first step
    assert [chooser.run(step, timed=False) for _ in range(5)] == [2] * 5  # one thread is on trial: not here
    assert chooser.run(step) == 1  # the trial, at the next timed step
    assert chooser.run(step) == 2 and chooser.run(step, timed=False) == 2


def test_thread_chooser_restores_the_thread_count_when_the_step_fails():
    threads = torch.get_num_threads()
    chooser = ThreadChooser((threads + 1, 1))

    def fail():
        assert torch.get_num_threads() == threads + 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chooser.run(fail)
    assert torch.get_num_threads() == threads


def test_generation_on_a_cpu_chooses_threads_for_whole_turns(monkeypatch):
    timed = []
    original = ThreadChooser.run
    monkeypatch.setattr(ThreadChooser, "run", lambda self, *a, **k: timed.append(k["timed"]) or original(self, *a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.tensor([[1, 2, 3]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chosen = model.generate(idx, 7, temperature=0)
        assert timed == [False] + [True] * 6 and torch.get_num_threads() == 2  # the prefill, then 6 steps timed
        torch.set_num_threads(1)
        assert torch.equal(model.generate(idx, 7, temperature=0), chosen) and len(timed) == 7  # one thread: none
    finally:
        torch.set_num_threads(threads)


def test_the_draw_runs_at_the_chosen_thread_count(monkeypatch):
    # A busy core slows every multi-threaded operation, so the draw (top-k over the vocabulary) runs at the count
    # the chooser picked, as the network's pass does; test_batch checks the prompts-file job the same way.
    import generate
    import sampling

    seen = []
    original = sampling.sample_next_token
    monkeypatch.setattr(sampling, "sample_next_token",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or original(*a, **k))
    monkeypatch.setattr(generate, "ThreadChooser", lambda *args, **options: ThreadChooser((1, 1)))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)).eval()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0.8, top_k=20, seed=0)
        assert seen == [1] * 5 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
