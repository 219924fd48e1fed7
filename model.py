"""
GPT-2 in plain PyTorch: the module, generation with a KV cache, and loading of every GPT-2 checkpoint.

The file reads top to bottom: configuration, the KV cache, sampling, the network with its generation in named
phases (prefill, decode_step, the streaming loop), int8 weights, and last the loaders, which only turn files into a config and a
state dict and never touch the math above them.
"""

import json
import math
import pickle
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # nanoGPT's padded training vocabulary; GPT-2 checkpoints carry their own 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has; nanoGPT can train without


# ----------------------------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Every layer's keys and values for the positions seen so far, allocated once for the whole generation.

    Eager decoding reads the filled part, [:length], so a step costs what the sequence so far costs. A static cache
    (compiled decoding) always reads the whole buffer under a mask instead: every step then has the same shapes,
    which is what lets torch.compile capture the step once (and replay it as a CUDA graph).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, static: bool = False):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.static = static
        self.length = 0  # positions filled; set by the generation loop, read by eager decoding only
        if static:
            self.positions = torch.arange(max_len, device=device)
            torch._dynamo.mark_static_address(self.k)  # written in place by a captured graph: keep the addresses
            torch._dynamo.mark_static_address(self.v)

    def write(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.size(0) != self.k.size(1):  # a prompt prefilled once and shared by each of its samples
            repeats = self.k.size(1) // k.size(0)
            k, v = k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0)
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(1, 1, T, max_len) True where a query at input_pos may look: the filled past and itself."""
        return (self.positions <= input_pos.view(-1, 1))[None, None]


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits to (B,) token ids. Temperature, then top-k, then top-p (nucleus); temperature 0 is argmax.

    Everything stays on the logits' device, so a GPU never waits on the host here.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None  # token ids of the columns of logits, once narrowed to the likeliest (most likely first)
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
    # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i / sum(p): an exact sample without the
    # host-side checks of torch.multinomial. The clamp keeps a zero draw from turning 0/0 into NaN.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    choice = (probs / noise).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# The network


class Linear(nn.Linear):
    """nn.Linear, with a faster route for the few-row products of decoding on a CPU.

    torch computes a float32 product with one row (a matrix-vector product) on a single thread, yet streaming the
    weights from memory at full speed takes both cores of a small machine. Viewing the weight as two halves of
    output rows makes the same product a batch of two, which torch spreads over two threads: the same sums in the
    same order, so the result is identical, about twice as fast. A few rows (batched decoding, short prompts) gain
    too, equal to F.linear's to float rounding: on a 2-core AVX2 EPYC, 10 rows by GPT-2's 768 x 3072 took 0.83 ms
    this way against 1.5 ms for F.linear (the LM head 17 ms against 29 ms), 32 rows 1.5 ms against 2.0 ms; from a
    few hundred rows F.linear's own threading is as good. Elsewhere (GPU, bfloat16, long prompts) F.linear is
    already the right call.
    """

    max_rows = 64  # the most rows sent the two-halves way (measured above)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        rows = x.numel() // x.size(-1)
        # (a compiled graph has its own kernels for this)
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
                or rows > self.max_rows or torch.get_num_threads() < 2):
            return F.linear(x, w, b)
        n, k = w.shape
        half = n // 2
        halves = w[:2 * half].view(2, half, k).transpose(1, 2)  # (2, k, half), a view: no copy
        x2 = x.reshape(1, rows, k).expand(2, rows, k)
        if b is None:
            y = torch.bmm(x2, halves)
        else:
            y = torch.baddbmm(b[:2 * half].view(2, 1, half), x2, halves)
        y = y.transpose(0, 1).reshape(rows, 2 * half)
        if n % 2:  # an odd count (GPT-2's 50257 tokens): the last output row on its own
            y = torch.cat([y, F.linear(x.reshape(rows, k), w[-1:], None if b is None else b[-1:])], dim=1)
        return y.view(*x.shape[:-1], n)


class Embedding(nn.Embedding):
    """nn.Embedding without its own N(0, 1) draw: GPT._init_weights draws GPT-2's N(0, 0.02) over it anyway, and a
    model built on the meta device to be filled from a checkpoint needs none (torch's meta normal_ alone costs a
    second of start-up, importing its compiler)."""

    def reset_parameters(self) -> None:
        pass


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value at once
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, input_pos=None, decoding=False, attn_mask=None, probs_out=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)

        if kv_cache is not None:
            kv_cache.write(self.layer_idx, input_pos, k, v)
            if decoding:  # attend to every cached position; a prefill attends to its own keys, causally
                k, v = kv_cache.read(self.layer_idx)

        if probs_out is not None:
            y, probs = manual_attention(q, k, v)
            probs_out.append(probs)
        else:
            # Flash / memory-efficient kernels where the device has them. A single query row needs no causal mask:
            # everything in the cache is in its past.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=not decoding,
                dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention written out, for when the probabilities themselves are wanted (attention pictures)."""
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(diagonal=S - T + 1)
    probs = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return probs @ v, probs


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's own gelu ("gelu_new"); the erf form drifts from its weights
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, input_pos=None, decoding=False, attn_mask=None, probs_out=None):
        x = x + self.attn(self.ln_1(x), kv_cache, input_pos, decoding, attn_mask, probs_out)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(config.vocab_size, config.n_embd),
            wpe=Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self._compiled = {}
        if self.lm_head.weight.is_meta:  # built to be filled from a checkpoint: random values would be wasted work
            return
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def quantize_int8(self) -> "GPT":
        """Int8 weights with per-output-channel scales for every Linear, in place (CPU only); see Int8Linear."""
        return quantize_int8(self)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (the token one is shared with the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to sample a 1024-position checkpoint with less memory."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def _positions(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        return torch.arange(T, device=idx.device)

    def _hidden(self, idx, input_pos, kv_cache=None, decoding=False, attn_mask=None, probs_out=None):
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(input_pos))
        for block in self.transformer.h:
            x = block(x, kv_cache, input_pos, decoding, attn_mask, probs_out)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                all_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits for (B, T) token ids, without any cache.

        With targets: logits for every position and the mean cross-entropy (targets of -1 are ignored). Without:
        logits for the last position only, shape (B, 1, V), unless all_logits=True asks for every position.
        """
        x = self._hidden(idx, self._positions(idx))
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x if all_logits else x[:, [-1], :]), None

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: Optional[dict] = None) -> "GPT":
        """Load GPT-2 weights, in eval mode and float32, from any of:

        - 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'distilgpt2', or a hub repo id of a GPT-2 model
          ('openai-community/gpt2'), fetched once through huggingface_hub's cache and then read offline;
        - a local folder in the Hugging Face layout (config.json with model.safetensors or pytorch_model.bin);
        - a nanoGPT training checkpoint (ckpt.pt, or a folder holding one).
        override_args may set dropout only. Raises LoadError with what went wrong and what to do.
        """
        return load_pretrained(cls, model_type, override_args)

    @torch.no_grad()
    def forward_with_attention(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for every position and the attention probabilities, shape (n_layer, B, n_head, T, T)."""
        probs = []
        x = self._hidden(idx, self._positions(idx), probs_out=probs)
        return self.lm_head(x), torch.stack(probs)

    # ------------------------------------------------------------------------------------------------------------
    # Generation: the prompt is run once (prefill), then each step feeds one new token per row (decode_step).

    def prefill(self, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Run the (B, T) prompt, writing its keys and values into the cache; logits (B, V) for the next token."""
        x = self._hidden(idx, torch.arange(idx.size(1), device=idx.device), kv_cache)
        return self.lm_head(x[:, -1, :])

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Feed one (B, 1) token per row at position input_pos (a 1-element tensor); logits (B, V) for the next."""
        mask = kv_cache.mask(input_pos) if kv_cache.static else None
        x = self._hidden(token, input_pos, kv_cache, decoding=True, attn_mask=mask)
        return self.lm_head(x[:, -1, :])

    def _generation_phases(self, batch_size: int, max_len: int, device: torch.device, compile: bool):
        """The cache and the (prefill, decode_step) pair to use: eager, or compiled over a static cache that is
        kept between calls so that the captured graphs, which hold its address, are replayed rather than rebuilt."""
        dtype = self.transformer.wte.weight.dtype
        if not compile:
            return KVCache(self.config, batch_size, max_len, dtype, device), self.prefill, self.decode_step
        max_len = self.config.block_size  # one shape for every call
        cache = self._compiled.get("kv_cache")
        if cache is None or cache.k.shape[1] != batch_size or cache.k.dtype != dtype or cache.k.device != device:
            cache = KVCache(self.config, batch_size, max_len, dtype, device, static=True)
            self._compiled["kv_cache"] = cache
        if "decode_step" not in self._compiled:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs remove per-kernel launches
            self._compiled["decode_step"] = torch.compile(self.decode_step, mode=mode, fullgraph=True)
            self._compiled["prefill"] = torch.compile(self.prefill, dynamic=True, fullgraph=True)
        return cache, self._compiled["prefill"], self._compiled["decode_step"]

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: Optional[int] = None, *, top_p: Optional[float] = None, num_samples: int = 1,
                        stop_tokens: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None, use_kv_cache: bool = True,
                        compile: bool = False) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens, a (B * num_samples,) tensor on the model's device, as they are made.

        idx is (B, T) prompt ids; each prompt row is prefilled once and shared by its num_samples samples (rows
        come out sample-major per prompt, like repeat_interleave). A row that draws one of stop_tokens has ended:
        it repeats that token from then on, and the stream stops when every row has ended (on a GPU, which is
        asked only every 8 steps, up to 7 steps later). seed (or a
        torch.Generator) makes sampling repeatable on one device. use_kv_cache=False recomputes the whole window
        each step (nanoGPT's method), the reference the cache is tested against. compile=True runs the decode
        step compiled over a static cache (see KVCache).

        Past block_size positions the model conditions on the last block_size tokens, as nanoGPT does. GPT-2's
        position embeddings are absolute, so each such step shifts every position and the cache cannot be reused:
        those steps each cost a full forward pass over block_size tokens.
        """
        check_generation_args(idx, max_new_tokens, temperature, top_k, top_p, num_samples, self.config.vocab_size)
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        device = idx.device
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        block_size = self.config.block_size
        prompt = idx[:, -block_size:]
        B, T = prompt.size(0) * num_samples, prompt.size(1)
        stop = torch.tensor(list(stop_tokens), device=device) if stop_tokens else None
        ended = torch.zeros(B, dtype=torch.bool, device=device)
        check_every = 1 if device.type == "cpu" else 8  # reading `ended` back waits for the GPU: do it rarely
        # Every token so far, for the steps that recompute a window; written in place, one column a step.
        seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
        seq[:, :T] = prompt.repeat_interleave(num_samples, dim=0)

        if use_kv_cache:
            kv_cache, prefill, decode_step = self._generation_phases(
                B, min(block_size, T + max_new_tokens), device, compile)
            input_pos = torch.tensor([T - 1], device=device)  # advanced on the device: no host copy per step
        token = None
        for step in range(max_new_tokens):
            n = T + step  # tokens known; the newest sits at position n - 1
            if step == 0 and use_kv_cache:
                logits = prefill(prompt, kv_cache).repeat_interleave(num_samples, dim=0)
            elif use_kv_cache and n <= block_size:
                kv_cache.length = n
                input_pos += 1
                logits = decode_step(token[:, None], input_pos, kv_cache)
            else:
                logits = self(seq[:, max(0, n - block_size):n])[0][:, -1, :]
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if stop is not None:
                if token is not None:
                    next_token = torch.where(ended, token, next_token)
                ended |= torch.isin(next_token, stop)
            seq[:, n] = next_token
            token = next_token
            yield next_token
            if stop is not None and (step + 1) % check_every == 0 and bool(ended.all()):
                return

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, **options) -> torch.Tensor:
        """nanoGPT's generate: the prompt (B, T) followed by up to max_new_tokens sampled tokens.

        Keyword options are generate_stream's (top_p, num_samples, stop_tokens, seed, ...). With stop tokens the
        result is as long as the longest row needed; shorter rows are padded with the token that ended them.
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, **options))
        prompt = idx.repeat_interleave(options.get("num_samples", 1), dim=0)
        if not new:
            return prompt
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


def check_generation_args(idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                          top_p: Optional[float], num_samples: int, vocab_size: int) -> None:
    """Raise ValueError naming the first argument that is out of its range."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError("idx must be a (batch, length) tensor of token ids (torch.long); "
                         "for a single prompt use ids[None]")
    if idx.size(0) == 0 or idx.size(1) == 0:
        raise ValueError(f"idx is empty (shape {tuple(idx.shape)}); start from <|endoftext|> (id 50256) "
                         "to generate without a prompt")
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise ValueError(f"idx holds token ids outside the vocabulary: they must be in 0..{vocab_size - 1}, "
                         f"got {int(idx.min())}..{int(idx.max())}")


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                        num_samples: int) -> None:
    """The checks on generation's numbers alone, for callers that validate before any model or prompt exists."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


# ----------------------------------------------------------------------------------------------------------------
# Int8 weights: GPT.quantize_int8() swaps every Linear for Int8Linear.


class Int8Linear(nn.Module):
    """A Linear held as int8 weights with one float scale per output row (symmetric: w ~ scale * q, |q| <= 127).

    The product is fbgemm's dynamically quantized one: each call quantizes its input to 8 bits (one scale per call)
    and multiplies int8 by int8 into int32 on every core. Decoding reads a quarter of float32's bytes per step. On
    a 2-core AVX2 CPU this was the fastest int8 route measured (the 768 x 50257 head: 1.7 ms, against 3.2 ms for
    weight-only _weight_int8pack_mm with bfloat16 inputs and 8.6 ms for float32 F.linear); the price is a relative
    error of about 1e-2 per product, which bench.py --fidelity measures on a trained model. CPU only.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(f"int8 weights run on the CPU only; this Linear is on {linear.weight.device}")
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row would otherwise divide by zero
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():
            # torch announces the deprecation of quantized tensors on their creation; fbgemm's prepack takes no
            # other input, and the tensor lives only until the line below, so users have nothing to act on.
            warnings.filterwarnings("ignore", message=r".*quantize_per_channel.*deprecated", category=UserWarning)
            q = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
                                           torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(q, bias)
        # What a decode step reads: the int8 weights, their scales and the bias (for bench.py's roofline).
        self.nbytes = q.numel() + 4 * self.out_features * (1 if bias is None else 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range keeps the activations to 7 bits: AVX2's int8 multiply-add (vpmaddubsw) sums pairs into int16
        # and would saturate with full-range operands.
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every Linear inside model for an Int8Linear, in place (the tied LM head too: it gets its own int8 copy,
    while the input embedding stays float32, of which a step reads only one row per token)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Loading: names, folders and files in; a GPTConfig and a state dict out. Nothing here knows the math above.

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some checkpoints store per block


class LoadError(Exception):
    """A checkpoint could not be loaded; the message says why and what to do instead."""


def load_pretrained(cls, model_type: str, override_args: Optional[dict] = None) -> "GPT":
    """GPT.from_pretrained's work: resolve the name, read the files, check, and fill a model built on no memory."""
    override_args = dict(override_args or {})
    if set(override_args) - {"dropout"}:
        raise ValueError(f"override_args may set only 'dropout', got {sorted(override_args)}")
    config, state_dict = read_checkpoint(resolve_checkpoint(str(model_type)))
    for key, value in override_args.items():
        setattr(config, key, value)
    with torch.device("meta"):  # no memory, no init: every tensor comes from the checkpoint
        model = cls(config)
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared tensor: tie again
    return model.eval()


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local path as given, else a hub name or repo id fetched into (or found in) huggingface_hub's cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not _has_weights(path) and (name_or_path in HUB_NAMES or name_or_path.count("/") == 1):
            repo = HUB_NAMES.get(name_or_path, name_or_path)
            raise LoadError(
                f"'{name_or_path}' is taken as the local folder {path.resolve()}, which holds no weights. It hides "
                f"the hub model of that name: remove or rename the folder, or ask for the hub repository by its "
                f"full id ('{repo}') from a directory without such a folder.")
        if path.is_dir() and (name_or_path in HUB_NAMES or name_or_path.count("/") == 1):
            warnings.warn(f"'{name_or_path}' loaded from the local folder {path.resolve()}, not from the hub; "
                          f"rename the folder to reach the hub model", stacklevel=3)
        return path
    if name_or_path.endswith((".pt", ".bin", ".safetensors")) or name_or_path.startswith((".", "/", "~")):
        raise LoadError(f"no such file or folder: {name_or_path}")
    if name_or_path not in HUB_NAMES and name_or_path.count("/") != 1:
        raise LoadError(f"unknown model '{name_or_path}': use one of {', '.join(HUB_NAMES)}, a Hugging Face hub "
                        f"repo id such as 'openai-community/gpt2', a local model folder, or a nanoGPT ckpt.pt")
    return download_from_hub(HUB_NAMES.get(name_or_path, name_or_path))


def download_from_hub(repo_id: str) -> Path:
    """Fetch config, tokenizer files and weights (safetensors, else the pickle) through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    wanted = ["config.json", "generation_config.json", "vocab.json", "merges.txt"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=wanted + ["*.safetensors", "*.safetensors.index.json"]))
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo_id, allow_patterns=wanted + ["pytorch_model*.bin",
                                                                              "pytorch_model.bin.index.json"]))
    except RepositoryNotFoundError:
        raise LoadError(f"the Hugging Face hub has no model '{repo_id}' (or it is private): check the name") from None
    except HFValidationError as e:
        raise LoadError(f"'{repo_id}' is not a valid hub repo id or local path: {e}") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise LoadError(
            f"could not fetch '{repo_id}' from the Hugging Face hub and it is not in the local cache ({type(e).__name__}). "
            f"Connect once to download it (it is cached for later offline use), or pass a local folder that "
            f"holds config.json and model.safetensors, e.g. --init_from=path/to/gpt2") from None
    return folder


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or (folder / "ckpt.pt").exists()


def read_checkpoint(path: Path) -> tuple[GPTConfig, dict]:
    """The config and state dict (our names and layout) of a Hugging Face folder or a nanoGPT checkpoint."""
    if path.is_file():
        return read_nanogpt_checkpoint(path)
    if (path / "config.json").exists():
        return config_from_hf(path / "config.json"), state_dict_from_hf(read_hf_weights(path))
    if (path / "ckpt.pt").exists():
        return read_nanogpt_checkpoint(path / "ckpt.pt")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise LoadError(f"{path} is not a model folder: it needs config.json with model.safetensors or "
                    f"pytorch_model.bin (Hugging Face layout), or a nanoGPT ckpt.pt; it holds {found}")


def config_from_hf(config_file: Path) -> GPTConfig:
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "gpt2":
        raise LoadError(f"{config_file} describes a '{hf.get('model_type')}' model, not GPT-2 (model_type 'gpt2'); "
                        f"this code runs only GPT-2's architecture")
    unsupported = {k: hf[k] for k, ok in [
        ("activation_function", ("gelu_new", "gelu_pytorch_tanh")), ("scale_attn_by_inverse_layer_idx", (False,)),
        ("reorder_and_upcast_attn", (False,)), ("scale_attn_weights", (True,)), ("add_cross_attention", (False,)),
        ("layer_norm_epsilon", (1e-5,)), ("tie_word_embeddings", (True,)),
    ] if k in hf and hf[k] not in ok}
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported["n_inner"] = hf["n_inner"]
    if unsupported:
        raise LoadError(f"{config_file} asks for what GPT-2 does not do and this code does not run: {unsupported}")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)


def read_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a Hugging Face folder as the files name them: safetensors (sharded too), else the
    pickle. Each safetensors tensor is read through a mapping of its own that closes once the caller has copied
    it, so the file's pages are never held in memory beside the whole copied model."""
    from safetensors import safe_open

    files = weight_files(folder, "model.safetensors.index.json", "*.safetensors")
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, tensor
    if files:
        return
    files = weight_files(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not files:
        raise LoadError(f"{folder} has config.json but no weights: it needs model.safetensors or pytorch_model.bin")
    for file in files:
        yield from load_pickle(file).items()


def weight_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    """The shards a sharded checkpoint's index names, else the files matching pattern."""
    index = folder / index_name
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob(pattern))


def state_dict_from_hf(tensors: Iterator[tuple[str, torch.Tensor]]) -> dict:
    """Hugging Face GPT-2 names to ours: add the 'transformer.' prefix where missing, drop the mask buffers and
    the tied head, and transpose the Conv1D weights (stored in, out) to Linear's (out, in). Every tensor is
    copied once into float32 memory of the model's own, so nothing stays tied to the checkpoint file."""
    state_dict = {}
    for name, tensor in tensors:
        if name.endswith(SKIPPED_BUFFERS) or name == "lm_head.weight":
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
            tensor = tensor.t()
        state_dict[name] = tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        del tensor  # the last reference to the file's mapping of this tensor: it closes before the next read
    if "transformer.wte.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def load_pickle(file: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused unrun."""
    try:
        # Mapping the file keeps the pickle's tensors out of memory until used; only zip-format files allow it.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise LoadError(f"refused to load {file}: it is a pickle that holds more than tensors and plain data, and "
                        f"unpickling it could run code ({str(e).splitlines()[0]}). Load it only if you trust it, "
                        f"and convert it to safetensors.") from None
    except RuntimeError as e:
        raise LoadError(f"could not read {file} as a PyTorch checkpoint: {str(e).splitlines()[0]}") from None


def read_nanogpt_checkpoint(file: Path) -> tuple[GPTConfig, dict]:
    """nanoGPT's training checkpoint: {'model_args': ..., 'model': state dict} (maybe saved from a compiled model)."""
    checkpoint = load_pickle(file)
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise LoadError(f"{file} is not a nanoGPT checkpoint: it needs the keys 'model_args' and 'model'")
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in checkpoint["model_args"].items() if k in known})
    state_dict = {}
    for name, tensor in checkpoint["model"].items():
        name = name.removeprefix("_orig_mod.")
        if not name.endswith(SKIPPED_BUFFERS):
            state_dict[name] = tensor
    return config, state_dict


def check_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Refuse, listing them, checkpoints with missing, unexpected or mis-shaped tensors."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{n} {tuple(state_dict[n].shape)} (expected {expected[n]})"
                       for n in set(expected) & set(state_dict) if tuple(state_dict[n].shape) != expected[n])
    problems = [f"{what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} ({len(names)})"
                for what, names in [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
                if names]
    if problems:
        raise LoadError("the checkpoint does not fit GPT-2 of its own config; " + "; ".join(problems))
