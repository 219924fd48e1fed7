"""
Attention pictures: every head of a few layers over one sequence, as an animated GIF (one frame per head).

Starting from <|endoftext|>, the model writes up to --length tokens (or reads --text), then a single forward pass
through the manual attention path collects the attention probabilities. Frame n shows head n of the chosen layers
side by side as heat maps of query position (rows) against key position (columns).

    python attention.py --init_from=gpt2                                   # assets/attention.gif
    python attention.py --init_from=path/to/model --png=frame.png --frame=2

Probabilities span orders of magnitude, so the colours follow a log scale over a fixed range, shared by every
panel and frame so that frames compare directly; the blank triangle above the diagonal is the causal mask.
Generation samples as nanoGPT's sample.py does (temperature 0.8, top_k 200, seed 1337), so one seed remakes one
picture on one machine. Greedy decoding (--temperature=0) is not the default: small models soon fall into a loop
of one token, and every head then looks alike over the looping part.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator
from PIL import Image

from model import GPT, LoadError, check_generation_args, resolve_checkpoint
from tokenizer import EOT, EOT_ID, TokenizerError, load_tokenizer

# The colour range. Below 1e-4 a key gets less than a fortieth of even a uniform share over 256 positions, which
# reads as "nothing" at a glance; 1 is the most a key can get.
VMIN, VMAX = 1e-4, 1.0
CMAP = colormaps["magma"].with_extremes(bad="white")  # bad = masked = the future, above the diagonal
PANEL_INCHES = 3.0  # each heat map about 256 px wide at DPI, so 256 positions are drawn about one pixel each
DPI = 100


class UsageError(Exception):
    """A bad option or input; the message says what is wrong and what to do instead."""


def parse_indices(spec: str) -> Optional[list[int]]:
    """'1,2,4' to [1, 2, 4] (1-based, as the titles show them); 'all' to None."""
    if spec.strip().lower() == "all":
        return None
    try:
        indices = [int(part) for part in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{spec}' is not a comma-separated list of numbers such as 1,2,3,4 "
                                         f"(or 'all')") from None
    if len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"'{spec}' names a number twice")
    return indices


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Draw the attention probabilities of a GPT-2 model as an animated GIF: frame n shows head n "
                    "of the chosen layers over a sequence generated from <|endoftext|> (or given by --text).")
    p.add_argument("--init_from", default="gpt2",
                   help="model: gpt2 (default), gpt2-medium, ..., a hub repo id, a local model folder or a nanoGPT "
                        "ckpt.pt")
    p.add_argument("--text", default=None,
                   help="draw attention over this text (after <|endoftext|>) instead of generated text")
    p.add_argument("--length", type=int, default=256,
                   help="tokens in the sequence, <|endoftext|> included, at most the model's context (default 256)")
    p.add_argument("--layers", type=parse_indices, default=[1, 2, 3, 4],
                   help="1-based layers drawn side by side in every frame, e.g. 1,2,3,4 or all (default 1,2,3,4)")
    p.add_argument("--heads", type=parse_indices, default=None,
                   help="1-based heads, one frame each, e.g. 1,5,9 (default: all)")
    p.add_argument("--duration", type=int, default=1000, help="milliseconds per frame (default 1000)")
    p.add_argument("--out", default="assets/attention.gif",
                   help="where to write the GIF (default assets/attention.gif)")
    p.add_argument("--png", default=None, help="also write one frame as a PNG here")
    p.add_argument("--frame", type=int, default=None,
                   help="the head (1-based) whose frame --png shows (default: the first of --heads)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 for greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens only (default 200)")
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling (default 1337)")
    p.add_argument("--tiktoken_file", default=None, help="GPT-2's gpt2.tiktoken rank file, for offline use")
    return p


def check_args(args: argparse.Namespace, block_size: int, n_layer: int, n_head: int) -> None:
    """Raise UsageError for options the model cannot honour; fill in --heads and --frame defaults."""
    if not 1 <= args.length <= block_size:
        raise UsageError(f"--length={args.length} is outside this model's context: use a length from 1 to "
                         f"{block_size} (its block_size)")
    args.layers = args.layers or list(range(1, n_layer + 1))
    args.heads = args.heads or list(range(1, n_head + 1))
    for option, values, count, what in [("--layers", args.layers, n_layer, "layers"),
                                        ("--heads", args.heads, n_head, "heads")]:
        bad = [v for v in values if not 1 <= v <= count]
        if bad:
            raise UsageError(f"{option} names {', '.join(map(str, bad))}, but the model has {count} {what}, "
                             f"numbered 1 to {count}")
    if args.frame is not None and not 1 <= args.frame <= n_head:
        raise UsageError(f"--frame={args.frame} is not a head of this model: it has {n_head} heads, numbered 1 "
                         f"to {n_head}")
    args.frame = args.frame if args.frame is not None else args.heads[0]


def sequence_ids(model: GPT, args: argparse.Namespace) -> torch.Tensor:
    """(1, T) token ids: <|endoftext|> then --text's tokens or generated ones, T <= --length."""
    if args.text is not None:
        path = resolve_checkpoint(args.init_from)
        enc = load_tokenizer(path if path.is_dir() else path.parent, args.tiktoken_file)
        ids = [EOT_ID] + enc.encode(args.text, allowed_special={EOT})
        if len(ids) == 1:
            raise UsageError("--text is empty: give some text, or leave --text out to generate")
        if len(ids) > args.length:
            print(f"attention.py: the text is {len(ids) - 1} tokens; drawing the first {args.length - 1} "
                  f"(--length={args.length} counts <|endoftext|>)", file=sys.stderr)
        return torch.tensor([ids[:args.length]])
    start = torch.tensor([[EOT_ID]])
    return model.generate(start, args.length - 1, temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def describe_source(args: argparse.Namespace) -> str:
    """Where the sequence came from, for the figure's title: enough to make the same picture again."""
    if args.text is not None:
        text = " ".join(args.text.split())  # one line, whatever the text's own line breaks
        return f"{EOT} + '{text[:40]}{'…' if len(text) > 40 else ''}'"
    if args.temperature == 0:
        return f"greedy from {EOT}"
    top_k = f", top_k {args.top_k}" if args.top_k is not None else ""
    return f"sampled from {EOT} (temperature {args.temperature:g}{top_k}, seed {args.seed})"


def attention_probs(model: GPT, ids: torch.Tensor) -> np.ndarray:
    """Attention probabilities of one sequence, (n_layer, n_head, T, T), through the manual attention path."""
    _, probs = model.forward_with_attention(ids)
    return probs[:, 0].float().numpy()


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
    indexed[0].save(path, save_all=True, append_images=indexed[1:], duration=duration, loop=0,
                    format="GIF")  # whatever the file's name ends with


def run(args: argparse.Namespace) -> None:
    if args.duration < 1:
        raise UsageError(f"--duration={args.duration}: give the milliseconds per frame, at least 1")
    if args.frame is not None and args.png is None:
        raise UsageError("--frame chooses the head that --png shows: give --png=path.png as well")
    try:  # generate's own checks of --temperature and --top_k, run now so that no model loads in vain
        check_generation_args(torch.tensor([[EOT_ID]]), 0, args.temperature, args.top_k, None, 1, EOT_ID + 1)
    except ValueError as e:
        raise UsageError(e) from None
    model = GPT.from_pretrained(args.init_from)
    config = model.config
    check_args(args, config.block_size, config.n_layer, config.n_head)
    ids = sequence_ids(model, args)
    probs = attention_probs(model, ids)
    T = ids.size(1)
    title = f"{Path(args.init_from).name}: attention over {T} tokens, {describe_source(args)}"
    figure = AttentionFigure(probs, args.layers, title)
    outputs = [(Path(args.out), None)] + ([(Path(args.png), args.frame)] if args.png else [])
    try:
        for path, head in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            if head is None:
                save_gif([figure.render(h) for h in args.heads], path, args.duration)
            else:
                figure.render(head).save(path, format="PNG")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e}") from None
    heads, layers = ",".join(map(str, args.heads)), ",".join(map(str, args.layers))
    print(f"wrote {args.out}: heads {heads} of layers {layers} over {T} tokens, one frame per head")
    if args.png:
        print(f"wrote {args.png}: head {args.frame}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, LoadError, TokenizerError) as e:
        print(f"attention.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
