"""
Generation: the phases that drive the network of model.py, for the notebook API, the scripts and bench.py.

A generation reads top to bottom: each prompt becomes a row (prompts of different lengths padded on the right,
`padded`), each row's tokens are kept in a bounded history (`TokenHistory`), and a `Decoder` runs the phases over
one KV cache: `prefill` writes each prompt into its rows of the cache, `decode_step` feeds every row its newest token
at the row's own position, and a row that has filled the context slides its window (`slide`: its last block_size
tokens prefilled again, nanoGPT's meaning past the context). `generate_stream` is the loop over those phases; `generate` collects what it yields. Also here: the
thread count each CPU step runs at (ThreadChooser) and the rule of one compiled generation at a time.
"""

import statistics
import threading
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch

from linear import Fp16Linear, Int8Linear
from model import GPT, KVCache
from sampling import check_generation_args, sample_next_token

T = TypeVar("T")
Prompts = Union[torch.Tensor, Sequence[torch.Tensor]]


def padded(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one [B, T] batch padded on the right, and their lengths [B]. A padded
    position comes after every real one of its row, so causal attention keeps it out of the real positions."""
    lengths = torch.tensor([r.numel() for r in rows], device=rows[0].device)
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True), lengths


class TokenHistory:
    """Each row's tokens so far, for the windows that are recomputed from scratch (the no-cache reference, and a
    row past block_size). Written in place, one column a step, into at most twice block_size columns a row: when a
    row's are full, its older half goes, so the memory never grows with max_new_tokens."""

    def __init__(self, rows: Sequence[torch.Tensor], max_new_tokens: int, block_size: int):
        lengths = [r.numel() for r in rows]
        self.block_size = block_size
        self.seq = torch.zeros(len(rows), min(max(lengths) + max_new_tokens, 2 * block_size), dtype=torch.long,
                               device=rows[0].device)  # [B, columns]
        for i, r in enumerate(rows):
            self.seq[i, :r.numel()] = r
        self.kept = torch.tensor(lengths)  # [B] columns in use, on the host
        self.all_rows = torch.arange(len(rows), device=self.seq.device)

    def append(self, token: torch.Tensor) -> None:
        full = (self.kept == self.seq.size(1)).nonzero()[:, 0]  # only ever at 2 * block_size
        if full.numel():  # keep the newer half, all a window needs
            self.seq[full.to(self.seq.device), :self.block_size] = self.seq[full.to(self.seq.device), self.block_size:]
            self.kept[full] = self.block_size
        self.seq[self.all_rows, self.kept.to(self.seq.device)] = token
        self.kept += 1

    def windows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block_size tokens (or all, if fewer) of each row in `rows` (host indices), padded on the
        right as one batch [R, T], with their lengths [R]."""
        kept = self.kept[rows]
        lengths = kept.clamp(max=self.block_size)
        columns = (kept - lengths)[:, None] + torch.arange(int(lengths.max()))  # past a row's end: padding
        columns = torch.minimum(columns, (kept - 1)[:, None])
        device = self.seq.device
        return self.seq[rows.to(device)[:, None], columns.to(device)], lengths.to(device)


class Decoder:
    """The phases of one generation over one KV cache of `batch` rows: prefill, decode steps and window slides.
    Eager, or compiled over a static cache kept on the model between calls, so that its captured graphs (which
    hold the cache's addresses) are replayed rather than rebuilt."""

    def __init__(self, model: GPT, batch: int, max_len: int, device: torch.device, compile: bool):
        self.model = model
        dtype = model.transformer.wpe.weight.dtype  # the activations' (int8 or fp16 weights: float32)
        if not compile:
            self.cache = KVCache(model.config, batch, max_len, dtype, device)
            self.prefill, self.decode_step = model.prefill, model.decode_step
        else:
            self.cache, self.prefill, self.decode_step = compiled_phases(model, batch, dtype, device)
        self.input_pos = self.cache.positions(1)  # [B, 1], advanced on the device: no host copy per step

    def start(self, prompts: Sequence[torch.Tensor], samples: int) -> torch.Tensor:
        """Prefill every prompt once into the rows of its `samples` samples; logits [B, V]."""
        idx, lengths = padded(prompts)
        logits = self.prefill(idx, lengths, self.cache, self.cache.all_rows)
        self.cache.lengths[:] = lengths.cpu().repeat_interleave(samples)
        self.input_pos = self.cache.positions(1)
        return logits.repeat_interleave(samples, dim=0)

    def step(self, token: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        """Feed each row its newest token [B]; logits [B, V] for the next. A row that has filled the context slides
        its window instead: GPT-2's positions are absolute, so a slide shifts every position and no cached key stays
        valid; that row costs a prefill of block_size tokens per step from then on."""
        cache = self.cache
        sliding = (cache.lengths == cache.max_len).nonzero()[:, 0]
        logits = self.decode_step(token[:, None], self.input_pos, cache)[:, -1]
        cache.lengths = (cache.lengths + 1).clamp(max=cache.max_len)
        self.input_pos.add_(1).clamp_(max=cache.max_len - 1)  # as cache.positions(1) would give
        if sliding.numel():
            logits[sliding.to(logits.device)] = self.slide(sliding, history)
            self.input_pos = cache.positions(1)
        return logits

    def slide(self, rows: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        idx, lengths = history.windows(rows)
        logits = self.prefill(idx, lengths, self.cache, rows.to(idx.device))
        self.cache.lengths[rows] = lengths.cpu()
        return logits


def compiled_phases(model: GPT, batch: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[KVCache, Callable, Callable]:
    """A static cache of block_size positions (one shape for every call) and the compiled prefill and decode step."""
    if any(isinstance(m, (Int8Linear, Fp16Linear)) for m in model.modules()):
        raise ValueError("compile=True does not take int8 weights or fp16 weights (torch.compile cannot trace "
                         "fbgemm's packed products): use compile=False, where their decoding is already fast")
    cache = model._compiled.get("kv_cache")
    if cache is None or cache.k[0].shape[0] != batch or cache.k[0].dtype != dtype or cache.k[0].device != device:
        model._compiled.pop("kv_cache", None)  # the old cache's memory goes before the new one's is taken
        cache = KVCache(model.config, batch, model.config.block_size, dtype, device, static=True)
        model._compiled["kv_cache"] = cache
    cache.lengths.zero_()
    if "decode_step" not in model._compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs remove per-kernel launches
        model._compiled["decode_step"] = torch.compile(model.decode_step, mode=mode, fullgraph=True)
        model._compiled["prefill"] = torch.compile(model.prefill, dynamic=True, fullgraph=True)
    return cache, model._compiled["prefill"], model._compiled["decode_step"]


@torch.no_grad()
def generate_stream(model: GPT, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, *, top_p: Optional[float] = None, num_samples: int = 1,
                    stop_tokens: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    generators: Optional[Sequence[torch.Generator]] = None, use_kv_cache: bool = True,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens, a [B * num_samples] tensor on the model's device, as they are made.

    prompts is a [B, T] tensor of ids, or a list of B 1-D id tensors of any lengths (each row then runs at its own
    positions). Each prompt is prefilled once and shared by its num_samples samples (rows come out sample-major per
    prompt, like repeat_interleave). A row that draws one of stop_tokens has ended: it repeats that token from then
    on, and the stream stops when every row has ended (on a GPU, which is asked only every 8 steps, up to 7 steps
    later). seed (or a torch.Generator) makes sampling repeatable on one device. generators, one per output row,
    draw each row's noise from its own generator instead, so that a row's draws never depend on the other rows of
    its batch (prompts files); a one-row batch with seed=s draws the noise of a row whose generator is seeded s.
    use_kv_cache=False recomputes each row's whole window every step (nanoGPT's method), the reference the cache
    is tested against. compile=True runs the decode step compiled over a static cache, one compiled generation at
    a time (see CompiledTurn). A wrong argument raises TypeError or ValueError naming it.

    Past block_size positions a row conditions on its last block_size tokens, as nanoGPT does; each such step
    costs that row a full forward pass over block_size tokens (see Decoder.step).
    """
    stop_tokens = check_generation_args(prompts, max_new_tokens, temperature, top_k, top_p, num_samples,
                                        model.config.vocab_size, stop_tokens, seed, generator)
    if generators is not None and (seed is not None or generator is not None):
        raise ValueError("give one of seed, generator and generators, not several")
    rows = list(prompts)  # 1-D id tensors: a [B, T] tensor's rows, or the list of prompts as it is
    if generators is not None and len(generators) != len(rows) * num_samples:
        raise ValueError(f"generators must hold one generator per output row ({len(rows) * num_samples}), "
                         f"got {len(generators)}")
    device = rows[0].device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    block_size = model.config.block_size
    rows = [r[-block_size:] for r in rows]  # a prompt longer than the context keeps its end
    samples = [r for r in rows for _ in range(num_samples)]
    B = len(samples)
    history = TokenHistory(samples, max_new_tokens, block_size)
    stop = torch.tensor(stop_tokens, device=device) if stop_tokens else None
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 8  # reading `ended` back waits for the GPU: do it rarely

    with COMPILED_TURN if compile and use_kv_cache else nullcontext():
        decoder = None
        if use_kv_cache and max_new_tokens > 0:
            max_len = min(block_size, max(r.numel() for r in rows) + max_new_tokens)
            decoder = Decoder(model, B, max_len, device, compile)
        def one_step(step: int, token: Optional[torch.Tensor]) -> torch.Tensor:
            """Everything a step does: the network's pass, the draw, the stop check and the history."""
            if decoder is None:  # the no-cache reference: every row's window from scratch
                logits = model.prefill(*history.windows(torch.arange(B)))
            elif step == 0:
                logits = decoder.start(rows, num_samples)
            else:
                logits = decoder.step(token, history)
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator, generators=generators)
            if stop is not None:
                if token is not None:
                    next_token = torch.where(ended, token, next_token)
                ended.logical_or_(torch.isin(next_token, stop))
            history.append(next_token)
            return next_token

        # On a CPU of several cores the whole step runs at the thread count the chooser finds faster now (a
        # busy core makes every multi-threaded operation wait, the draw's top-k as much as the products); the
        # first step's prompt is not timed against decode steps.
        chooser = None
        if decoder is not None and not compile and device.type == "cpu" and torch.get_num_threads() > 1:
            chooser = ThreadChooser()
        token = None
        for step in range(max_new_tokens):
            if chooser is None:
                token = one_step(step, token)
            else:
                token = chooser.run(one_step, step, token, timed=step > 0)
            yield token
            if stop is not None and (step + 1) % check_every == 0 and bool(ended.all()):
                return


@torch.no_grad()
def generate(model: GPT, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, **options: Any) -> Union[torch.Tensor, list[torch.Tensor]]:
    """nanoGPT's generate: the prompt [B, T] followed by up to max_new_tokens sampled tokens. Keyword options are
    generate_stream's. With stop tokens the result is as long as the longest row needed; shorter rows are padded
    with the token that ended them. For a list of prompts, a list of 1-D tensors, one per output row: its prompt,
    then its new tokens up to and including the stop token that ended it."""
    samples = options.get("num_samples", 1)
    new = list(generate_stream(model, prompts, max_new_tokens, temperature, top_k, **options))
    new = torch.stack(new, dim=1) if new else None  # [B, steps]
    if isinstance(prompts, torch.Tensor):
        prompt = prompts.repeat_interleave(samples, dim=0)
        return prompt if new is None else torch.cat([prompt, new], dim=1)
    rows = [p for p in prompts for _ in range(samples)]
    if new is None:
        return rows
    stop = options.get("stop_tokens")
    ends = [new.size(1)] * len(rows)
    if stop is not None:
        stopped = torch.isin(new, torch.as_tensor(list(stop), device=new.device)).cpu()
        ends = [int(s.nonzero()[0]) + 1 if s.any() else new.size(1) for s in stopped]
    return [torch.cat([p, row[:end]]) for p, row, end in zip(rows, new, ends)]


class ThreadChooser:
    """Runs each decode step at whichever of two thread counts (torch's default and 1) is faster now, judged by
    timing the steps themselves.

    On a quiet machine every core helps. When another program keeps a core busy, a multi-threaded operation waits
    for its descheduled thread at every barrier, and one thread can be several times faster (the README's speed
    section). Which case holds can change during a generation, so: the first steps run once at each count (a second
    pair when the two are within 1.5x of each other) and the faster count is chosen; afterwards the other count is
    tried for one step after `interval` steps, the interval doubling up to `max_interval` each time it loses and
    starting over when it wins; and a step at the chosen count that takes over twice the recent median (the load
    changed) tries the other count at once. Settled, that costs one step at the slower count at steps ~32, 96,
    224, 480, ... The thread count is set for each step and restored after it, so nothing else sees it changed.
    """

    window = 32  # the chosen count's recent steps, whose median a step is judged against

    def __init__(self, counts: tuple[int, int] | None = None, clock: Callable[[], float] = time.perf_counter,
                 interval: int = 32, max_interval: int = 512):
        self.chosen, self.other = counts or (torch.get_num_threads(), 1)
        self.clock = clock
        self.first_interval, self.interval, self.max_interval = interval, interval, max_interval
        self.steps = 0
        self.trials = [self.chosen, self.other]  # counts to run next, one step each, before the chosen one again
        self.trial_times = {self.chosen: [], self.other: []}
        self.recent = []  # the chosen count's step times since it was chosen, the last `window` of them
        self.next_trial = None  # the step at which the other count is tried again; None during the opening

    def run(self, step: Callable[..., T], *args, timed: bool = True) -> T:
        """step(*args), at the thread count this step should use; its time decides the counts to come (unless
        timed=False: a step unlike the others, such as the prompt's)."""
        count = self.trials[0] if self.trials else self.chosen
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            start = self.clock()
            out = step(*args)
            seconds = self.clock() - start
        finally:
            torch.set_num_threads(previous)
        if timed:
            self.record(count, seconds)
        return out

    def record(self, count: int, seconds: float) -> None:
        self.steps += 1
        if self.trials:
            self.trials.pop(0)
            self.trial_times[count].append(seconds)
            if not self.trials:
                self._decide()
            return
        self.recent = (self.recent + [seconds])[-self.window:]
        if self.steps >= self.next_trial:
            self.trials = [self.other]
        elif len(self.recent) >= 4 and seconds > 2 * statistics.median(self.recent):  # the load changed
            self.trials, self.interval, self.recent = [self.other], self.first_interval, [seconds]

    def _decide(self) -> None:
        chosen, other = self.trial_times[self.chosen], self.trial_times[self.other]
        if self.next_trial is None:  # the opening
            a, b = sum(chosen) / len(chosen), sum(other) / len(other)
            if len(chosen) == 1 and max(a, b) < 1.5 * min(a, b):
                self.trials = [self.chosen, self.other]  # too close to call on one step each: one more pair
                return
            won = b < a
            self.recent = list(other if won else chosen)
        else:  # one step of the other count against the chosen count's recent median
            won = other[0] < statistics.median(self.recent)
            self.recent = [other[0]] if won else self.recent
        if won:
            self.chosen, self.other = self.other, self.chosen
            self.interval = self.first_interval
        elif self.next_trial is not None:
            self.interval = min(2 * self.interval, self.max_interval)
        self.trial_times = {self.chosen: [], self.other: []}
        self.next_trial = self.steps + self.interval


class CompiledTurn:
    """Compiled generation runs one at a time in a process: its static KV cache lives on the model, and torch.compile
    is not thread-safe. Another thread waits for its turn; the thread holding it (with a compiled generate_stream
    left open) is refused, as waiting on itself would never end."""

    def __init__(self):
        self.lock, self.owner = threading.Lock(), None

    def __enter__(self) -> None:
        if self.owner == threading.get_ident():
            raise RuntimeError("a compiled generate_stream is still open in this thread: finish or close() it before "
                               "starting another compiled generation, or use compile=False")
        self.lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc: Any) -> None:
        self.owner = None
        self.lock.release()


COMPILED_TURN = CompiledTurn()
