"""
Attention pictures: every head of a few layers over one sequence, as an animated GIF (one frame per head).

    python attention.py [config/file.py ...] [--key=value ...]      (--help lists every setting)
    python attention.py --init_from=gpt2                                   # assets/attention.gif
    python attention.py --init_from=path/to/model --png=frame.png --frame=2

Starting from <|endoftext|>, the model writes up to --length tokens (or reads --text), then a single forward pass
through the manual attention path collects the attention probabilities. Frame n shows head n of the chosen layers
side by side as heat maps of query position (rows) against key position (columns).

Probabilities span orders of magnitude, so the colours follow a log scale over a fixed range, shared by every
panel and frame so that frames compare directly; the blank triangle above the diagonal is the causal mask.
Generation samples as nanoGPT's sample.py does (temperature 0.8, top_k 200, seed 1337), so one seed remakes one
picture on one machine. Greedy decoding (--temperature=0) is not the default: small models soon fall into a loop
of one token, and every head then looks alike over the looping part.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below: Ctrl-C or SIGTERM while they load ends quietly
    from startup import quiet_startup

    quiet_startup()

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator
from PIL import Image

from cli import memory_named, run_main
from configurator import configure
from errors import UsageError
from model import GPT, GPTConfig
from runtime import MEMORY_SHARE, available_memory, check_sampling, model_from, open_checkpoint
from sampling import check_token_ids
from tokenizer import EOT, EOT_ID, load_tokenizer

if TYPE_CHECKING:
    import tiktoken

# -----------------------------------------------------------------------------
init_from: str = 'gpt2'  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub repo id, a model folder or a nanoGPT ckpt.pt
text: str | None = None  # draw attention over this text (after <|endoftext|>); None draws generated text
length: int = 256  # tokens in the sequence, <|endoftext|> included, at most the model's context
layers: str = '1,2,3,4'  # 1-based layers drawn side by side in every frame, e.g. 1,2,3,4 or all
heads: str = 'all'  # 1-based heads, one frame each, e.g. 1,5,9 or all
duration: int = 1000  # milliseconds per frame: a multiple of 10 (GIF counts hundredths of a second), at most 655350
out: str = 'assets/attention.gif'  # where to write the GIF
png: str | None = None  # also write one frame as a PNG here; None writes none
frame: int | None = None  # the head (1-based) whose frame --png shows; None: the first of --heads
temperature: float = 0.8  # sampling temperature, 0 for greedy
top_k: int | None = 200  # sample from the top_k most likely tokens only; None keeps all
seed: int = 1337  # random seed for sampling: the same seed gives the same picture on the same machine
tiktoken_file: str | None = None  # GPT-2's gpt2.tiktoken rank file, for offline use (else the model's vocab.json)
# -----------------------------------------------------------------------------

# The colour range. Below 1e-4 a key gets less than a fortieth of even a uniform share over 256 positions, which
# reads as "nothing" at a glance; 1 is the most a key can get.
VMIN, VMAX = 1e-4, 1.0
CMAP = colormaps["magma"].with_extremes(bad="white")  # bad = masked = the future, above the diagonal
PANEL_INCHES = 3.0  # each heat map about 256 px wide at DPI, so 256 positions are drawn about one pixel each
DPI = 100


def parse_indices(name: str, spec: str) -> Optional[list[int]]:
    """Setting name's '1,2,4' to [1, 2, 4] (1-based, as the titles show them); 'all' to None."""
    if spec.strip().lower() == "all":
        return None
    try:
        indices = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UsageError(f"--{name}: '{spec}' is not a comma-separated list of numbers such as 1,2,3,4 "
                         f"(or 'all')") from None
    if len(set(indices)) != len(indices):
        raise UsageError(f"--{name}: '{spec}' names a number twice")
    return indices


def check_indices(name: str, indices: Optional[list[int]], count: int) -> list[int]:
    """indices (None for all) checked against the model's count of layers or heads, numbered 1 to count."""
    if indices is None:
        return list(range(1, count + 1))
    bad = [i for i in indices if not 1 <= i <= count]
    if bad:
        raise UsageError(f"--{name} names {', '.join(map(str, bad))}, but the model has {count} {name}, "
                         f"numbered 1 to {count}")
    return indices


def text_ids(enc: tiktoken.Encoding, text: str, length: int) -> torch.Tensor:
    """(1, T) token ids: <|endoftext|> then text's tokens, T <= length."""
    ids = [EOT_ID] + enc.encode(text, allowed_special={EOT})
    if len(ids) == 1:
        raise UsageError("--text is empty: give some text, or leave --text out to generate")
    if len(ids) > length:
        print(f"attention.py: the text is {len(ids) - 1} tokens; drawing the first {length - 1} "
              f"(--length={length} counts <|endoftext|>)", file=sys.stderr)
    return torch.tensor([ids[:length]])


def describe_source(text: Optional[str], temperature: float, top_k: Optional[int], seed: int) -> str:
    """Where the sequence came from (text, else sampled with these settings), for the figure's title: enough to
    make the same picture again."""
    if text is not None:
        one_line = " ".join(text.split())  # whatever the text's own line breaks
        return f"{EOT} + '{one_line[:40]}{'…' if len(one_line) > 40 else ''}'"
    if temperature == 0:
        return f"greedy from {EOT}"
    top = f", top_k {top_k}" if top_k is not None else ""
    return f"sampled from {EOT} (temperature {temperature:g}{top}, seed {seed})"


def attention_probs(model: GPT, ids: torch.Tensor) -> np.ndarray:
    """Attention probabilities of one sequence, (n_layer, n_head, T, T), through the manual attention path."""
    _, probs = forward_with_attention(model, ids)
    return probs[:, 0].float().numpy()


@torch.no_grad()
def forward_with_attention(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every position and the attention probabilities [n_layer, B, n_head, T, T]: the model's forward
    pass with each layer's attention written out (softmax of the scaled scores under the causal mask), where the
    fused kernel of the model's own pass never holds them."""
    check_token_ids(idx, model.config.vocab_size)
    T = idx.size(1)
    x = model.transformer.wte(idx) + model.transformer.wpe(model._positions(idx))
    future = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(diagonal=1)
    probs = []
    for block in model.transformer.h:
        attn = block.attn
        q, k, v = attn._heads(attn.c_attn(block.ln_1(x)))  # [B, H, T, D]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        probs.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1))
        x = x + attn.c_proj(attn._merge_heads(probs[-1] @ v))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x)), torch.stack(probs)


def frame_size(n_panels: int) -> tuple[int, int]:
    """Pixel size (width, height) of a frame with n_panels heat maps side by side."""
    width, height = figure_inches(n_panels)
    return round(width * DPI), round(height * DPI)


def figure_inches(n_panels: int) -> tuple[float, float]:
    return PANEL_INCHES * n_panels + 1.0, PANEL_INCHES + 0.9  # room for the colour bar, titles and axis labels


class AttentionFigure:
    """One figure redrawn per head: the panels, norm and colour bar are built once, so every frame has the same
    layout and colour scale, and only the images and titles change."""

    def __init__(self, probs: np.ndarray, layers: Sequence[int], title: str):
        self.probs, self.layers, self.title = probs, list(layers), title
        T = probs.shape[-1]
        self.future = np.triu(np.ones((T, T), dtype=bool), k=1)
        self.fig = Figure(figsize=figure_inches(len(self.layers)), dpi=DPI, layout="constrained")
        self.canvas = FigureCanvasAgg(self.fig)
        self.axes = self.fig.subplots(1, len(self.layers), squeeze=False)[0]
        tick_step = 2 ** math.ceil(math.log2(max(T / 4, 1)))  # binary steps, about four: 0, 64, 128, 192 for 256
        norm = LogNorm(VMIN, VMAX, clip=True)  # clip: a probability under VMIN takes the lowest colour, not "bad"
        # One pixel or more per position: nearest keeps single strong keys crisp. More positions than pixels
        # (gpt2's 1024): filter, or thin lines such as the diagonal alias into dashes.
        interpolation = "nearest" if T <= PANEL_INCHES * DPI else "antialiased"
        self.images = []
        for i, ax in enumerate(self.axes):
            self.images.append(ax.imshow(self._masked(0, 0), cmap=CMAP, norm=norm, interpolation=interpolation))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MultipleLocator(tick_step))
            ax.tick_params(labelsize=8)
            ax.set_xlabel("key position", fontsize=9)
            if i == 0:
                ax.set_ylabel("query position", fontsize=9)
        bar = self.fig.colorbar(self.images[0], ax=list(self.axes), fraction=0.02, pad=0.01)
        bar.set_label("attention probability", fontsize=9)
        bar.ax.tick_params(labelsize=8)
        # Lay out once, with titles in place, then freeze: every frame gets the same layout, and each draw skips
        # the constrained-layout solve, which costs more than the drawing itself.
        self.render(1)
        self.fig.set_layout_engine("none")

    def _masked(self, layer: int, head: int) -> np.ma.MaskedArray:
        return np.ma.masked_array(self.probs[layer, head], mask=self.future)

    def render(self, head: int) -> Image.Image:
        """The frame of head (1-based) as an RGB image."""
        for ax, image, layer in zip(self.axes, self.images, self.layers):
            image.set_data(self._masked(layer - 1, head - 1))
            ax.set_title(f"layer {layer}, head {head}", fontsize=11)
        self.fig.suptitle(f"{self.title} — head {head}", fontsize=11)
        self.canvas.draw()
        return Image.fromarray(np.asarray(self.canvas.buffer_rgba())[..., :3].copy())


def save_gif(frames: Sequence[Image.Image], path: Path, duration: int) -> None:
    """An animated GIF over one palette made from all frames; without dithering, flat areas stay flat and the
    file compresses well."""
    width, height = frames[0].size
    montage = Image.new("RGB", (width, height * len(frames)))
    for i, frame in enumerate(frames):
        montage.paste(frame, (0, i * height))
    palette = montage.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indexed = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    save_whole(path, lambda f: indexed[0].save(f, save_all=True, append_images=indexed[1:], duration=duration,
                                                loop=0, format="GIF"))  # whatever the file's name ends with


def save_whole(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """write(file) into a temporary file beside path, then renamed to path: a Ctrl-C or a full disk midway leaves
    no truncated picture, and an older picture at path stays until the new one is whole."""
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            write(f)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def main() -> None:
    """Draw the picture the settings ask for; a UsageError (LoadError, TokenizerError) for a mistake."""
    # Every check that needs no model runs first, so that no model loads in vain.
    if not 10 <= duration <= 655350 or duration % 10:
        raise UsageError(f"--duration={duration}: a GIF stores a frame's time in hundredths of a second, up to "
                         f"6553.5 s: give milliseconds that are a multiple of 10, from 10 to 655350")
    if frame is not None and png is None:
        raise UsageError("--frame chooses the head that --png shows: give --png=path.png as well")
    layer_list, head_list = parse_indices("layers", layers), parse_indices("heads", heads)
    check_sampling(0, temperature, top_k, None, 1, seed)  # generate's own checks of --temperature, --top_k, --seed
    checkpoint = open_checkpoint(init_from)  # once: the model and the tokenizer both come from it
    model = model_from(checkpoint, torch.device("cpu"), torch.float32)  # drawn from float32 probabilities
    config = model.config
    if config.vocab_size <= EOT_ID:
        raise UsageError(f"{init_from}'s vocabulary has {config.vocab_size} tokens: attention.py starts every "
                         f"sequence with GPT-2's {EOT} (id {EOT_ID}), which this model lacks (a character-level "
                         f"model?)")
    if not 1 <= length <= config.block_size:
        raise UsageError(f"--length={length} is outside this model's context: use a length from 1 to "
                         f"{config.block_size} (its block_size)")
    check_memory(config, length, available_memory(torch.device("cpu")))
    layer_list = check_indices("layers", layer_list, config.n_layer)
    head_list = check_indices("heads", head_list, config.n_head)
    if frame is not None and not 1 <= frame <= config.n_head:
        raise UsageError(f"--frame={frame} is not a head of this model: it has {config.n_head} heads, numbered 1 "
                         f"to {config.n_head}")
    with memory_named(f"lower --length (now {length}), or draw fewer --layers and --heads, or free some memory"):
        if text is None:
            ids = model.generate(torch.tensor([[EOT_ID]]), length - 1, temperature=temperature, top_k=top_k,
                                 seed=seed)
        else:
            ids = text_ids(load_tokenizer(checkpoint, tiktoken_file), text, length)
        title = f"{Path(init_from).name}: attention over {ids.size(1)} tokens, " \
                f"{describe_source(text, temperature, top_k, seed)}"
        figure = AttentionFigure(attention_probs(model, ids), layer_list, title)
        write_pictures(figure, head_list, out, duration, png, frame if frame is not None else head_list[0])


def check_memory(config: GPTConfig, length: int, available: Optional[int]) -> None:
    """UsageError, before anything runs, for a length whose attention probabilities (every layer's and head's, held
    twice while they are stacked) do not fit in the memory available, with the longest that would."""
    per_pair = 2 * config.n_layer * config.n_head * 4  # bytes for one (query, key) pair, float32
    if available is None or per_pair * length ** 2 <= MEMORY_SHARE * available:
        return
    most = math.isqrt(int(MEMORY_SHARE * available // per_pair))
    raise UsageError(f"--length={length}: the attention probabilities of all {config.n_layer} layers and "
                     f"{config.n_head} heads over {length} tokens take about {per_pair * length ** 2 / 1e6:,.0f} MB, "
                     f"more than the {available / 1e6:,.0f} MB available: use --length={most} or less")


def write_pictures(figure: AttentionFigure, heads: list[int], gif: str, duration: int, png: Optional[str],
                   png_head: int) -> None:
    """The GIF of every head's frame at gif, and head png_head's frame at png if given; each said on stdout.
    UsageError for a path that cannot be written."""
    outputs = [(Path(gif), None)] + ([(Path(png), png_head)] if png else [])
    try:
        for path, head in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            if head is None:
                save_gif([figure.render(h) for h in heads], path, duration)
            else:
                save_whole(path, lambda f: figure.render(head).save(f, format="PNG"))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e}") from None
    T = figure.probs.shape[-1]
    print(f"wrote {gif}: heads {','.join(map(str, heads))} of layers {','.join(map(str, figure.layers))} "
          f"over {T} tokens, one frame per head")
    if png:
        print(f"wrote {png}: head {png_head}")


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    run_main(main)
