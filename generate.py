"""
Generation: the phases that drive the network of model.py, for the notebook API, the scripts and bench.py.

A generation reads top to bottom: each prompt becomes a row (prompts of different lengths padded on the right,
`padded`), each row's tokens are kept in a bounded history (`TokenHistory`), and a `Decoder` runs the phases over
one KV cache: `prefill` writes each prompt into its rows of the cache, `decode_step` feeds every row its newest token
at the row's own position, and a row that has filled the context slides its window (`slide`: its last block_size
tokens prefilled again, nanoGPT's meaning past the context). `generate_stream` is the loop over those phases;
`generate` collects what it yields. The prompts-file job (batch.py) drives the same Decoder as a fixed number of
slots: a row that has finished takes a new prompt (`admit`) while the others go on, and a row left with nothing
to do is parked. Also here: the thread count each CPU turn runs at (ThreadChooser) and the rule of one compiled
generation at a time.
"""

import copy
import statistics
import threading
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch
from torch.nn import functional as F

from linear import decode_bytes, rounded_kind
from model import GPT, KVCache
from sampling import Sampling, check_generation_args, check_int

T = TypeVar("T")
Prompts = Union[torch.Tensor, Sequence[torch.Tensor]]


def padded(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one [B, T] batch padded on the right, and their lengths [B]. A padded
    position comes after every real one of its row, so causal attention keeps it out of the real positions."""
    lengths = torch.tensor([r.numel() for r in rows], device=rows[0].device)
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True), lengths


def by_length(prompts: Sequence[torch.Tensor], rows: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                             torch.Tensor]:
    """Prompts of one length stacked as one rectangle [n, T], with the cache rows they go to (rows[i] are prompt
    i's: one, or its samples'), for a packed pass that pads none; and where each prompt's logits come in the
    rectangles' order, for putting them back in the prompts' order."""
    groups = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.numel(), []).append(i)
    parts = [(torch.stack([prompts[i] for i in members]), rows[members].reshape(-1)) for members in groups.values()]
    return parts, torch.tensor([i for members in groups.values() for i in members]).argsort()


class TokenHistory:
    """Each row's tokens so far, for the windows that are recomputed from scratch (the no-cache reference, and a
    row past block_size) and for what generation yields. Written in place into at most twice block_size columns a
    row (plus room for a round of speculation): when a row's are full, all but its newest block_size tokens go, so
    the memory never grows with max_new_tokens."""

    def __init__(self, rows: Sequence[torch.Tensor], max_new_tokens: int, block_size: int, spare: int = 1):
        # spare: columns for the tokens a row makes beyond max_new_tokens, and for the widest append
        lengths = [r.numel() for r in rows]
        self.block_size = block_size
        columns = min(max(lengths) + max_new_tokens + spare, 2 * block_size)
        self.seq = torch.zeros(len(rows), columns, dtype=torch.long, device=rows[0].device)  # [B, columns]
        for i, r in enumerate(rows):
            self.seq[i, :r.numel()] = r
        self.kept = torch.tensor(lengths)  # [B] columns in use, on the host
        self.all_rows = torch.arange(len(rows), device=self.seq.device)

    @classmethod
    def for_slots(cls, slots: int, longest: int, block_size: int, device: torch.device) -> "TokenHistory":
        """A history of `slots` rows that take their prompts later (admit), with room for `longest` tokens a row
        (a prompt and its new tokens) or 2 * block_size, whichever is less."""
        return cls([torch.zeros(1, dtype=torch.long, device=device)] * slots, longest - 1, block_size)

    def append(self, tokens: torch.Tensor, counts: Optional[torch.Tensor] = None) -> None:
        """Add the first counts[i] of tokens [B, S] to row i (all S if counts is None; counts on the host)."""
        # Host indices go to the device without waiting (non_blocking: a GPU's step queue never drains here).
        S, device = tokens.size(1), self.seq.device
        full = (self.kept + S > self.seq.size(1)).nonzero()[:, 0]  # only ever at 2 * block_size columns
        if full.numel():  # keep the newest block_size tokens, all a window needs
            newest = (self.kept[full] - self.block_size)[:, None] + torch.arange(self.block_size)
            full_rows = full.to(device, non_blocking=True)
            self.seq[full_rows, :self.block_size] = self.seq[full_rows[:, None], newest.to(device, non_blocking=True)]
            self.kept[full] = self.block_size
        # All S columns are written; those past a row's count lie past its end, unread until overwritten.
        columns = (self.kept[:, None] + torch.arange(S)).to(device, non_blocking=True)
        self.seq[self.all_rows[:, None], columns] = tokens
        self.kept += S if counts is None else counts

    def back(self, steps: Union[int, torch.Tensor]) -> torch.Tensor:
        """Each row's token `steps` places from its end (1: its newest), [B]; steps an int or [B] on the host."""
        return self.seq[self.all_rows, (self.kept - steps).to(self.seq.device, non_blocking=True)]

    def admit(self, rows: torch.Tensor, prompts: Sequence[torch.Tensor]) -> None:
        """Rows `rows` (host indices) start over from these prompts, one a row (each at most as long as the
        columns, as the one whose history is built for the longest prompt and its new tokens)."""
        for row, prompt in zip(rows.tolist(), prompts):
            self.seq[row, :prompt.numel()] = prompt
            self.kept[row] = prompt.numel()

    def move(self, src: int, dst: int) -> None:
        """Row src's tokens to row dst (a row moved in the batch: Decoder.move)."""
        self.seq[dst, :self.kept[src]] = self.seq[src, :self.kept[src]]
        self.kept[dst] = self.kept[src]

    def windows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block_size tokens (or all, if fewer) of each row in `rows` (host indices), padded on the
        right as one batch [R, T], with their lengths [R]."""
        kept = self.kept[rows]
        lengths = kept.clamp(max=self.block_size)
        columns = (kept - lengths)[:, None] + torch.arange(int(lengths.max()))  # past a row's end: padding
        columns = torch.minimum(columns, (kept - 1)[:, None])
        device = self.seq.device
        rows, columns = rows.to(device, non_blocking=True), columns.to(device, non_blocking=True)
        return self.seq[rows[:, None], columns], lengths.to(device, non_blocking=True)


class Decoder:
    """The phases of one generation over one KV cache of `batch` rows: prefill, decode steps and window slides.
    Eager, or compiled over a static cache kept on the model between calls, so that its captured graphs (which
    hold the cache's addresses) are replayed rather than rebuilt."""

    def __init__(self, model: GPT, batch: int, max_len: int, device: torch.device, compile: bool):
        self.model = model
        # The cache in the activations' dtype (float32 under int8 and fp16 weights on a CPU): attention over a float16
        # cache runs several times slower on CPUs without AVX512_FP16 (the README's speed section)
        dtype = model.transformer.wpe.weight.dtype
        if not compile:
            self.cache = KVCache(model.config, batch, max_len, dtype, device)
            self.prefill, self.decode_step = model.prefill, model.decode_step
            self.decode_and_prefill = model.decode_and_prefill
        else:
            self.cache, self.prefill, self.decode_step = compiled_phases(model, batch, dtype, device)
            self.decode_and_prefill = None  # a captured step has one shape: new prompts get a prefill apart
        self.input_pos = self.cache.positions(1)  # [B, 1], advanced on the device: no host copy per step

    def start(self, prompts: Sequence[torch.Tensor], samples: int) -> torch.Tensor:
        """Prefill every prompt once into the rows of its `samples` samples; logits [B, V]. Eager, the prompts are
        packed, none padded; compiled, padded to the longest (one shape for the captured prefill)."""
        if self.decode_and_prefill is not None:
            _, logits = self.packed(None, prompts, torch.arange(len(prompts) * samples).view(len(prompts), samples))
        else:
            idx, lengths = padded(prompts)
            logits = self.prefill(idx, lengths, self.cache, self.cache.all_rows)
        self.cache.lengths[:] = torch.tensor([p.numel() for p in prompts]).repeat_interleave(samples)
        self.input_pos = self.cache.positions(1)
        return logits.repeat_interleave(samples, dim=0)

    def step(self, token: torch.Tensor, history: TokenHistory,
             admit: Optional[tuple[torch.Tensor, Sequence[torch.Tensor]]] = None) -> torch.Tensor:
        """Feed each row its newest token [B]; logits [B, V] for the next. admit, (rows as host indices, prompts):
        those rows start new prompts instead (continuous batching), prefilled in the same pass as the step where
        it is eager (Packed: one read of the weights for both). A row that has filled the context slides its
        window instead: GPT-2's positions are absolute, so a slide shifts every position and no cached key stays
        valid; that row costs a prefill of block_size tokens per step from then on."""
        cache = self.cache
        rows, prompts = admit or (torch.zeros(0, dtype=torch.long), [])
        sliding = (cache.lengths == cache.max_len).nonzero()[:, 0]
        sliding = sliding[~torch.isin(sliding, rows)]  # a row that starts over does not slide
        first = None  # the new prompts' logits
        if prompts and self.decode_and_prefill is not None:
            logits, first = self.packed(token, prompts, rows)
        else:
            logits = self.decode_step(token[:, None], self.input_pos, cache)
        logits = logits[:, -1]
        cache.lengths = (cache.lengths + 1).clamp(max=cache.max_len)
        self.input_pos.add_(1).clamp_(max=cache.max_len - 1)  # as cache.positions(1) would give
        if prompts:
            logits[rows.to(logits.device, non_blocking=True)] = self.admit(rows, prompts, history, first)
        if sliding.numel():
            logits[sliding.to(logits.device, non_blocking=True)] = self.slide(sliding, history)
            self.input_pos = cache.positions(1)
        return logits

    def slides(self) -> bool:
        """Whether the next step slides some row's window (that row's pass is a prefill, not a step)."""
        return bool((self.cache.lengths == self.cache.max_len).any())

    def admit(self, rows: torch.Tensor, prompts: Sequence[torch.Tensor], history: TokenHistory,
              logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Start new prompts, one a row, in the rows `rows` (host indices) while the other rows stay where they are
        (continuous batching); logits [R, V] for each prompt's first new token (given as logits when a step has
        prefilled them already). Eager, the prompts are packed side by side, none padded; compiled, padded to the
        longest. What a row held before is stale from then on and seen by no query."""
        if logits is None and self.decode_and_prefill is not None:
            _, logits = self.packed(None, prompts, rows)
        elif logits is None:
            idx, lengths = padded(prompts)
            logits = self.prefill(idx, lengths, self.cache, rows.to(self.input_pos.device, non_blocking=True))
        self.cache.lengths[rows] = torch.tensor([p.numel() for p in prompts])
        self.input_pos = self.cache.positions(1)
        history.admit(rows, prompts)
        return logits

    def packed(self, token: Optional[torch.Tensor], prompts: Sequence[torch.Tensor],
               rows: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """One pass (model.decode_and_prefill): the step feeding each row `token` [B] (None for no step) and the
        prompts prefilled into their cache rows (host indices, rows[i] prompt i's); logits [B, 1, V] of the step
        and [P, V] after each prompt, in the prompts' order."""
        device = self.input_pos.device
        parts, order = by_length(prompts, rows)
        parts = [(ids, part_rows.to(device, non_blocking=True)) for ids, part_rows in parts]
        idx = None if token is None else token[:, None]
        step, firsts = self.decode_and_prefill(idx, self.input_pos, self.cache, parts)
        return step, torch.cat(firsts)[order.to(device, non_blocking=True)]

    def park(self, rows: torch.Tensor, history: TokenHistory) -> None:
        """Rows (host indices) with nothing to do, as a run's last prompts finish elsewhere in the batch, go back to
        length 0, in the cache and in the history: they still take part in each step (their tokens are read by no
        one) but never grow into a window slide or past the history's columns."""
        self.cache.lengths[rows] = 0
        history.kept[rows] = 0
        self.input_pos = self.cache.positions(1)

    def move(self, src: int, dst: int, history: TokenHistory) -> None:
        """Row src, its cached keys and values and its tokens, to row dst; src is left to take a new prompt (the
        prompts-file job keeps its rows ordered by length this way: KVCache.groups)."""
        self.cache.move(src, dst)
        history.move(src, dst)
        self.input_pos = self.cache.positions(1)

    def slide(self, rows: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        idx, lengths = history.windows(rows)
        logits = self.prefill(idx, lengths, self.cache, rows.to(idx.device, non_blocking=True))
        # The windows' lengths, taken on the host: reading them back from a GPU would wait for it.
        self.cache.lengths[rows] = history.kept[rows].clamp(max=history.block_size)
        return logits

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's next S tokens [B, S] at its next positions; logits [B, S, V]. The cache counts none of them
        as kept until keep() says how many (the rest lie past the row's length: unseen, later overwritten)."""
        return self.decode_step(tokens, self.cache.positions(tokens.size(1)), self.cache)

    def keep(self, counts: Union[int, torch.Tensor]) -> None:
        self.cache.lengths = self.cache.lengths + counts  # counts: an int or [B] on the host
        self.input_pos = self.cache.positions(1)


def compiled_phases(model: GPT, batch: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[KVCache, Callable, Callable]:
    """A static cache of block_size positions (one shape for every call) and the compiled prefill and decode step."""
    if rounded_kind(model) is not None:
        raise ValueError("compile=True does not take int8 weights or fp16 weights (torch.compile cannot trace "
                         "fbgemm's packed products): use compile=False, where their decoding is already fast")
    cache = model._compiled.get("kv_cache")
    if cache is None or cache.k[0].shape[0] != batch or cache.k[0].dtype != dtype or cache.k[0].device != device:
        # Both references to the old cache go first (this name's too), so that its memory is free before the new
        # one's is taken: two caches at once may not fit.
        cache = model._compiled["kv_cache"] = None
        cache = model._compiled["kv_cache"] = KVCache(model.config, batch, model.config.block_size, dtype, device,
                                                      static=True)
    cache.lengths.zero_()
    if "decode_step" not in model._compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs remove per-kernel launches
        model._compiled["decode_step"] = torch.compile(model.decode_step, mode=mode, fullgraph=True)
        model._compiled["prefill"] = torch.compile(model.prefill, dynamic=True, fullgraph=True)
    return cache, model._compiled["prefill"], model._compiled["decode_step"]


MOST_DRAFT_TOKENS = 8  # the most proposals draft_length chooses a round (README: bench.py's measurements)
DRAFT_TOKENS_LIMIT = 64  # the most a caller may ask for: more would only be checked and thrown away


def draft_length(accepted: int, proposed: int, draft_step: float, check: float, plain_step: float, most: int) -> int:
    """How many tokens the draft should propose next round: the k in 0..most that makes the most tokens per unit
    of time. A round of k proposals, each accepted with probability a (the rate so far, from a prior of 0.8), makes
    (1 - a^(k+1)) / (1 - a) tokens for k draft steps and one check by the model; k = 0 is a plain step, one token.
    The three costs in any one unit (seconds measured, or the weight bytes each step reads)."""
    a = (accepted + 4) / (proposed + 5)

    def tokens_per_time(k: int) -> float:
        return 1 / plain_step if k == 0 else (1 - a ** (k + 1)) / (1 - a) / (k * draft_step + check)

    return max(range(most + 1), key=tokens_per_time)


def draft_costs(model: GPT, draft: GPT) -> tuple[int, int, int]:
    """draft_length's costs: the weight bytes a draft step, a check and a plain step read (a check of several
    positions reads them once, as a plain step does). Not timings: sampled tokens depend on the lengths, and a seed
    must repeat a run."""
    model_bytes = decode_bytes(model)
    return decode_bytes(draft), model_bytes, model_bytes


def draft_model(model: GPT, draft: Union[str, GPT]) -> GPT:
    """The draft of speculative decoding: "int8" or "fp16", the model's own weights quantized (CPU only), made
    once and kept on the model; or another GPT with the model's vocabulary (a smaller GPT-2)."""
    if isinstance(draft, GPT):
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) is not the model's "
                             f"({model.config.vocab_size}): a draft must propose the model's own token ids")
        if draft.transformer.wpe.weight.device != model.transformer.wpe.weight.device:
            raise ValueError(f"the draft is on {draft.transformer.wpe.weight.device} but the model on "
                             f"{model.transformer.wpe.weight.device}: put both on one device")
        return draft
    if draft not in ("int8", "fp16"):
        raise ValueError(f"draft must be 'int8', 'fp16' or a GPT with the model's vocabulary, got {draft!r}")
    device = model.transformer.wpe.weight.device
    if device.type != "cpu":
        raise ValueError(f"draft={draft!r} runs on the CPU only (fbgemm's products), but the model is on {device}: "
                         "give a smaller GPT as the draft instead")
    if rounded_kind(model) is not None:
        raise ValueError(f"draft={draft!r} is a quantized copy of a float model's weights, but this model's are "
                         "already int8 or fp16: speculate for its float32 original, or give no draft")
    key = f"{draft} draft"  # kept beside the compiled steps, made from the same weights (crop_block_size clears it)
    if key not in model._compiled:
        # deepcopy with every tensor of the model in its memo copies the modules around the model's own tensors,
        # whose Linears are then replaced: the embeddings and layer norms stay shared, not copied.
        memo = {id(t): t for t in model.parameters()}
        memo[id(model._compiled)] = {}
        copied = copy.deepcopy(model, memo)
        model._compiled[key] = copied.quantize_int8() if draft == "int8" else copied.quantize_fp16()
    return model._compiled[key]


def speculate(decoder: Decoder, drafter: Decoder, history: TokenHistory, k: int, room: torch.Tensor,
              sampling: Sampling, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of speculative decoding (Leviathan et al. 2023): the draft proposes k tokens a row, the model
    checks them all in one step of k + 1 positions, and each row keeps the proposals it accepts and one token more
    of the model's own. Returns the tokens [B, k + 1], of which row i made its first made[i] (on the host, from 1
    to k + 1, but at most room[i]: a row far ahead of the others waits for them; 0 leaves it as it was)."""
    # The draft: k steps over its own cache. The first feeds each row's previous token again beside its newest: a
    # row that accepted every proposal last round holds a last proposal that the draft itself was never fed.
    drafter.cache.lengths = decoder.cache.lengths - 1
    fed = torch.stack([history.back(2), history.back(1)], dim=1)  # [B, 2]
    proposed, draft_probs = [], []
    for _ in range(k):
        logits = drafter.feed(fed)[:, -1]
        drafter.keep(fed.size(1))
        if sampling.greedy:
            fed = logits.argmax(dim=-1)[:, None]
        else:
            draft_probs.append(sampling.probs(logits))  # [B, V]
            fed = sampling.draw(draft_probs[-1])[:, None]
        proposed.append(fed)
    proposed = torch.cat(proposed, dim=1)  # [B, k]
    # The model: each row's newest token and its k proposals in one step; logits after each of them.
    logits = decoder.feed(torch.cat([history.back(1)[:, None], proposed], dim=1))  # [B, k + 1, V]
    if sampling.greedy:  # accepted while the proposal is the model's own choice, which then follows them
        tokens = logits.argmax(dim=-1)
        accepted = (tokens[:, :k] == proposed).int().cumprod(dim=1).sum(dim=1)
    else:
        tokens, accepted = accept_or_resample(sampling.probs(logits), torch.stack(draft_probs, dim=1), proposed,
                                              sampling)
    made = torch.minimum(accepted.cpu() + 1, room)
    decoder.keep(made)  # the model's cache drops the rejected positions; the draft's is reset by the next round
    for name, count in (("rounds", 1), ("proposed", proposed.numel()), ("accepted", int(accepted.sum())),
                        ("tokens", int(made.sum()))):
        stats[name] = stats.get(name, 0) + count
    return tokens, made


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, proposed: torch.Tensor,
                       sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept test that keeps the model's own distribution: proposal j, drawn from the draft's q, is accepted
    with probability min(1, p / q) at it, in order until one is rejected; that one is replaced by a draw from
    max(0, p - q), normalised; after k accepted proposals comes a draw from p itself. p [B, k + 1, V] the model's
    and q [B, k, V] the draft's distributions, proposed [B, k]. Returns the tokens [B, k + 1] and the number of
    proposals accepted [B]; row i's tokens are its first accepted[i] proposals and then the draw."""
    B, k = proposed.shape
    p_at = p[:, :k].gather(-1, proposed[..., None])[..., 0]  # [B, k]
    q_at = q.gather(-1, proposed[..., None])[..., 0]
    accepted = (sampling.uniform(p_at) * q_at <= p_at).int().cumprod(dim=1).sum(dim=1)  # [B]
    rows = torch.arange(B, device=p.device)
    target = p[rows, accepted]  # [B, V]: the model's distribution where the draw is made
    residual = (target - F.pad(q, (0, 0, 0, 1))[rows, accepted]).clamp_(min=0)  # q is 0 after the last proposal
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, target)  # rounding left nothing
    drawn = sampling.draw(residual)
    tokens = torch.cat([proposed, drawn[:, None]], dim=1).scatter_(1, accepted[:, None], drawn[:, None])
    return tokens, accepted


@torch.no_grad()
def generate_stream(model: GPT, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, *, top_p: Optional[float] = None, num_samples: int = 1,
                    stop_tokens: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    generators: Optional[Sequence[torch.Generator]] = None, use_kv_cache: bool = True,
                    compile: bool = False, draft: Union[None, str, GPT] = None, draft_tokens: Optional[int] = None,
                    stats: Optional[dict] = None) -> Iterator[torch.Tensor]:
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

    draft turns on speculative decoding (see speculate): "int8" or "fp16" (the model's own weights quantized, CPU only)
    or a smaller GPT with the same vocabulary proposes draft_tokens tokens a round (None: as many as pay, chosen each
    round by draft_length from the acceptance so far, up to MOST_DRAFT_TOKENS; none, plain steps, when the draft is
    accepted too rarely to pay; see draft_costs), which the model checks in one step. The tokens are the model's
    own: the same greedy tokens (up to float rounding between a step of one position and one of several), the same
    distribution when sampling, though not the same draws for a seed (seeded runs repeat with the same draft) and, with
    generators, a row's draws then depend on its batch. stats, a dict, receives its counts: rounds, proposed, accepted
    and tokens (made in rounds).

    Past block_size positions a row conditions on its last block_size tokens, as nanoGPT does; each such step
    costs that row a full forward pass over block_size tokens (see Decoder.step), and speculation stops.
    """
    stop_tokens = check_generation_args(prompts, max_new_tokens, temperature, top_k, top_p, num_samples,
                                        model.config.vocab_size, stop_tokens, seed, generator,
                                        device=model.transformer.wpe.weight.device, generators=generators)
    if generators is not None and (seed is not None or generator is not None):
        raise ValueError("give one of seed, generator and generators, not several")
    if draft is not None:
        if draft_tokens is not None:
            check_int("draft_tokens", draft_tokens, 1, DRAFT_TOKENS_LIMIT)
        if not use_kv_cache or compile:
            raise ValueError("a draft runs with the KV cache, eagerly: give use_kv_cache=True and compile=False")
        draft = draft_model(model, draft)
    rows = list(prompts)  # 1-D id tensors: a [B, T] tensor's rows, or the list of prompts as it is
    if generators is not None and len(generators) != len(rows) * num_samples:
        raise ValueError(f"generators must hold one generator per output row ({len(rows) * num_samples}), "
                         f"got {len(generators)}")
    device = rows[0].device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    sampling = Sampling(temperature, top_k, top_p, generator, generators)
    block_size = model.config.block_size
    rows = [r[-block_size:] for r in rows]  # a prompt longer than the context keeps its end
    samples = [r for r in rows for _ in range(num_samples)]
    B = len(samples)
    k = (draft_tokens or MOST_DRAFT_TOKENS) if draft is not None else 0  # the most proposals a round
    # Rows make tokens at different rates (each accepts its own number of proposals), but the stream yields one
    # token a row at a time: a row's tokens not yet yielded wait in its history, at most `most_ahead` of them (a
    # row with that many makes none until the slowest catches up). Four rounds' worth: simulated for 10 rows
    # accepting 89% of 4 proposals, the batch then yields 3.8 tokens a round, against 4.0 unbounded and 2.8 if
    # rows could hold only one round's worth.
    most_ahead = 4 * (k + 1) if draft is not None else 0
    history = TokenHistory(samples, max_new_tokens, block_size, spare=most_ahead + k + 1)
    stop = torch.tensor(stop_tokens, device=device) if stop_tokens else None
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 8  # reading `ended` back waits for the GPU: do it rarely

    with COMPILED_TURN if compile and use_kv_cache else nullcontext():
        decoder = drafter = None
        if use_kv_cache and max_new_tokens > 0:
            longest = max(r.numel() for r in rows)
            max_len = min(block_size, longest + max_new_tokens + most_ahead + k)  # room for rows ahead, a round
            decoder = Decoder(model, B, max_len, device, compile)
            draft_len = min(max_len, draft.config.block_size) if draft is not None else 0
            if longest + k < draft_len:  # else the draft's context cannot hold even the prompt and one round
                drafter = Decoder(draft, B, draft_len, device, compile=False)
        ahead = torch.zeros(B, dtype=torch.long)  # each row's tokens made but not yet yielded, on the host
        token = previous = None
        tally = stats if stats is not None else {}  # speculation's counts, from which draft_length judges
        costs = draft_costs(model, draft) if draft is not None else None

        def turn() -> None:
            """Everything one turn does: a speculative round, or the prompts' pass or a step and its draw; the
            new tokens go to the history."""
            proposals = 0
            if token is not None and drafter is not None:
                proposals = draft_tokens or draft_length(tally.get("accepted", 0), tally.get("proposed", 0), *costs, k)
            if proposals and int(decoder.cache.lengths.max()) + proposals < drafter.cache.max_len:  # a round fits
                new, made = speculate(decoder, drafter, history, proposals, most_ahead - ahead, sampling, tally)
            else:
                if decoder is None:  # the no-cache reference: every row's window from scratch
                    logits = model.prefill(*history.windows(torch.arange(B)))
                elif token is None:
                    logits = decoder.start(rows, num_samples)
                    if drafter is not None:
                        drafter.start(rows, num_samples)
                else:
                    logits = decoder.step(token, history)
                new, made = sampling.next_token(logits)[:, None], 1
            history.append(new, made)
            ahead.add_(made)

        chooser = cpu_thread_chooser(device, compile) if decoder is not None else None
        for yielded in range(max_new_tokens):
            while not ahead.all():  # make tokens until every row has one to yield
                if chooser is None:
                    turn()
                else:  # the prompts' pass, or a step where a row slides (a prefill), is not timed as a step
                    chooser.run(turn, timed=token is not None and not decoder.slides())
                token = history.back(1)
            next_token = history.back(ahead)
            ahead -= 1
            if stop is not None:
                if previous is not None:
                    next_token = torch.where(ended, previous, next_token)
                ended |= torch.isin(next_token, stop)
            previous = next_token
            yield next_token
            if stop is not None and (yielded + 1) % check_every == 0 and bool(ended.all()):
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


def cpu_thread_chooser(device: torch.device, compile: bool) -> Optional["ThreadChooser"]:
    """On a CPU of several cores, generation runs each whole turn (the network's pass, the draw's top-k over the
    vocabulary, the bookkeeping) at the thread count a ThreadChooser finds faster now: a core that another program
    keeps busy makes every multi-threaded operation wait for it, not only the products. None elsewhere (a GPU;
    one thread; compiled, whose captured graphs keep the count they were built at)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or compile or threads == 1:
        return None
    # Start at the count the machine favours now, so that the prompts' pass (untimed) runs there too: a core busy,
    # one thread, as a pass at every core would cost ten. The opening pair of steps then checks the verdict at the
    # price of one step at the other count: the probe, under a millisecond on a quiet machine, misses a busy core
    # about half the time, and the host's noise now and then makes a quiet machine look busy (taken on trust, that
    # cost 32 steps at one thread).
    return ThreadChooser((1, threads) if parallel_waits(threads) else (threads, 1))


def parallel_waits(threads: int) -> bool:
    """Whether an operation split over `threads` threads is slower right now than on one: the mark of a core that
    another program keeps busy, where each parallel region waits milliseconds for its descheduled thread. A multiply
    of 256K floats in place (1 MB, held only while it runs: this counts in a small model's peak memory), the median
    of five at each count: measured 11 us split against 18 us on one thread on a quiet 2-core machine (200 of 200
    probes said quiet), against milliseconds split with one core busy. It is often fooled by a busy core (5 of 20
    probes in a row saw it, 19 of 20 taken 50 ms apart): a thread that wakes after sleeping runs at once for a few
    milliseconds, ahead of the busy program. Either verdict is checked by generation's opening steps."""
    x = torch.ones(1 << 18)
    previous, typical = torch.get_num_threads(), {}
    try:
        for count in (threads, 1):
            torch.set_num_threads(count)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                x.mul_(1.0)
                times.append(time.perf_counter() - start)
            typical[count] = statistics.median(times)
    finally:
        torch.set_num_threads(previous)
    return typical[threads] > typical[1]


class ThreadChooser:
    """Runs each step (a turn of generation: see cpu_thread_chooser) at whichever of two thread counts (torch's
    default and 1) is faster now, judged by timing the steps themselves.

    On a quiet machine every core helps. When another program keeps a core busy, a multi-threaded operation waits
    for its descheduled thread at every barrier, and one thread can be ten times faster (the README's speed
    section). Which case holds can change during a generation, so: the first steps run once at each count (a second
    pair when the two are within 1.5x of each other) and the faster count is chosen (the first count given runs the
    untimed steps until then, such as the prompts' pass: cpu_thread_chooser puts first the count parallel_waits
    favours); afterwards the other count is tried for one step after `interval` steps (a second when the first wins:
    the other program may have paused for one step), the interval doubling up to `max_interval` each time it loses
    and starting over when it wins; and two steps in a row at the chosen count that take over twice the recent
    median and longer than the other count's last step (the load changed, not one step that was interrupted or the
    machine's noise) try the other count at once, judged on fresh steps (the other count, the chosen, the other
    again: a burst of the host's noise that has passed loses it). A trial costs what the losing count is slower, so
    the next trial also waits at least `interval` times that excess (a count 10x slower is tried again 288 steps on,
    not 32): trials cost at most about 1/32 of the time. Quiet, that is one step at one thread at steps ~32, 96,
    224, 480, ... The thread count is set for each step and restored after it, so nothing else sees it changed.
    """

    window = 32  # the chosen count's recent steps, whose median a step is judged against

    def __init__(self, counts: tuple[int, int] | None = None, clock: Callable[[], float] = time.perf_counter,
                 interval: int = 32, max_interval: int = 512):
        self.chosen, self.other = counts or (torch.get_num_threads(), 1)
        self.clock = clock
        self.first_interval, self.interval, self.max_interval = interval, interval, max_interval
        self.steps = 0
        # Counts to run next, one step each, before the chosen one again: first the opening pair.
        self.trials = [self.chosen, self.other]
        self.trial_times = {self.chosen: [], self.other: []}
        self.recent = []  # the chosen count's step times since it was chosen, the last `window` of them
        # The step at which the other count is tried again; None during the opening.
        self.next_trial = None
        self.slow_before = False  # whether the last step at the chosen count was slow (see record)
        self.other_seconds = 0.0  # the other count's step when last timed

    def run(self, step: Callable[..., T], *args, timed: bool = True) -> T:
        """step(*args), at the thread count this step should use; its time decides the counts to come (unless
        timed=False: a step unlike the others, such as the prompt's)."""
        # A step that is not timed cannot settle a trial: it runs at the chosen count, and the trial waits for the
        # next timed step (else a run of admissions would all run at the count on trial, unjudged).
        count = self.trials[0] if self.trials and timed else self.chosen
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
        # Slow: over twice the recent median, and slower than the other count was when last timed (noise on a busy
        # machine often doubles a step; a trial at a count ten times slower is no remedy for it).
        slow = len(self.recent) >= 2 and seconds > max(2 * statistics.median(self.recent), self.other_seconds)
        self.recent = (self.recent + [seconds])[-self.window:]
        if self.steps >= self.next_trial:
            self.trials = [self.other]
        elif slow and self.slow_before:  # the load changed, or a burst of the machine's noise passed by
            # Judged on fresh steps: the other count, the chosen one, the other again. A burst that is over by then
            # shows in the chosen count's step, and no recent median taken before it is the yardstick.
            self.trials, self.interval = [self.other, self.chosen, self.other], self.first_interval
        self.slow_before = slow

    def _decide(self) -> None:
        chosen, other = self.trial_times[self.chosen], self.trial_times[self.other]
        if self.next_trial is None:  # the opening
            a, b = sum(chosen) / len(chosen), sum(other) / len(other)
            if len(chosen) == 1 and max(a, b) < 1.5 * min(a, b):
                self.trials = [self.chosen, self.other]  # too close to call on one step each: one more pair
                return
            won = b < a
            self.recent = list(other if won else chosen)
        else:  # the other count's steps against the chosen count's, fresh ones if any, else the recent median
            a, b = statistics.median(chosen or self.recent), max(other)
            won = b < a
            if won and len(other) == 1:  # one fast step may be the other program pausing: confirm with a second
                self.trials = [self.other]
                return
            self.recent = list(other) if won else list(chosen) or self.recent
            self.interval = self.first_interval if won else min(2 * self.interval, self.max_interval)
        if won:
            self.chosen, self.other = self.other, self.chosen
        self.other_seconds = max(a, b)
        excess = max(a, b) / min(a, b) - 1  # what a step at the losing count costs more
        wait = min(max(self.interval, round(self.first_interval * excess)), self.max_interval)
        self.trial_times = {self.chosen: [], self.other: []}
        self.next_trial = self.steps + wait


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
