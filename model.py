"""
GPT-2 in plain PyTorch: the network and its generation.

The file reads top to bottom: the config, the KV cache, attention, MLP and block, then GPT with its forward pass,
from_pretrained, and generation in named phases (prefill, decode_step, slide_window_step, and the loop that drives
them, generate_stream). Checkpoint files are read by load.py; the CPU's matmul routes, int8 and float16 weights and
the thread choice live in linear.py; sampling.py draws each token and checks generation's arguments.
"""

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F

import load
from linear import COMPILED_TURN, Fp16Linear, Int8Linear, RoutedLinear, ThreadChooser, quantize_fp16, quantize_int8
from sampling import check_generation_args, check_int, check_token_ids, sample_next_token


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # nanoGPT's padded training vocabulary; GPT-2 checkpoints carry their own 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has; nanoGPT can train without


class KVCache:
    """Every layer's keys and values for the positions seen so far, allocated once for the whole generation.

    A prompt (several new positions) attends to its own keys, causally. A decode step (one new position) attends to
    the cache: an eager cache gives the filled part, [:length], so a step costs what the sequence so far costs; a
    static cache (compiled decoding) gives the whole buffer and a mask instead, so that every step has the same
    shapes, which is what lets torch.compile capture the step once (and replay it as a CUDA graph).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, static: bool = False):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, max_len, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.static = static
        self.length = 0  # positions filled, including the one being decoded; kept by the generation loop
        if static:
            self.positions = torch.arange(max_len, device=device)
            torch._dynamo.mark_static_address(self.k)  # written in place by a captured graph: keep the addresses
            torch._dynamo.mark_static_address(self.v)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values; return the keys and values their queries attend to."""
        # input_pos: [T], k, v: [B or B / samples, H, T, D]
        if k.size(0) != self.k.size(1):  # a prompt prefilled once and shared by each of its samples
            repeats = self.k.size(1) // k.size(0)
            self.k[layer].index_copy_(2, input_pos, k.repeat_interleave(repeats, dim=0))
            self.v[layer].index_copy_(2, input_pos, v.repeat_interleave(repeats, dim=0))
        else:
            self.k[layer].index_copy_(2, input_pos, k)
            self.v[layer].index_copy_(2, input_pos, v)
        if k.size(2) > 1 or k.size(0) != self.k.size(1):
            return k, v  # a prompt: it attends to its own keys (its samples share it until they diverge)
        if self.static:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

    def mask(self, input_pos: torch.Tensor) -> Optional[torch.Tensor]:
        """[1, 1, 1, max_len], True where a static cache's one query may look (the filled past and itself); None
        where what update returned needs no mask beyond causality."""
        if not self.static or input_pos.numel() > 1:
            return None
        return (self.positions <= input_pos.view(-1, 1))[None, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = RoutedLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value at once
        self.c_proj = RoutedLinear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        q, k, v = self._heads(x)  # [B, H, T, D]
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, input_pos, k, v)  # [B, H, S, D]: what these queries see
            mask = kv_cache.mask(input_pos)
        # Flash / memory-efficient kernels where the device has them. Causal when the queries and keys are the
        # same positions; a decode step's one query sees only its past in the cache and needs no causal mask.
        is_causal = False
        if mask is None and q.size(2) > 1:  # an `if`, so that a compiled prefill of any length gets a plain bool
            is_causal = True
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self._merge_heads(y)

    def forward_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and the attention probabilities [B, H, T, T], written out (for attention pictures)."""
        q, k, v = self._heads(x)
        T = q.size(2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
        probs = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self._merge_heads(probs @ v), probs

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, D = y.size()
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, H * D)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = RoutedLinear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's own gelu ("gelu_new"); the erf form drifts from its weights
        self.c_proj = RoutedLinear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, kv_cache)
        return x + self.mlp(self.ln_2(x))

    def forward_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, probs = self.attn.forward_with_probs(self.ln_1(x))
        x = x + y
        return x + self.mlp(self.ln_2(x)), probs


class Embedding(nn.Embedding):
    """nn.Embedding without its own N(0, 1) draw: GPT._init_weights draws GPT-2's N(0, 0.02) over it anyway, and a
    model built on the meta device to be filled from a checkpoint needs none (torch's meta normal_ alone costs a
    second of start-up, importing its compiler)."""

    def reset_parameters(self) -> None:
        pass


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
        self.lm_head = RoutedLinear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self._compiled = {}
        if self.lm_head.weight.is_meta:  # built to be filled from a checkpoint: random values would be wasted work
            return
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (the token one is shared with the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to sample a 1024-position checkpoint with less memory (checked first: a refusal
        leaves the model as it was)."""
        check_int("block_size", block_size, 1, self.config.block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        self.config.block_size = int(block_size)
        self._compiled.clear()  # its static cache was shaped for the old context

    def quantize_int8(self) -> "GPT":
        """Int8 weights with per-output-channel scales for every Linear, in place (CPU only; see linear.py)."""
        return quantize_int8(self)

    def quantize_fp16(self) -> "GPT":
        """Float16 weights for every Linear, multiplied in float32, in place (CPU only; see linear.py)."""
        return quantize_fp16(self)

    def _embed(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(input_pos))  # [B, T, C]

    def _hidden(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        x = self._embed(idx, input_pos)
        for block in self.transformer.h:
            x = block(x, input_pos, kv_cache)
        return self.transformer.ln_f(x)

    def _positions(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        return torch.arange(T, device=idx.device)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                all_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits for [B, T] token ids, without any cache.

        With targets: logits for every position and the mean cross-entropy (targets of -1 are ignored). Without:
        logits for the last position only, shape [B, 1, V], unless all_logits=True asks for every position.
        """
        check_token_ids(idx, self.config.vocab_size)
        x = self._hidden(idx, self._positions(idx))
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x if all_logits else x[:, [-1], :]), None

    @torch.no_grad()
    def forward_with_attention(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for every position and the attention probabilities, shape [n_layer, B, n_head, T, T]."""
        check_token_ids(idx, self.config.vocab_size)
        x = self._embed(idx, self._positions(idx))
        probs = []
        for block in self.transformer.h:
            x, layer_probs = block.forward_with_probs(x)
            probs.append(layer_probs)
        return self.lm_head(self.transformer.ln_f(x)), torch.stack(probs)

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: Optional[dict] = None) -> "GPT":
        """Load GPT-2 weights, in eval mode and float32, from any of:

        - 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'distilgpt2', or a hub repo id of a GPT-2 model
          ('openai-community/gpt2'), fetched once through huggingface_hub's cache and then read offline;
        - a local folder in the Hugging Face layout (config.json with model.safetensors or pytorch_model.bin);
        - a nanoGPT training checkpoint (ckpt.pt, or a folder holding one).
        override_args may set dropout only. Raises load.LoadError with what went wrong and what to do.
        """
        config_args, state_dict = load.read_pretrained(model_type, override_args)
        with torch.device("meta"):  # no memory, no init: every tensor comes from the checkpoint
            model = cls(GPTConfig(**config_args))
        model.load_state_dict(state_dict, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared tensor: tie again
        return model.eval()

    # ------------------------------------------------------------------------------------------------------------
    # Generation: the prompt is run once (prefill), then each step feeds one new token per row (decode_step).

    def prefill(self, idx: torch.Tensor, kv_cache: Optional[KVCache]) -> torch.Tensor:
        """Run the [B, T] prompt, writing its keys and values into the cache (if any); logits [B, V] for the next
        token. Unchecked: generation checked the ids on entry, and each step would otherwise wait for the device."""
        x = self._hidden(idx, torch.arange(idx.size(1), device=idx.device), kv_cache)
        return self.lm_head(x[:, -1, :])

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Feed one [B, 1] token per row at position input_pos (a 1-element tensor); logits [B, V] for the next."""
        x = self._hidden(token, input_pos, kv_cache)
        return self.lm_head(x[:, -1, :])

    def slide_window_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for the token after [B, n] tokens, recomputed from scratch over the last block_size of
        them, as nanoGPT does: the no-cache reference, and every step past block_size (GPT-2's positions are
        absolute, so sliding the window shifts every position and no cached key stays valid)."""
        return self.prefill(tokens[:, -self.config.block_size:], None)  # cropped to the context

    def _generation_phases(self, batch_size: int, max_len: int, device: torch.device, compile: bool):
        """The cache and the (prefill, decode_step) pair to use: eager, or compiled over a static cache that is
        kept between calls so that the captured graphs, which hold its address, are replayed rather than rebuilt."""
        dtype = self.transformer.wte.weight.dtype
        if not compile:
            return KVCache(self.config, batch_size, max_len, dtype, device), self.prefill, self.decode_step
        if any(isinstance(m, (Int8Linear, Fp16Linear)) for m in self.modules()):
            raise ValueError("compile=True does not take int8 weights or fp16 weights (torch.compile cannot trace "
                             "fbgemm's packed products): use compile=False, where their decoding is already fast")
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
                        stop_tokens: Optional[Iterable[int]] = None, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None,
                        generators: Optional[Sequence[torch.Generator]] = None, use_kv_cache: bool = True,
                        compile: bool = False) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens, a [B * num_samples] tensor on the model's device, as they are made.

        idx is [B, T] prompt ids; each prompt row is prefilled once and shared by its num_samples samples (rows
        come out sample-major per prompt, like repeat_interleave). A row that draws one of stop_tokens has ended:
        it repeats that token from then on, and the stream stops when every row has ended (on a GPU, which is
        asked only every 8 steps, up to 7 steps later). seed (or a torch.Generator) makes sampling repeatable on
        one device. generators, one per output row, draw each row's noise from its own generator instead, so that
        a row's draws never depend on the other rows of its batch (batch.py's prompts files); a one-row batch
        with seed=s draws the noise of a row whose generator is seeded s. use_kv_cache=False recomputes the whole
        window each step (nanoGPT's method), the reference the cache is tested against. compile=True runs the decode
        step compiled over a static cache (see KVCache), one compiled generation at a time (see linear.CompiledTurn). A
        wrong argument raises TypeError or ValueError naming it.

        Past block_size positions the model conditions on the last block_size tokens, as nanoGPT does. GPT-2's
        position embeddings are absolute, so each such step shifts every position and the cache cannot be reused:
        those steps each cost a full forward pass over block_size tokens.
        """
        stop_tokens = check_generation_args(idx, max_new_tokens, temperature, top_k, top_p, num_samples,
                                            self.config.vocab_size, stop_tokens, seed, generator)
        if generators is not None and (seed is not None or generator is not None):
            raise ValueError("give one of seed, generator and generators, not several")
        if generators is not None and len(generators) != idx.size(0) * num_samples:
            raise ValueError(f"generators must hold one generator per output row ({idx.size(0) * num_samples}), "
                             f"got {len(generators)}")
        device = idx.device
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        block_size = self.config.block_size
        prompt = idx[:, -block_size:]
        B, T = prompt.size(0) * num_samples, prompt.size(1)
        stop = torch.tensor(stop_tokens, device=device) if stop_tokens else None
        ended = torch.zeros(B, dtype=torch.bool, device=device)
        check_every = 1 if device.type == "cpu" else 8  # reading `ended` back waits for the GPU: do it rarely
        # The tokens so far, for the steps that recompute a window: written in place, one column a step, into at
        # most twice block_size columns; when full, the older half goes, so its size never grows with max_new_tokens.
        seq = torch.empty(B, min(T + max_new_tokens, 2 * block_size), dtype=torch.long, device=device)
        seq[:, :T] = prompt.repeat_interleave(num_samples, dim=0)
        kept = T  # columns of seq in use

        with COMPILED_TURN if compile and use_kv_cache else nullcontext():
            if use_kv_cache:
                kv_cache, prefill, decode_step = self._generation_phases(
                    B, min(block_size, T + max_new_tokens), device, compile)
                input_pos = torch.tensor([T - 1], device=device)  # advanced on the device: no host copy per step
                if device.type == "cpu" and not compile and torch.get_num_threads() > 1:
                    # Every core, or one where that is faster now (another program keeps a core busy): see linear.py.
                    decode_step = functools.partial(ThreadChooser().run, decode_step)
            token = None
            for step in range(max_new_tokens):
                n = T + step  # tokens known; the newest sits at position n - 1
                if use_kv_cache and step == 0:
                    kv_cache.length = T
                    logits = prefill(prompt, kv_cache).repeat_interleave(num_samples, dim=0)
                elif use_kv_cache and n <= block_size:
                    kv_cache.length = n
                    input_pos += 1
                    logits = decode_step(token[:, None], input_pos, kv_cache)
                else:  # no cache (the reference), or past block_size, where the cache no longer applies
                    logits = self.slide_window_step(seq[:, :kept])
                next_token = sample_next_token(logits, temperature, top_k, top_p, generator, generators=generators)
                if stop is not None:
                    if token is not None:
                        next_token = torch.where(ended, token, next_token)
                    ended |= torch.isin(next_token, stop)
                if kept == seq.size(1):  # full (only ever at 2 * block_size): keep the newer half, all a window needs
                    seq[:, :block_size] = seq[:, block_size:]
                    kept = block_size
                seq[:, kept] = next_token
                kept += 1
                token = next_token
                yield next_token
                if stop is not None and (step + 1) % check_every == 0 and bool(ended.all()):
                    return

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, **options) -> torch.Tensor:
        """nanoGPT's generate: the prompt [B, T] followed by up to max_new_tokens sampled tokens.

        Keyword options are generate_stream's (top_p, num_samples, stop_tokens, seed, ...). With stop tokens the
        result is as long as the longest row needed; shorter rows are padded with the token that ended them.
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, **options))
        prompt = idx.repeat_interleave(options.get("num_samples", 1), dim=0)
        if not new:
            return prompt
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)
