"""GPT-2 in plain PyTorch: the network and its KV cache.

The file reads top to bottom: the config, the KV cache, attention, MLP and block, then GPT with its
forward pass, from_pretrained, and the two passes generation is made of: prefill (prompts from
position 0) and decode_step (new positions for every row, each at its own). generate.py drives them;
load.py reads checkpoint files; linear.py holds the CPU's matmul routes and the int8 and float16
weights; sampling.py draws each token and checks arguments.
"""

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Union

import torch
import torch.nn as nn
from torch.nn import functional as F

import load
from linear import Linear, quantize_fp16, quantize_int8
from sampling import check_int, check_token_ids


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # nanoGPT's padded training size; GPT-2 checkpoints carry their 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has; nanoGPT can train without


class KVCache:
    """Every layer's keys and values for each row of a batch, and how many positions each row has
    filled.

    Rows advance on their own: a row's new positions are written at its own length, and each query
    sees the keys of its own row up to its own position. What lies past a row's length is stale and
    seen by no query, so taking positions back (a draft's rejected tokens) is only lowering a
    length, and a row can start over (a new prompt, or a window that slid) while the others go on.
    Each layer holds a K and a V tensor of its own: a compiled step then writes them in place
    (Inductor copies a write into a slice of a larger graph input). A static cache (compiled
    decoding) shows a step the whole buffer, so that every step has the same shapes and is captured
    once.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, static: bool = False):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        # k[layer], v[layer]: [B, H, max_len, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        # Positions filled per row, on the host: generation reads them without waiting for a GPU.
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.all_rows = torch.arange(batch_size, device=device)
        self.static = static
        # Runs of rows a decode step's attention takes apart, each over the keys up to its own longest row: a
        # batch whose rows are kept ordered by length (continuous batching: batch.py) reads far fewer stale keys.
        self.groups = 1
        if static:
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)  # a captured graph writes here: keep it

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def positions(self, new: int) -> torch.Tensor:
        """[B, new] positions of each row's next `new` tokens, on the cache's device. A row already
        at the end gets the last positions (what it writes there is redone by the window slide that
        follows)."""
        pos = self.lengths[:, None] + torch.arange(new)
        return pos.clamp(max=self.max_len - 1).to(self.all_rows.device, non_blocking=True)

    def visible(self, new: int) -> list[tuple[int, int, int]]:
        """Keys a step of `new` positions per row may see, for each of the `groups` runs of rows:
        (first row, end row, keys): the whole buffer in a static cache, else up to the end of the
        run's longest row."""
        if self.static:
            return [(0, self.lengths.numel(), self.max_len)]
        return [(a, b, min(int(self.lengths[a:b].max()) + new, self.max_len))
                for a, b in row_runs(self.lengths.numel(), self.groups)]

    def move(self, src: int, dst: int) -> None:
        """Row src's keys and values (the positions it has filled) to row dst, which takes its
        length; src is left to be written over."""
        n = int(self.lengths[src])
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def write(self, layer: int, rows: torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store new keys and values. A prompt shared by several rows (its samples) is written to
        each."""
        # rows: [R], input_pos: [R or 1, S], k, v: [R or R / samples, H, S, D]
        if k.size(0) != rows.size(0):
            k = k.repeat_interleave(rows.size(0) // k.size(0), dim=0)
            v = v.repeat_interleave(rows.size(0) // v.size(0), dim=0)
        self.k[layer][rows[:, None], :, input_pos] = k.transpose(1, 2)  # indexed view: [R, S, H, D]
        self.v[layer][rows[:, None], :, input_pos] = v.transpose(1, 2)


def row_runs(rows: int, groups: int) -> list[tuple[int, int]]:
    """`rows` rows cut into `groups` runs of about equal size: (first row, end row) of each, the empty left out."""
    ends = [rows * (g + 1) // groups for g in range(groups)]
    return [(a, b) for a, b in zip([0] + ends[:-1], ends) if b > a]


class CacheStep(NamedTuple):
    """What one pass over new positions does with the cache: write rows' keys and values at
    input_pos. A prompt (mask None) sees its own; in a decode step each query sees its row's keys
    where mask is 0 (an additive mask, -inf elsewhere, made once a step rather than converted in
    every layer), each run of rows in `groups` up to its own keys (KVCache.visible)."""
    cache: KVCache
    rows: torch.Tensor  # [R] the cache rows being written
    input_pos: torch.Tensor  # [R or 1, S]
    mask: Optional[torch.Tensor] = None  # [B, 1, S, visible of the longest run], or None for a prompt
    groups: tuple[tuple[int, int, int], ...] = ()  # (first row, end row, keys seen) in a decode step


class Packed(NamedTuple):
    """Several passes as one (a decode step and new prompts): their tokens side by side in one row
    [1, N], so that every product reads its weights once for all of them, and attention for each
    pass apart, as it would run alone."""
    shapes: list[tuple[int, int]]  # each pass's [b, s], in the order of its tokens
    steps: list[CacheStep]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head "
                             f"({config.n_head})")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value in one product
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, step: Union[CacheStep, Packed, None] = None) -> torch.Tensor:
        qkv = self.c_attn(x)  # [B, S, 3C]: every token's query, key and value in one product
        if isinstance(step, Packed):  # x: [1, N, C], the passes' tokens side by side
            parts = zip(qkv[0].split([b * s for b, s in step.shapes]), step.shapes, step.steps)
            y = torch.cat([self._attend(part.view(b, s, -1), part_step).view(b * s, -1)
                           for part, (b, s), part_step in parts])[None]
        else:
            y = self._attend(qkv, step)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, qkv: torch.Tensor, step: Optional[CacheStep]) -> torch.Tensor:
        """[B, S, 3C] queries, keys and values to attention's output [B, S, C] (before the
        projection), writing the keys and values into the cache if there is one."""
        q, k, v = self._heads(qkv)  # [B, H, S, D]
        if step is not None:
            step.cache.write(self.layer_idx, step.rows, step.input_pos, k, v)
        if step is not None and step.mask is not None:  # a decode step: a query sees its row up to itself
            keys, values = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]  # [B, H, max_len, D]
            runs = [F.scaled_dot_product_attention(q[a:b], keys[a:b, :, :seen], values[a:b, :, :seen],
                                                   attn_mask=step.mask[a:b, ..., :seen])
                    for a, b, seen in step.groups]  # each run of rows over its own keys
            return self._merge_heads(runs[0] if len(runs) == 1 else torch.cat(runs))
        # A prompt from position 0 over its own keys: causal (flash kernels where the device has them).
        # An `if`, so that a compiled prefill of any length gets a plain bool.
        is_causal = False
        if q.size(2) > 1:
            is_causal = True
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self._merge_heads(y)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, C3 = qkv.size()
        qkv = qkv.view(B, T, 3, self.n_head, C3 // (3 * self.n_head))
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: [B, H, T, D], views of one product

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, D = y.size()
        return y.transpose(1, 2).reshape(B, T, H * D)  # a view for one position, a copy for several


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's own gelu ("gelu_new"); the erf form drifts from its weights
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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

    def forward(self, x: torch.Tensor, step: Union[CacheStep, Packed, None] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x))


class Embedding(nn.Embedding):
    """nn.Embedding without its own N(0, 1) draw: GPT._init_weights draws GPT-2's N(0, 0.02) over it
    anyway, and a model built on the meta device to be filled from a checkpoint needs none (torch's
    meta normal_ alone costs a second of start-up, importing its compiler)."""

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
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self._compiled = {}
        if self.lm_head.weight.is_meta:  # to be filled from a checkpoint: random values are wasted
            return
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections so the residual stream's variance does not grow with
        # depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, whatever the precision its weights are held in; the position embedding
        is left out by default (the token one is shared with the head)."""
        shapes = load.expected_shapes(vars(self.config))
        n = sum(math.prod(shape) for name, shape in shapes.items() if name != "lm_head.weight")
        if non_embedding:
            n -= math.prod(shapes["transformer.wpe.weight"])
        return n

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to sample a 1024-position checkpoint with less memory (checked
        first: a refusal leaves the model as it was)."""
        check_int("block_size", block_size, 1, self.config.block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        self.config.block_size = int(block_size)
        self._compiled.clear()  # its static cache was shaped for the old context

    def quantize_int8(self) -> "GPT":
        """Int8 weights, per-row scales, for every Linear, in place (CPU only; linear.py)."""
        return quantize_int8(self)

    def quantize_fp16(self) -> "GPT":
        """Float16 weights for every Linear, summed in float32, in place (CPU only; linear.py)."""
        return quantize_fp16(self)

    def _hidden(self, idx: torch.Tensor, input_pos: torch.Tensor,
                step: Union[CacheStep, Packed, None] = None) -> torch.Tensor:
        # idx: [B, S], input_pos: [B or 1, S] -> [B, S, C]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(input_pos))
        for block in self.transformer.h:
            x = block(x, step)
        return self.transformer.ln_f(x)

    def _positions(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size "
                             f"{self.config.block_size}")
        return torch.arange(T, device=idx.device)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                all_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits for [B, T] token ids, without any cache.

        With targets: logits for every position and the mean cross-entropy (targets of -1 are
        ignored). Without: logits for the last position only, shape [B, 1, V], unless
        all_logits=True asks for every position.
        """
        check_token_ids(idx, self.config.vocab_size)
        x = self._hidden(idx, self._positions(idx)[None])
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        return self.lm_head(x if all_logits else x[:, [-1], :]), None

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: Optional[dict] = None, *,
                        quantize: Optional[str] = None) -> "GPT":
        """Load GPT-2 weights, in eval mode and float32, from any of:

        - 'gpt2' ... 'gpt2-xl', 'distilgpt2', or a hub repo id of a GPT-2 model, fetched once
          through huggingface_hub's cache and then read offline;
        - a local folder in the Hugging Face layout (config.json with model.safetensors or
          pytorch_model.bin);
        - a nanoGPT training checkpoint (ckpt.pt, or a folder holding one). override_args may set
          dropout only. Raises load.LoadError with what went wrong and what to do.
        quantize="int8" or "fp16" (CPU) rounds each weight as it is read (load.build_pretrained).
        """
        if quantize not in (None, "int8", "fp16"):
            raise ValueError(f"quantize must be None, 'int8' or 'fp16', got {quantize!r}")
        return load.build_pretrained(model_type, override_args, lambda args: cls(GPTConfig(**args)),
                                     quantize).eval()

    # ----------------------------------------------------------------------------------------------
    # The two passes of generation (driven by generate.py): a prompt from position 0, then new
    # positions per row.

    def prefill(self, idx: torch.Tensor, lengths: torch.Tensor, kv_cache: Optional[KVCache] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run prompts from position 0, writing their keys and values into the cache rows `rows` (if
        a cache is given); logits [B, V] for the token after each. Unchecked: generation checks the
        ids on entry."""
        # idx: [B, T] prompts, each padded on the right to T; lengths: [B] their own lengths on
        # idx's device
        input_pos = torch.arange(idx.size(1), device=idx.device)[None]  # [1, T]
        step = None
        if kv_cache is not None:
            step = CacheStep(kv_cache, kv_cache.all_rows if rows is None else rows, input_pos, None)
        x = self._hidden(idx, input_pos, step)
        last = x[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # [B, C]
        return self.lm_head(last)

    def decode_step(self, idx: torch.Tensor, input_pos: torch.Tensor,
                    kv_cache: KVCache) -> torch.Tensor:
        """Feed every row of the cache S new tokens at its own positions; logits [B, S, V] after
        each of them."""
        # idx, input_pos: [B, S]
        return self.lm_head(self._hidden(idx, input_pos, self._decoding(idx, input_pos, kv_cache)))

    def _decoding(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_cache: KVCache) -> CacheStep:
        """A decode step's CacheStep: an additive mask, -inf past each query's own position in its
        row, made once a step. (Its writes are index_put, as a prompt's: Inductor turns a scatter_
        into a copy of the cache and back, the index_put it does in place.)"""
        groups = kv_cache.visible(idx.size(1))
        keys = torch.arange(max(seen for _, _, seen in groups), device=idx.device)
        hidden = keys > input_pos[:, None, :, None]  # [B, 1, S, visible]: past its row's position
        mask = torch.zeros(hidden.shape, dtype=kv_cache.k[0].dtype, device=idx.device)
        mask.masked_fill_(hidden, float("-inf"))
        return CacheStep(kv_cache, kv_cache.all_rows, input_pos, mask, tuple(groups))

    def decode_and_prefill(self, idx: Optional[torch.Tensor], input_pos: Optional[torch.Tensor],
                           kv_cache: KVCache, prompts: list[tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[Optional[torch.Tensor], list[torch.Tensor]]:
        """A decode step (as decode_step; idx None for none) and the prefill of new prompts, in one
        pass (Packed): every product reads its weights once for all of their tokens. prompts holds
        rectangles of prompts of one length and the cache rows each goes to (its samples' rows
        after each other), so that none is padded; continuous batching starts prompts this way, at
        no cost of a pass of their own. Logits [B, S, V] of the step (None without one) and [n, V]
        after each rectangle's prompts."""
        # idx, input_pos: [B, S]; prompts: ([n, T] ids, [n or n * samples] rows on its device)
        shapes, steps, ids, positions = [], [], [], []
        if idx is not None:
            shapes.append((idx.size(0), idx.size(1)))
            steps.append(self._decoding(idx, input_pos, kv_cache))
            ids.append(idx.reshape(-1))
            positions.append(input_pos.reshape(-1))
        for part, rows in prompts:
            pos = torch.arange(part.size(1), device=part.device)
            shapes.append((part.size(0), part.size(1)))
            steps.append(CacheStep(kv_cache, rows, pos[None], None))
            ids.append(part.reshape(-1))
            positions.append(pos.repeat(part.size(0)))
        x = self._hidden(torch.cat(ids)[None], torch.cat(positions)[None], Packed(shapes, steps))[0]
        decoded = 0 if idx is None else idx.numel()
        ends, start = [], decoded
        for n, T in shapes[len(shapes) - len(prompts):]:  # each prompt's last token
            ends.append(start + T - 1 + T * torch.arange(n))
            start += n * T
        ends = torch.cat(ends).to(x.device, non_blocking=True)
        logits = self.lm_head(torch.cat([x[:decoded], x[ends]]))  # [B * S + prompts, V]
        step_logits = None if idx is None else logits[:decoded].view(idx.size(0), idx.size(1), -1)
        return step_logits, list(logits[decoded:].split([part.size(0) for part, _ in prompts]))

    @torch.no_grad()
    def generate_stream(self, idx: Union[torch.Tensor, list[torch.Tensor]], max_new_tokens: int,
                        temperature: float = 1.0, top_k: Optional[int] = None,
                        **options) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens, one per row, as they are made: see
        generate.generate_stream."""
        from generate import generate_stream  # generate.py imports this module: import it here
        return generate_stream(self, idx, max_new_tokens, temperature, top_k, **options)

    @torch.no_grad()
    def generate(self, idx: Union[torch.Tensor, list[torch.Tensor]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 **options) -> Union[torch.Tensor, list[torch.Tensor]]:
        """nanoGPT's generate: the prompt [B, T] followed by up to max_new_tokens sampled tokens;
        for a list of prompts, a list of each one's tokens: see generate.generate."""
        from generate import generate
        return generate(self, idx, max_new_tokens, temperature, top_k, **options)
