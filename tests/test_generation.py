"""Generation: the KV cache against the no-cache reference and transformers' generate; sampling against the
analytic distribution; stop tokens, streaming, batches and argument checks."""

import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from model import GPT, GPTConfig, KVCache, sample_next_token


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
        token = model.prefill(idx, cache).argmax(-1)
        tokens = [token]
        for pos in range(7, 36):
            token = model.decode_step(token[:, None], torch.tensor([pos]), cache).argmax(-1)
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


def test_compiled_decode_equals_eager():
    """compile=True: the decode step compiled over the static cache, prefill compiled for any length."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=53, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = prompts(2, 6, 53)
    for length in (6, 4):  # a second prompt length reuses the compiled decode step and cache
        expected = model.generate(idx[:, :length], 40, temperature=0)
        assert torch.equal(model.generate(idx[:, :length], 40, temperature=0, compile=True), expected)
    options = dict(temperature=1.0, top_k=10, num_samples=2, seed=5)
    assert torch.equal(model.generate(idx[:1], 20, compile=True, **options), model.generate(idx[:1], 20, **options))
