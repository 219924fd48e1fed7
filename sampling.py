"""
Choosing each next token, and the checks on generation's arguments.

sample_next_token turns a step's logits into token ids (temperature, then top-k, then top-p, then an exact draw);
the check functions raise TypeError or ValueError naming the argument at fault, for generate_stream, forward and
the scripts, which run them before any model loads.
"""

import math
import numbers
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, TypeVar, Union

import torch
from torch.nn import functional as F



Setting = TypeVar("Setting")
PerRow = Union[Setting, Sequence[Setting]]  # one value for every row, or a list of one value per row


def sample_next_token(logits: torch.Tensor, temperature: PerRow[float] = 1.0, top_k: PerRow[Optional[int]] = None,
                      top_p: PerRow[Optional[float]] = None, generator: Optional[torch.Generator] = None, *,
                      generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """[B, V] logits to [B] token ids. Temperature, then top-k, then top-p (nucleus); temperature 0 is argmax.
    generators (one per row) draw each row's noise on its own, in place of the one generator for the batch.
    temperature, top_k and top_p may each be a list of B values, one per row (a batch of prompts with their own
    settings): see sample_rows.

    Everything stays on the logits' device, so a GPU never waits on the host here.
    """
    if isinstance(temperature, (list, tuple)) or isinstance(top_k, (list, tuple)) or isinstance(top_p, (list, tuple)):
        return sample_rows(logits, temperature, top_k, top_p, generator, generators)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs, candidates = narrowed_probs(logits, temperature, top_k, top_p)
    choice = draw(probs, generator, generators)
    return choice if candidates is None else candidates.gather(-1, choice[:, None])[:, 0]


class Sampling(NamedTuple):
    """One generation's way of choosing tokens, for the steps that draw several times (speculative decoding)."""
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    generator: Optional[torch.Generator]
    generators: Optional[Sequence[torch.Generator]]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, self.temperature, self.top_k, self.top_p, self.generator,
                                 generators=self.generators)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return token_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        return draw(probs, self.generator, self.generators)

    def uniform(self, like: torch.Tensor) -> torch.Tensor:
        """Draws uniform on (0, 1], shaped like `like`: exp(-E) for E ~ Exp(1), from the same generators."""
        return torch.exp(-exponential_noise(like, self.generator, self.generators))


def narrowed_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The distribution a token is drawn from (temperature > 0), over the columns that can be drawn: all of them, or
    with top-k or top-p the likeliest first, whose token ids are then `candidates` (else None). [..., V] logits."""
    logits = logits.float() / temperature
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        # Only the k likeliest tokens can be drawn: the rest of the work is done on those k columns alone.
        logits, candidates = torch.topk(logits, top_k, dim=-1)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            probs, candidates = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays while the mass of
        # the tokens ranked above it is still short of top_p (so the most likely one always stays).
        mass_above = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_above >= top_p, 0.0)
    return probs, candidates


def token_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float]) -> torch.Tensor:
    """The distribution sample_next_token draws from, over the whole vocabulary: [..., V] logits to probabilities
    summing to 1, zero outside top-k and the nucleus. Speculative decoding compares the draft's and the model's."""
    probs, candidates = narrowed_probs(logits, temperature, top_k, top_p)
    if top_p is not None and top_p < 1.0:
        probs = probs / probs.sum(dim=-1, keepdim=True)  # the nucleus alone (draw() itself needs no normalising)
    if candidates is None:
        return probs
    return torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter_(-1, candidates, probs)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
         generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """An index drawn from each row of [B, V] probabilities (any non-negative weights, not all zero): [B]."""
    # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i / sum(p): an exact sample without the
    # host-side checks of torch.multinomial. The clamp keeps a zero draw from turning 0/0 into NaN.
    noise = exponential_noise(probs, generator, generators).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def exponential_noise(like: torch.Tensor, generator: Optional[torch.Generator] = None,
                      generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Exp(1) draws shaped like `like` [B, ...]; with generators, row i's come from generators[i] alone (the same
    whatever else is in the batch)."""
    if generators is None:
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    return torch.stack([torch.empty_like(row).exponential_(1.0, generator=g) for row, g in zip(like, generators)])


def sample_rows(logits: torch.Tensor, temperature: PerRow[float], top_k: PerRow[Optional[int]],
                top_p: PerRow[Optional[float]], generator: Optional[torch.Generator],
                generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    """sample_next_token with settings per row: the rows that share settings are drawn as one batch, so that a row
    draws exactly what it would in a batch of its own settings alone (with generators, the same token; the same
    noise over the same columns), and a batch whose rows all share settings costs what it always did."""
    B = logits.size(0)
    settings = [s if isinstance(s, (list, tuple)) else [s] * B for s in (temperature, top_k, top_p)]
    if any(len(s) != B for s in settings):
        raise ValueError(f"per-row temperature, top_k and top_p must hold one value per row ({B})")
    groups = {}
    for row, key in enumerate(zip(*settings)):
        groups.setdefault(key, []).append(row)
    if len(groups) == 1:
        return sample_next_token(logits, *next(iter(groups)), generator, generators=generators)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    for (t, k, p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        mine = None if generators is None else [generators[r] for r in rows]
        tokens[index] = sample_next_token(logits[index], t, k, p, generator, generators=mine)
    return tokens


def check_generation_args(idx: Union[torch.Tensor, Sequence[torch.Tensor]], max_new_tokens: int,
                          temperature: float, top_k: Optional[int], top_p: Optional[float], num_samples: int,
                          vocab_size: int, stop_tokens: Optional[Iterable[int]] = None, seed: Optional[int] = None,
                          generator: Optional[torch.Generator] = None, *, device: Optional[torch.device] = None,
                          generators: Optional[Sequence[torch.Generator]] = None) -> Optional[list[int]]:
    """Raise TypeError or ValueError naming the first argument of generation that is wrong; the stop tokens as a
    list (None for none). idx is a [B, T] tensor of ids or a list of 1-D id tensors (prompts of any lengths).
    device, the model's, is where the prompts must be and the generators must draw: checked before anything runs
    there, as a mismatch would otherwise fail after the prefill with a RuntimeError naming no argument."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples, seed)
    check_generators(generator, generators, device)
    if isinstance(idx, torch.Tensor) or not isinstance(idx, (list, tuple)):
        check_token_ids(idx, vocab_size, device)
    else:
        check_prompt_list(idx, vocab_size, device)
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if stop_tokens is None:
        return None
    if isinstance(stop_tokens, torch.Tensor):
        stop_tokens = stop_tokens.tolist()
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
        raise TypeError(f"stop_tokens must be a list of token ids, such as [50256], or None; got {stop_tokens!r} "
                        f"({type(stop_tokens).__name__})")
    stop_tokens = list(stop_tokens)
    for token in stop_tokens:
        check_int("each of stop_tokens", token, 0, vocab_size - 1)
    return stop_tokens


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                        num_samples: int, seed: Optional[int] = None) -> None:
    """The checks on generation's numbers alone, for callers that validate before any model or prompt exists."""
    check_int("max_new_tokens", max_new_tokens, 0)
    check_number("temperature", temperature, ">= 0 (0 is greedy)", lambda t: t >= 0)
    if top_k is not None:
        check_int("top_k", top_k, 1, none_ok=True)
    if top_p is not None:
        check_number("top_p", top_p, "in (0, 1] or None", lambda p: 0 < p <= 1)
    check_int("num_samples", num_samples, 1)
    if seed is not None:
        check_int("seed", seed, -2 ** 63, 2 ** 64 - 1, rule="in -2**63..2**64-1 (what torch.Generator takes) or None")


def check_generators(generator: Optional[torch.Generator], generators: Optional[Sequence[torch.Generator]],
                     device: Optional[torch.device]) -> None:
    """generator, or each of generators, must be a torch.Generator of the model's device type (the noise is drawn
    beside the logits; a CUDA generator serves every GPU)."""
    named = [] if generator is None else [("generator", generator)]
    named += [(f"generators[{i}]", g) for i, g in enumerate(generators or ())]
    for name, g in named:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"{name} must be a torch.Generator or None, got {type(g).__name__}")
        if device is not None and g.device.type != device.type:
            raise ValueError(f"{name} is a {g.device.type} generator but the model is on {device}: make it with "
                             f"torch.Generator(device={str(device)!r})")


def check_prompt_list(prompts: Sequence[torch.Tensor], vocab_size: int, device: Optional[torch.device] = None) -> None:
    """A list of prompts must hold non-empty 1-D tensors of ids in the vocabulary, all on one device (device, if
    given)."""
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1:
            what = f"a {p.dim()}-D tensor" if isinstance(p, torch.Tensor) else type(p).__name__
            raise TypeError(f"idx must be a (batch, length) tensor of token ids or a list of 1-D id tensors, but "
                            f"idx[{i}] is {what}; for a list of ids use torch.tensor([ids])")
        if p.numel() == 0:
            raise ValueError(f"idx[{i}] is empty; start from <|endoftext|> (id 50256) to generate without a prompt")
        if p.device != prompts[0].device:
            raise ValueError(f"idx[{i}] is on {p.device} but idx[0] on {prompts[0].device}: put every prompt on "
                             "the model's device")
    if not prompts:
        raise ValueError("idx is an empty list: give at least one prompt")
    check_token_ids(torch.cat(list(prompts))[None], vocab_size, device)  # one device sync for every prompt


def check_token_ids(idx: torch.Tensor, vocab_size: int, device: Optional[torch.device] = None) -> None:
    """idx must be a non-empty [B, T] tensor of integer ids in 0..vocab_size - 1 (one device sync, for the range), on
    device if one is given (the model's)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a (batch, length) tensor of token ids, got {type(idx).__name__}; for a list "
                        f"of ids use torch.tensor([ids])")
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
        raise ValueError(f"idx must be a (batch, length) tensor of token ids (torch.long), got {idx.dim()} "
                         f"dimension(s) of {idx.dtype}; for a single prompt use ids[None]")
    if idx.numel() == 0:
        raise ValueError(f"idx is empty (shape {tuple(idx.shape)}); start from <|endoftext|> (id 50256) "
                         "to generate without a prompt")
    if device is not None and idx.device != device:
        raise ValueError(f"idx is on {idx.device} but the model on {device}: move the prompt to the model's device "
                         f"(idx.to({str(device)!r}))")
    low, high = torch.aminmax(idx)
    low, high = low.item(), high.item()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"idx holds token ids outside the vocabulary: they must be in 0..{vocab_size - 1}, "
                         f"got {low}..{high}")


def check_int(name: str, value: Any, low: int, high: Optional[int] = None, none_ok: bool = False,
              rule: Optional[str] = None) -> None:
    """TypeError unless value is an int (a bool is not one); ValueError unless low <= value (<= high)."""
    rule = rule or (f">= {low}" if high is None else f"in {low}..{high}") + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {rule}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {rule}, got {value}")


def check_number(name: str, value: Any, rule: str, in_range: Callable[[float], bool]) -> None:
    """TypeError unless value is a real number (a bool is not one); ValueError unless it is finite and in range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {rule}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {rule}, got {value}")
    if not in_range(value):
        raise ValueError(f"{name} must be {rule}, got {value}")
