"""
How the network's products run on a CPU: float32 weights through oneDNN, and int8 and float16 weights (the token
table of a tied head in the same precision, read a row at a time).

model.py builds every projection as a `Linear`, nn.Linear routed to oneDNN where it can be. `quantize_int8` and
`quantize_fp16` swap each of them for an `Int8Linear` or an `Fp16Linear`, and a token embedding tied to one of them
for a `RowTable` of the same rounded weights; `quantized_from` builds the same modules straight from a
checkpoint's tensors, one tensor at a time. None of this knows anything of GPT-2; the measurements behind the
choices here are in the README's speed section.
"""

import functools
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

# read(name, rows) -> float32 tensor: a checkpoint tensor (rows `rows` of it, if given) in nn.Linear's [out, in]
Reader = Callable[[str, Optional[slice]], torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear (its [out, in] weight, its values and names) whose float32 products on a CPU run on oneDNN.

    F.linear on a CPU runs MKL's sgemm, which on AMD CPUs reads the weights at a fraction of the memory bandwidth,
    most of all for a few rows at once (the README's speed section). oneDNN reads nn.Linear's own layout fastest, so
    the weight is stored as nn.Linear stores it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if onednn_route(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


ONEDNN = torch.backends.mkldnn.is_available()  # torch's CPU builds for x86 and ARM have it


def onednn_route(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product goes to oneDNN: float32 on a CPU, outside autograd (oneDNN's op has no backward) and outside
    torch.compile (which lowers only its packed form, a second copy of the weights). Anything else takes F.linear."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and ONEDNN)


QUANTIZE_ROWS = 256  # rows rounded at a time: float32 temporaries of a few MB, not two copies of the matrix


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows of a float matrix and one float32 scale per row: w ~ scale * q, |q| <= 127. Rounded
    QUANTIZE_ROWS rows at a time: whole, its temporaries set the int8 load's peak (GPT-2 124M: 18 MB more)."""
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
    for start in range(0, w.shape[0], QUANTIZE_ROWS):
        part = slice(start, start + QUANTIZE_ROWS)
        low, high = torch.aminmax(w[part], dim=1)
        scale[part] = torch.maximum(-low, high).clamp(min=1e-12) / 127  # an all-zero row would divide by zero
        q[part] = torch.round(w[part] / scale[part, None]).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear held as int8 weights with one float scale per output row (symmetric: w ~ scale * q, |q| <= 127).

    The product is fbgemm's dynamically quantized one: each call quantizes its input to 8 bits (one scale per call)
    and multiplies int8 by int8 into int32 on every core, reading a quarter of float32's bytes. The price is a
    relative error of about 1e-2 per product, which bench.py --fidelity measures on a trained model. The weights
    live only in fbgemm's packed layout. CPU only.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach().float())
        self._pack(q, scale, linear.bias, linear.weight.device)

    @classmethod
    def from_rows(cls, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> "Int8Linear":
        """From weights already rounded by quantize_rows (a tied head shares them with its token table)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._pack(q, scale, bias, q.device)
        return module

    def _pack(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"int8 weights run on the CPU only; this Linear is on {device}")
        self.out_features, self.in_features = q.shape
        bias = None if bias is None else bias.detach().float()
        self._packed = int8_prepack(q, scale, bias)
        self._reduce_range = not full_range_activations()
        # What a decode step reads: the int8 weights, their scales and the bias (for bench.py's roofline).
        self.nbytes = q.numel() + 4 * self.out_features * (1 if bias is None else 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if x.dim() == 2 and x.dtype == torch.float32:  # a decode step's rows: the product alone
            return torch.ops.quantized.linear_dynamic(x, self._packed, self._reduce_range)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed,
                                               self._reduce_range)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class TiedInt8Linear(Int8Linear):
    """An int8 head tied to a token table (RowTable), multiplying the table's own int8 rows, so that they are held
    once: fbgemm's product would keep a packed copy of its own (39 MB for GPT-2). Each call rounds its input rows to
    int8 (symmetric, one scale a row: 7 bits and a sign) and multiplies int8 by int8 into int32 (torch._int_mm,
    oneDNN's kernels), then scales by both. Used where those kernels are fast (int8_table_products_fast). CPU
    only."""

    def _pack(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"int8 weights run on the CPU only; this Linear is on {device}")
        self.out_features, self.in_features = q.shape
        self._rows, self._scale = q, scale.float()  # the table's tensors, shared, not copied
        self._bias = None if bias is None else bias.detach().float()
        self.nbytes = q.numel() + 4 * self.out_features * (1 if bias is None else 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        rows, step = quantize_rows(x.reshape(-1, self.in_features).float())  # [M, in] int8, [M]
        y = torch._int_mm(rows, self._rows.t()).float()  # [M, out]
        y.mul_(step[:, None]).mul_(self._scale)
        if self._bias is not None:
            y.add_(self._bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


@functools.cache
def int8_table_products_fast() -> bool:
    """Whether a tied int8 head may multiply its token table's own rows (TiedInt8Linear) at about fbgemm's speed.

    torch._int_mm runs oneDNN's int8 kernels on CPUs with VNNI; on others (AVX2 alone) it falls back to a generic
    loop, over ten times fbgemm's time (the README's speed section). Which one a CPU gets is oneDNN's choice, and an
    instruction-set cap in the environment can change it, so it is measured, once: the same product both ways, the
    best of five each (a few milliseconds in all where _int_mm is slow)."""
    q = torch.ones(3072, 768, dtype=torch.int8)
    packed, x, rows = int8_prepack(q, torch.ones(3072), None), torch.ones(1, 768), torch.ones(1, 768, dtype=torch.int8)

    def best(product: Callable[[], torch.Tensor]) -> float:
        product()  # the first call builds the kernel
        times = []
        for _ in range(5):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: torch._int_mm(rows, q.t())) < 4 * best(
        lambda: torch.ops.quantized.linear_dynamic(x, packed, not full_range_activations()))


@functools.cache
def full_range_activations() -> bool:
    """Whether fbgemm's int8 product takes activations of all 8 bits on this CPU without saturating.

    Its kernels multiply unsigned 8-bit activations by signed 8-bit weights. Where they sum pairs of products into
    16 bits (AVX2's vpmaddubsw, AVX-512 without VNNI), full-range operands overflow, and torch's reduce_range keeps
    the activations to 7 bits; VNNI's vpdpbusd sums into 32 bits, and there all 8 bits cut the error of the int8
    model about three times (the README's fidelity figures). Which kernel a CPU gets is fbgemm's choice, so it is
    measured, once: a product whose every pair of terms overflows 16 bits (255 x 127 x 2, of either sign) must
    come out right."""
    q = torch.full((2, 64), 127, dtype=torch.int8)
    q[1] = -127
    x = torch.ones(1, 64)
    x[0, 0] = 0  # the range [0, 1]: every other activation quantized to 255
    y = torch.ops.quantized.linear_dynamic(x, int8_prepack(q, torch.full((2,), 1 / 127), None), False)
    return torch.allclose(y, torch.tensor([[63.0, -63.0]]), rtol=1e-3, atol=0)  # saturated: about half


def int8_prepack(q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> object:
    """fbgemm's packed form of int8 rows q [out, in] with per-row scales."""
    with warnings.catch_warnings():
        # torch announces the deprecation of quantized tensors on their creation; fbgemm's prepack takes no other
        # input, and the tensor lives only until the line below, so users have nothing to act on.
        warnings.filterwarnings("ignore", message=r".*quantize.*deprecated", category=UserWarning)
        qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qt, bias)


class Fp16Linear(nn.Module):
    """A Linear held as float16 weights, multiplied by fbgemm in float32: the weights are widened to float32 as they
    are read (the F16C instructions, which every AVX2 CPU has) and the sums are float32.

    It reads half of float32's bytes for a relative error of about 2e-4 per product. The weights live only in
    fbgemm's packed layout. CPU only.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._pack(linear.weight.detach(), linear.bias)

    @classmethod
    def from_rows(cls, w: torch.Tensor, bias: Optional[torch.Tensor]) -> "Fp16Linear":
        """From float16 weights (a tied head shares them with its token table)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._pack(w, bias)
        return module

    def _pack(self, w: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        if w.device.type != "cpu":
            raise ValueError(f"fp16 weights run on the CPU only; this Linear is on {w.device}")
        self.out_features, self.in_features = w.shape
        bias = None if bias is None else bias.detach().float()
        # fbgemm rounds a float32 weight to float16 itself, and takes a float16 one as it is
        self._packed = torch.ops.quantized.linear_prepack_fp16(w if w.dtype == torch.float16 else w.float(), bias)
        # What a decode step reads: the float16 weights and the float32 bias (for bench.py's roofline).
        self.nbytes = 2 * self.in_features * self.out_features + (0 if bias is None else 4 * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if x.dim() == 2 and x.dtype == torch.float32:  # a decode step's rows: the product alone
            return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self._packed)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weights"


class RowTable(nn.Module):
    """A token embedding tied to an int8 or float16 head, holding the head's rounded weights in rows: int8 with the
    head's per-row scales, or float16. A lookup widens its rows to float32, so the model keeps no float32 copy of the
    table. An int8 head multiplies these same rows where oneDNN's int8 kernels are fast (TiedInt8Linear); an fp16
    head, and an int8 one elsewhere, reads fbgemm's packed copy, which cannot be read a row at a time."""

    def __init__(self, rows: torch.Tensor, scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.shape
        self.register_buffer("rows", rows)  # [V, C] int8 or float16
        self.register_buffer("scale", None if scale is None else scale[:, None].float())  # [V, 1]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: [...] -> [..., C] float32
        x = F.embedding(idx, self.rows).float()
        return x if self.scale is None else x * F.embedding(idx, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {str(self.rows.dtype).removeprefix('torch.')} rows"


ROW_CHUNK = 4096  # rows of a token table rounded at a time while loading: a few MB of float32 at once


def quantized_from(model: nn.Module, read: Reader, kind: str) -> set[str]:
    """Swap, in place, every Linear of model for an Int8Linear (kind "int8") or an Fp16Linear ("fp16") built from
    read(name), and an Embedding tied to one of them for a RowTable of the same rounded weights, whose float32
    rows are read ROW_CHUNK at a time. Works on a model built on the meta device (weights from a checkpoint, one
    tensor at a time) as on a loaded one. Returns the names of the tensors it read."""
    tables = {id(m.weight): (name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    done, swaps = set(), []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            path = f"{name}.{child_name}" if name else child_name
            bias = None if child.bias is None else read(f"{path}.bias", None)
            done |= {f"{path}.weight"} | (set() if bias is None else {f"{path}.bias"})
            tied = tables.get(id(child.weight))
            if tied is None:
                weight = read(f"{path}.weight", None)
                rows, scale = quantize_rows(weight) if kind == "int8" else (weight.half(), None)
                swaps.append((module, child_name, packed_linear(rows, scale, bias)))
                del weight, rows
                continue
            table_name, embedding = tied
            rows, scale = rounded_rows(read, f"{table_name}.weight", embedding.weight.shape, kind)
            done.add(f"{table_name}.weight")
            # The table's own rows, held once, where oneDNN's int8 product is fast; else fbgemm's packed copy
            tie = kind == "int8" and int8_table_products_fast()
            head = TiedInt8Linear.from_rows(rows, scale, bias) if tie else packed_linear(rows, scale, bias)
            swaps.append((module, child_name, head))
            parent = model.get_submodule(table_name.rpartition(".")[0]) if "." in table_name else model
            swaps.append((parent, table_name.rpartition(".")[2], RowTable(rows, scale)))
    for module, child_name, new in swaps:
        setattr(module, child_name, new)
    return done


def packed_linear(rows: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> nn.Module:
    """fbgemm's product over rounded weights: int8 rows with their scales (scale given), else float16 rows."""
    return Int8Linear.from_rows(rows, scale, bias) if scale is not None else Fp16Linear.from_rows(rows, bias)


def rounded_rows(read: Reader, name: str, shape: torch.Size, kind: str) -> tuple[torch.Tensor,
                                                                                  Optional[torch.Tensor]]:
    """A token table rounded to int8 rows and scales, or to float16 rows, reading its float32 rows in chunks."""
    rows = torch.empty(shape, dtype=torch.int8 if kind == "int8" else torch.float16)
    scale = torch.empty(shape[0]) if kind == "int8" else None
    for start in range(0, shape[0], ROW_CHUNK):
        part = slice(start, min(start + ROW_CHUNK, shape[0]))
        chunk = read(name, part)
        if kind == "int8":
            rows[part], scale[part] = quantize_rows(chunk)
        else:
            rows[part] = chunk
    return rows, scale


def in_memory_reader(model: nn.Module) -> Reader:
    """A Reader over a loaded model's own float tensors."""
    tensors = dict(model.state_dict(keep_vars=True))
    return lambda name, rows: tensors[name].detach().float()[rows if rows is not None else slice(None)]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every Linear inside model as an Int8Linear, in place; a token table tied to one as int8 rows."""
    quantized_from(model, in_memory_reader(model), "int8")
    return model


def quantize_fp16(model: nn.Module) -> nn.Module:
    """Every Linear inside model as an Fp16Linear, in place; a token table tied to one as float16 rows."""
    quantized_from(model, in_memory_reader(model), "fp16")
    return model


def rounded_kind(model: nn.Module) -> Optional[str]:
    """"int8" or "fp16" where model's products hold rounded weights (quantize_int8, quantize_fp16 or a quantizing
    load), else None."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Fp16Linear)):
            return "int8" if isinstance(m, Int8Linear) else "fp16"
    return None


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every Linear and LayerNorm whole (the tied token table once, as the
    LM head); of the embedding tables a step reads one row per token, which is left out."""
    total = 0
    for module in model.modules():
        if isinstance(module, (Int8Linear, Fp16Linear)):
            total += module.nbytes
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total
