"""
How the network's matrix products are computed on a CPU: the two-core route for decoding, and int8 and float16
weights.

model.py builds every projection as a `RoutedLinear`, which is nn.Linear with a faster route for the few-row
products of decoding on a CPU. `quantize_int8` and `quantize_fp16` swap each of them for an `Int8Linear` or an
`Fp16Linear`. None of this knows anything of GPT-2; the measurements behind the choices here are in the README's
speed section.
"""

import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F


class RoutedLinear(nn.Linear):
    """nn.Linear whose float32 products of a few rows run on both cores of a CPU.

    torch computes a one-row float32 product (a matrix-vector product) on a single thread, yet streaming the
    weights from memory at full speed takes every core of a small machine. Viewing the weight as two halves of
    output rows turns the product into a batch of two, which torch spreads over two threads: the same sums in the
    same order, so one row gives a result identical to F.linear's, and a few rows agree to float rounding. Past
    `max_rows` rows, and on a GPU, in bfloat16 or inside a compiled graph, F.linear is already the right call.
    """

    max_rows = 64  # the most rows sent the two-halves way (see the README's speed section)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        w, b = self.weight, self.bias
        rows = x.numel() // x.size(-1)
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
                or rows > self.max_rows or torch.get_num_threads() < 2):
            return F.linear(x, w, b)
        n, k = w.shape
        half = n // 2
        halves = w[:2 * half].view(2, half, k).transpose(1, 2)  # [2, k, half], a view: no copy
        x2 = x.reshape(1, rows, k).expand(2, rows, k)
        if b is None:
            y = torch.bmm(x2, halves)
        else:
            y = torch.baddbmm(b[:2 * half].view(2, 1, half), x2, halves)
        y = y.transpose(0, 1).reshape(rows, 2 * half)
        if n % 2:  # an odd count (GPT-2's 50257 tokens): the last output row on its own
            y = torch.cat([y, F.linear(x.reshape(rows, k), w[-1:], None if b is None else b[-1:])], dim=1)
        return y.view(*x.shape[:-1], n)


class Int8Linear(nn.Module):
    """A Linear held as int8 weights with one float scale per output row (symmetric: w ~ scale * q, |q| <= 127).

    The product is fbgemm's dynamically quantized one: each call quantizes its input to 8 bits (one scale per call)
    and multiplies int8 by int8 into int32 on every core, reading a quarter of float32's bytes. The price is a
    relative error of about 1e-2 per product, which bench.py --fidelity measures on a trained model. CPU only.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        # reduce_range keeps the activations to 7 bits: AVX2's int8 multiply-add (vpmaddubsw) sums pairs into int16
        # and would saturate with full-range operands.
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Fp16Linear(nn.Module):
    """A Linear held as float16 weights, multiplied by fbgemm in float32: the weights are widened to float32 as they
    are read (the F16C instructions, which every AVX2 CPU has) and the sums are float32.

    It reads half of float32's bytes for a relative error of about 2e-4 per product. On a CPU without bfloat16
    instructions this is the fast half precision: bfloat16 weights there are converted by slower generic code
    (see the README's speed section). CPU only.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(f"fp16 weights run on the CPU only; this Linear is on {linear.weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        # What a decode step reads: the float16 weights and the float32 bias (for bench.py's roofline).
        self.nbytes = 2 * self.in_features * self.out_features + (0 if bias is None else 4 * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self._packed)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weights"


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Replace every Linear inside model by make(linear), in place (a tied LM head too: it gets its own copy, while
    the input embedding stays float32, of which a step reads only one row per token)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every Linear inside model as an Int8Linear, in place."""
    return swap_linears(model, Int8Linear)


def quantize_fp16(model: nn.Module) -> nn.Module:
    """Every Linear inside model as an Fp16Linear, in place."""
    return swap_linears(model, Fp16Linear)
