"""Speculative decoding (generate's draft=): greedy tokens identical to plain decoding, sampled tokens distributed as
the model's own (a chi-square test against the distribution written out from the model's logits), seeds, stop
tokens, the draft kept on the model, and wrong arguments."""

import itertools
import math

import pytest
import torch

from generate import draft_costs, draft_length, draft_model
from linear import Int8Linear, decode_bytes
from model import GPT, GPTConfig


def random_prompts(sizes: tuple[int, ...], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in sizes]


@pytest.fixture(scope="module")
def gpt2_shape() -> GPT:
    """GPT-2 124M's shape with random weights, its context cropped to 32 positions so that runs cross it quickly."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257)).eval()
    model.crop_block_size(32)
    return model


@pytest.mark.parametrize("draft", ["int8", "fp16"])
def test_greedy_equals_plain_decoding_on_trained_model(trained, draft):
    """One prompt, then ten of different lengths, a little past block_size (256), where speculation stops (each
    step there re-reads a window of 256 positions per row)."""
    idx = torch.tensor([[50256, 464, 2196, 286, 11361, 318]])
    stats = {}
    assert torch.equal(trained.generate(idx, 260, temperature=0, draft=draft, draft_tokens=4, stats=stats),
                       trained.generate(idx, 260, temperature=0))
    assert stats["rounds"] > 0 and stats["tokens"] > 2 * stats["rounds"]  # it did speculate, and it paid
    rows = random_prompts((1, 5, 9, 13, 17, 21, 25, 29, 33, 40), 50257)
    stats = {}
    spec = trained.generate(rows, 225, temperature=0, draft=draft, draft_tokens=3, stats=stats)
    plain = trained.generate(rows, 225, temperature=0)
    assert all(torch.equal(a, b) for a, b in zip(spec, plain))
    assert stats["tokens"] > 2 * stats["rounds"] * len(rows)


@pytest.mark.parametrize("batch", [1, 10])
def test_greedy_equals_plain_decoding_on_124m_shape(gpt2_shape, batch):
    """Past the context too, by a few tokens (each step there re-reads a window of 32 positions per row)."""
    rows = random_prompts((8, 3, 12, 5, 6, 1, 9, 4, 2, 7)[:batch], 50257, seed=batch)
    stats = {}
    new_tokens = 28 if batch == 1 else 24
    spec = gpt2_shape.generate(rows, new_tokens, temperature=0, draft="int8", draft_tokens=4, stats=stats)
    plain = gpt2_shape.generate(rows, new_tokens, temperature=0)
    assert all(torch.equal(a, b) for a, b in zip(spec, plain))
    assert stats["tokens"] > 2 * stats["rounds"] * batch


def test_another_gpt_as_draft_and_its_shorter_context(trained):
    """A different model (the trained one cropped to 32 positions, quantized) as the draft: speculation runs while
    the draft's context holds the rows, and the tokens stay the model's."""
    draft = GPT(trained.config.__class__(**vars(trained.config)))
    draft.load_state_dict(trained.state_dict())
    draft.eval().crop_block_size(32)
    draft.quantize_int8()
    idx = torch.tensor([[50256, 464]])
    stats = {}
    out = trained.generate(idx, 60, temperature=0, draft=draft, draft_tokens=4, stats=stats)
    assert torch.equal(out, trained.generate(idx, 60, temperature=0))
    assert 0 < stats["rounds"] < 10  # rounds only while the rows fit the draft's 32 positions


def test_draft_length_makes_the_most_tokens_per_time_in_a_simulation():
    """draft_length's choice against rounds simulated by drawing each proposal's acceptance: within 2% of the best
    k's tokens per unit of time (a round costs k draft steps and one model step of `cost` draft steps; k = 0, a
    plain step, makes one token for `cost`)."""
    g = torch.Generator().manual_seed(0)
    for a, cost in ((1.0, 4.0), (0.98, 4.0), (0.89, 4.0), (0.89, 2.0), (0.6, 4.0), (0.2, 4.0), (0.9, 1.0)):
        def simulated(k: int) -> float:
            if k == 0:
                return 1 / cost
            accepted = (torch.rand(20_000, k, generator=g) < a).int().cumprod(dim=1).sum(dim=1)
            return float((accepted + 1).float().mean()) / (k + cost)

        rates = [simulated(k) for k in range(9)]
        chosen = draft_length(int(a * 10**6), 10**6, 1.0, cost, cost, 8)
        assert rates[chosen] >= 0.98 * max(rates), (a, cost, chosen, rates)
    assert draft_length(0, 0, 1.0, 1.0, 1.0, 8) == 0  # a draft as costly as the model never pays
    # A check of several positions dearer than a plain step (a CPU's float32 products of 2-10 rows: 1.6x one row).
    assert draft_length(89, 100, 1.0, 1.6, 1.0, 8) == 0 and draft_length(89, 100, 0.25, 1.6, 1.0, 8) > 0


def test_the_draft_length_weighs_the_acceptance_against_the_weight_bytes(trained):
    """The costs are the bytes each step reads (an int8 copy: about a quarter of float32's), never timings, so that
    a seed repeats a sampled run: the same stats give the same length."""
    draft = draft_model(trained, "int8")
    ratio = decode_bytes(trained) / decode_bytes(draft)
    assert 3 < ratio < 4.1
    for accepted, proposed in ((0, 0), (900, 1000), (10, 1000)):
        assert draft_length(accepted, proposed, *draft_costs(trained, draft), 8) == draft_length(
            accepted, proposed, 1.0, ratio, ratio, 8)
    assert draft_length(10, 1000, *draft_costs(trained, draft), 8) == 0


def test_a_draft_that_is_never_accepted_falls_back_to_plain_steps(trained):
    """A draft of random weights (int8, a quarter of the model's bytes) proposes what the model never picks: after
    a few rounds the acceptance seen says plain steps are faster, and the rest are plain."""
    torch.manual_seed(1)
    draft = GPT(trained.config.__class__(**vars(trained.config))).eval().quantize_int8()
    idx = torch.tensor([[50256, 464]])
    stats = {}
    out = trained.generate(idx, 60, temperature=0, draft=draft, stats=stats)
    assert torch.equal(out, trained.generate(idx, 60, temperature=0))
    assert 0 < stats["rounds"] < 15 and stats["accepted"] <= 2, stats


def test_stop_tokens_and_streaming_with_a_draft(trained):
    """Rows end at their own stop tokens as in plain decoding (the batch stops when all have), and the stream yields
    one token a row at a time, as generate returns them; for a list of prompts, each row is cut after its stop."""
    idx = torch.stack(random_prompts((3, 3, 3), 50257, seed=5))
    free = trained.generate(idx, 40, temperature=0)
    options = dict(temperature=0, stop_tokens=[int(free[0, 3 + 6]), int(free[2, 3 + 20])], num_samples=2)
    plain = trained.generate(idx, 40, **options)
    assert plain.size(1) < 3 + 40  # the batch did stop early
    steps = list(trained.generate_stream(idx, 40, draft="int8", **options))
    assert all(s.shape == (6,) for s in steps) and torch.equal(torch.stack(steps, dim=1), plain[:, 3:])
    rows = random_prompts((4, 11, 2), 50257, seed=6)
    free = trained.generate(rows, 40, temperature=0)
    options["stop_tokens"] = [int(free[0][4 + 6]), int(free[2][2 + 20])]
    spec = trained.generate(rows, 40, draft="int8", **options)
    assert all(torch.equal(a, b) for a, b in zip(spec, trained.generate(rows, 40, **options)))


def test_a_seed_makes_a_run_repeatable(trained):
    idx = torch.tensor([[50256, 464]])
    options = dict(temperature=0.9, top_k=100, top_p=0.95, num_samples=3, draft="int8")
    a = trained.generate(idx, 40, seed=7, **options)
    assert torch.equal(a, trained.generate(idx, 40, generator=torch.Generator().manual_seed(7), **options))
    assert not torch.equal(a, trained.generate(idx, 40, seed=8, **options))


# ---------------------------------------------------------------------------------------------------------------
# Sampling: the first new tokens of many independent rows, against the model's own distribution written out.

VOCAB = 6
NEW = 3  # tokens per row: with 2 proposals a round, the third is the round's own token after two accepted
DRAWS = 30_000


def small_model(noise: float = 0.0) -> GPT:
    """A one-layer model over 6 tokens with weights large enough for peaked, varied next-token distributions; with
    noise, the same weights plus noise of that deviation (a draft that agrees with it in part)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.6).add_(noise * torch.randn_like(p))
    return model


def filtered(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The next-token distribution from the definitions, without the code under test."""
    p = torch.softmax(logits.double() / temperature, dim=0)
    order = torch.argsort(p, descending=True).tolist()
    keep = set(order[:top_k] if top_k else order)
    p = torch.tensor([p[i] if i in keep else 0.0 for i in range(len(p))], dtype=torch.float64)
    p = p / p.sum()
    if top_p is not None:
        mass, nucleus = 0.0, set()
        for i in order:
            if mass < top_p:
                nucleus.add(i)
            mass += p[i].item()
        p = torch.tensor([p[i] if i in nucleus else 0.0 for i in range(len(p))], dtype=torch.float64)
        p = p / p.sum()
    return p


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square (Wilson-Hilferty): a false alarm once in ten thousand runs."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(temperature: float, top_k, top_p) -> tuple[float, float, dict]:
    """30,000 rows sample 3 tokens each, with another model as the draft (so that proposals are rejected): the
    chi-square statistic of the counts of each 3-token sequence against the model's probability of it (the
    product of its three next-token distributions), its critical value, and the speculation's counts."""
    model, other = small_model(), small_model(noise=0.1)  # the draft accepts 60-70% of its proposals
    prompt = torch.tensor([[1, 4]])
    stats = {}
    out = model.generate(prompt, NEW, temperature, top_k, top_p=top_p, num_samples=DRAWS, seed=0, draft=other,
                         draft_tokens=2, stats=stats)[:, 2:]
    expected = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB), repeat=NEW):
            logits = model(torch.cat([prompt, torch.tensor([seq])], dim=1), all_logits=True)[0][0, 1:]
            expected[seq] = math.prod(filtered(logits[i], temperature, top_k, top_p)[t].item()
                                      for i, t in enumerate(seq))
    counts = {}
    for seq in map(tuple, out.tolist()):
        counts[seq] = counts.get(seq, 0) + 1
    assert all(expected[seq] > 0 for seq in counts), "drew a sequence the model cannot make"
    # Sequences expected under 5 times are pooled into one bin, as the chi-square approximation needs.
    bins, pooled_expected, pooled_count = [], 0.0, 0
    for seq, p in expected.items():
        if DRAWS * p >= 5:
            bins.append((counts.get(seq, 0), DRAWS * p))
        else:
            pooled_expected, pooled_count = pooled_expected + DRAWS * p, pooled_count + counts.get(seq, 0)
    if pooled_expected > 0:
        bins.append((pooled_count, pooled_expected))
    return sum((c - e) ** 2 / e for c, e in bins), chi_square_critical(len(bins) - 1), stats


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.8, 4, None), (1.3, None, 0.8)])
def test_sampled_tokens_follow_the_models_distribution(temperature, top_k, top_p):
    statistic, critical, stats = chi_square(temperature, top_k, top_p)
    assert 0.3 * stats["proposed"] < stats["accepted"] < 0.9 * stats["proposed"]  # both branches were taken
    assert statistic < critical


def test_the_chi_square_test_catches_a_sampler_without_the_accept_test(monkeypatch):
    """Accepting every proposal gives the draft's distribution, not the model's: the same test fails by far."""
    import generate

    original = generate.accept_or_resample

    def accept_all(p, q, proposed, sampling):
        tokens, _ = original(p, q, proposed, sampling)  # its last column: a draw from p after the proposals
        return torch.cat([proposed, tokens[:, -1:]], dim=1), torch.full((proposed.size(0),), proposed.size(1))

    monkeypatch.setattr(generate, "accept_or_resample", accept_all)
    statistic, critical, stats = chi_square(1.0, None, None)
    assert stats["accepted"] == stats["proposed"] and statistic > 10 * critical


# ---------------------------------------------------------------------------------------------------------------
# The draft kept on the model, and wrong arguments.

def test_quantized_draft_is_made_once_and_shares_the_embeddings(trained):
    draft = draft_model(trained, "int8")
    assert draft_model(trained, "int8") is draft
    assert draft.transformer.wpe.weight is trained.transformer.wpe.weight
    assert draft.transformer.ln_f.weight is trained.transformer.ln_f.weight
    assert isinstance(draft.lm_head, Int8Linear) and isinstance(draft.transformer.h[0].mlp.c_fc, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for m in trained.modules())  # the model itself is untouched


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(draft="int4"), ValueError, "draft must be 'int8', 'fp16' or a GPT"),
    (dict(draft="int8", draft_tokens=0), ValueError, "draft_tokens must be in 1..64, got 0"),
    (dict(draft="int8", draft_tokens=10**18), ValueError, "draft_tokens must be in 1..64, got 1000000000000000000"),
    (dict(draft="int8", draft_tokens=2.5), TypeError, "draft_tokens must be an int"),
    (dict(draft="int8", use_kv_cache=False), ValueError, "a draft runs with the KV cache"),
    (dict(draft=GPT(GPTConfig(block_size=16, vocab_size=7, n_layer=1, n_head=1, n_embd=8))), ValueError,
     r"the draft's vocabulary \(7 tokens\) is not the model's \(97\)"),
])
def test_bad_draft_arguments_are_named(kwargs, error, message):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=1, n_embd=8)).eval()
    with pytest.raises(error, match=message):
        model.generate(torch.tensor([[1, 2]]), 3, **kwargs)


def test_a_quantized_model_takes_no_quantized_draft():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=1, n_embd=8)).eval().quantize_fp16()
    with pytest.raises(ValueError, match="already int8 or fp16"):
        model.generate(torch.tensor([[1, 2]]), 3, draft="int8")


# ---------------------------------------------------------------------------------------------------------------
# sample.py --draft and --draft_tokens

def test_sample_py_with_a_draft_writes_the_models_own_samples(run_script, trained_dir):
    """Greedy, the same text with an int8 draft, an fp16 draft and another model (the same one) as the draft; the
    speculation's figures on stderr."""
    args = [f"--init_from={trained_dir}", "--start=The history of", "--max_new_tokens=40", "--num_samples=2",
            "--temperature=0"]
    status, plain, _ = run_script("sample.py", *args)
    assert status == 0 and plain.count("---------------") == 2
    for draft in ("int8", "fp16", str(trained_dir)):
        status, out, err = run_script("sample.py", *args, f"--draft={draft}", "--draft_tokens=3")
        assert status == 0 and out == plain, draft
        assert "speculative decoding: " in err and "of the draft's tokens accepted" in err


@pytest.mark.parametrize("args, message", [
    (["--draft=int8", "--quantize=fp16"], "leaves no float model to copy"),
    (["--draft=int8", "--draft_tokens=0"], "--draft_tokens must be in 1..64, got 0"),
    (["--draft=int8", "--draft_tokens=10000000000"], "--draft_tokens must be in 1..64, got 10000000000"),
    (["--draft_tokens=3"], "--draft_tokens=3 without --draft"),
    (["--draft=no/such/model"], "--draft=no/such/model: "),
    (["--draft=int8", "--prompts=p.jsonl", "--out=o.jsonl"], "--draft is for sample.py's own samples"),
])
def test_sample_py_refuses_a_draft_that_cannot_serve(run_script, trained_dir, args, message):
    status, out, err = run_script("sample.py", f"--init_from={trained_dir}", "--max_new_tokens=5", *args)
    assert status == 2 and message in err and "Traceback" not in err and out == ""


def test_sample_py_refuses_a_draft_of_another_vocabulary(run_script, trained_dir, char_checkpoint, tmp_path):
    status, _, err = run_script("sample.py", f"--init_from={trained_dir}", "--max_new_tokens=5",
                                f"--draft={char_checkpoint(tmp_path)}")
    assert status == 2 and "has a vocabulary of 65 tokens and the model one of 50257" in err
