"""model.py's Python API against wrong arguments (each a TypeError or ValueError that names the argument, and a model
left as it was), the token history's memory past any max_new_tokens, and compiled generation from several threads."""

import threading
import time

import pytest
import torch

import model as model_module
import sampling
from attention import forward_with_attention
from model import GPT, GPTConfig

VOCAB = 97
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, block_size: int = 48) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def tiny() -> GPT:
    """Shared by the tests that leave it as it was."""
    return tiny_model()


def prompt(length: int = 3, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
    (dict(temperature="0.8"), TypeError, "temperature must be a number"),
    (dict(top_k=5.5), TypeError, r"top_k must be an int >= 1 or None, got 5.5 \(float\)"),
    (dict(top_k=True), TypeError, "top_k must be an int"),
    (dict(top_p=float("nan")), ValueError, "top_p must be a finite number"),
    (dict(top_p="0.9"), TypeError, "top_p must be a number"),
    (dict(max_new_tokens=3.0), TypeError, r"max_new_tokens must be an int >= 0, got 3.0 \(float\)"),
    (dict(max_new_tokens=None), TypeError, "max_new_tokens must be an int"),
    (dict(num_samples=True), TypeError, r"num_samples must be an int >= 1, got True \(bool\)"),
    (dict(num_samples=2.0), TypeError, "num_samples must be an int"),
    (dict(stop_tokens=50256), TypeError, r"stop_tokens must be a list of token ids, such as \[50256\]"),
    (dict(stop_tokens="x"), TypeError, "stop_tokens must be a list"),
    (dict(stop_tokens=[VOCAB]), ValueError, r"each of stop_tokens must be in 0..96, got 97"),
    (dict(stop_tokens=[-1]), ValueError, "each of stop_tokens must be in 0..96"),
    (dict(stop_tokens=[1.5]), TypeError, "each of stop_tokens must be an int"),
    (dict(seed="x"), TypeError, r"seed must be an int .* got 'x' \(str\)"),
    (dict(seed=2 ** 64), ValueError, r"seed must be in -2\*\*63..2\*\*64-1"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(generator="g"), TypeError, "generator must be a torch.Generator"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(idx=[[1, 2]]), TypeError, r"idx must be a \(batch, length\) tensor .* torch.tensor\(\[ids\]\)"),
    (dict(idx=torch.ones(1, 2)), ValueError, r"idx must be .* of torch.float32"),
    (dict(idx=torch.ones(1, 2, 1, dtype=torch.long)), ValueError, "got 3 dimension"),
])
def test_generate_names_the_wrong_argument(tiny, kwargs, error, message):
    args = dict(idx=prompt(), max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        tiny.generate(**args)


@pytest.fixture(scope="module")
def meta_model() -> GPT:
    """A model on the meta device (shapes, no data): a device other than the CPU that any machine has."""
    with torch.device("meta"):
        return GPT(GPTConfig(block_size=48, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.mark.parametrize("on_meta_model, kwargs, message", [
    (False, dict(idx=prompt().to("meta")), r"idx is on meta but the model on cpu: .*idx.to\('cpu'\)"),
    (False, dict(idx=[prompt()[0].to("meta")]), "idx is on meta but the model on cpu"),
    (True, dict(idx=prompt()), r"idx is on cpu but the model on meta"),
    (True, dict(generator=torch.Generator()),
     r"generator is a cpu generator but the model is on meta: .*torch.Generator\(device='meta'\)"),
    (True, dict(generators=[torch.Generator()]), r"generators\[0\] is a cpu generator but the model is on meta"),
    (True, dict(generators=["g"]), r"generators\[0\] must be a torch.Generator"),
])
def test_generate_names_a_prompt_or_generator_on_another_device(tiny, meta_model, on_meta_model, kwargs, message):
    """Checked on entry, before anything runs on the model's device (else a RuntimeError after the prefill that
    names no argument). The meta device stands in for a GPU: the check is the same for cuda:1 against cuda:0."""
    model = meta_model if on_meta_model else tiny
    args = dict(idx=prompt().to(model.transformer.wte.weight.device), max_new_tokens=3)
    args.update(kwargs)
    error = TypeError if "must be a torch.Generator" in message else ValueError
    with pytest.raises(error, match=message):
        model.generate(**args)
    with pytest.raises(error, match=message):
        next(model.generate_stream(**args))


@pytest.mark.parametrize("idx, error, message", [
    (torch.tensor([[5, VOCAB]]), ValueError, r"outside the vocabulary: they must be in 0..96, got 5..97"),
    (torch.tensor([[-3, 5]]), ValueError, r"got -3..5"),
    (torch.tensor([[1.0, 2.0]]), ValueError, "torch.float32"),
    (torch.tensor([1, 2]), ValueError, r"got 1 dimension\(s\).* ids\[None\]"),
    ([[1, 2]], TypeError, "idx must be a"),
])
def test_forward_checks_its_ids(tiny, idx, error, message):
    with pytest.raises(error, match=message):
        tiny(idx)
    with pytest.raises(error, match=message):
        forward_with_attention(tiny, idx)


def test_ids_are_checked_once_per_call_not_per_decoding_step(monkeypatch):
    """The range check waits for the device: generation checks its prompt on entry, and no step checks again."""
    model = tiny_model(block_size=8)
    calls = []
    check = sampling.check_token_ids
    for module in (model_module, sampling):  # forward's calls and check_generation_args' calls
        monkeypatch.setattr(module, "check_token_ids", lambda *a: calls.append(1) or check(*a))
    model.generate(prompt(), 20, temperature=0)  # past block_size: window steps too
    model.generate(prompt(), 20, temperature=0, use_kv_cache=False)
    assert len(calls) == 2


@pytest.mark.parametrize("size, error", [(0, ValueError), (49, ValueError), (10 ** 6, ValueError), (32.0, TypeError),
                                          ("32", TypeError), (True, TypeError), (None, TypeError)])
def test_crop_block_size_refusal_leaves_the_model_unchanged(tiny, size, error):
    idx = prompt(40)
    before = tiny(idx, all_logits=True)[0]
    with pytest.raises(error, match="block_size must be"):
        tiny.crop_block_size(size)
    assert tiny.config.block_size == 48 and tiny.transformer.wpe.weight.shape == (48, 32)
    assert torch.equal(tiny(idx, all_logits=True)[0], before)


def test_token_history_does_not_grow_with_max_new_tokens():
    """max_new_tokens=10**12: the history holds at most 2 x block_size tokens a row (a buffer of 10**12 would fail
    to allocate), and the tokens past several window slides equal the no-cache reference's."""
    model = tiny_model(block_size=8)
    idx = prompt(5, batch=2)
    expected = model.generate(idx, 40, temperature=0, use_kv_cache=False)[:, 5:]  # the window slides 37 times
    for use_kv_cache in (True, False):
        stream = model.generate_stream(idx, 10 ** 12, temperature=0, use_kv_cache=use_kv_cache)
        got = torch.stack([next(stream) for _ in range(40)], dim=1)
        stream.close()
        assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_compile_refuses_int8_and_fp16_weights(kind):
    quantized = getattr(tiny_model(), f"quantize_{kind}")()
    with pytest.raises(ValueError, match="compile=True does not take int8 weights or fp16 weights"):
        quantized.generate(prompt(), 3, compile=True)


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile as the identity, each decode step slowed a little so that threads interleave: the compiled
    path's sharing (one static cache per model) without minutes of compiling on a CPU."""

    def fake_compile(fn, **options):
        def step(*args):
            time.sleep(0.002)
            return fn(*args)
        return step

    monkeypatch.setattr(torch, "compile", fake_compile)


def test_compiled_generation_from_two_threads_gives_each_its_own_tokens(eager_compile):
    model = tiny_model(1)
    prompts = [prompt(4, seed=1), prompt(6, seed=2)]
    expected = [model.generate(p, 30, temperature=0) for p in prompts]
    model.generate(prompts[0], 1, compile=True)  # warmed up, as a server would be: the threads find its static cache
    results = [None, None]
    start_together = threading.Barrier(2)

    def work(i):
        start_together.wait()
        results[i] = model.generate(prompts[i], 30, temperature=0, compile=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_a_second_compiled_stream_in_one_thread_is_refused(eager_compile):
    model = tiny_model(2)
    open_stream = model.generate_stream(prompt(), 5, temperature=0, compile=True)
    next(open_stream)
    with pytest.raises(RuntimeError, match="a compiled generate_stream is still open in this thread"):
        model.generate(prompt(), 5, temperature=0, compile=True)
    open_stream.close()  # its turn ends: compiled generation works again
    compiled = model.generate(prompt(), 5, temperature=0, compile=True)
    assert torch.equal(compiled, model.generate(prompt(), 5, temperature=0))


@pytest.mark.slow
def test_really_compiled_generation_from_two_threads():
    model = tiny_model(3)
    prompts = [prompt(4, seed=3), prompt(4, seed=4)]
    expected = [model.generate(p, 10, temperature=0) for p in prompts]
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, model.generate(prompts[i], 10, temperature=0, compile=True))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(r is not None and torch.equal(r, e) for r, e in zip(results, expected))
