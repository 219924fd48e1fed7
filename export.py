"""
Export a GPT-2 model to the format another tool runs, from anything --init_from takes (a nanoGPT ckpt.pt, a Hugging
Face folder, a hub name):

    python export.py --init_from=out/ckpt.pt --to=hf --out=my-gpt2              (transformers' from_pretrained)
    python export.py --init_from=my-gpt2 --to=gguf --gguf_type=q8_0 --out=my-gpt2.gguf     (llama.cpp)
    python export.py --init_from=my-gpt2 --to=nanogpt --out=out-resume          (nanoGPT's train.py, resuming)

--to=hf writes a folder that transformers loads with GPT2LMHeadModel.from_pretrained and AutoTokenizer; --to=gguf a
GGUF file of llama.cpp's gpt2 architecture with GPT-2's vocabulary, which llama.cpp's tools run from text
(`llama-cli -m my-gpt2.gguf -p "..."`); --to=nanogpt a folder (nanoGPT's out_dir) holding ckpt.pt, which nanoGPT's
train.py resumes or fine-tunes from with init_from='resume'. A character-level nanoGPT model (its meta.pkl) is
exported without GPT-2's tokenizer, said on stderr; its meta.pkl goes along to a nanoGPT out_dir.

Nothing is written under --out until it is complete: a temporary name beside it is renamed at the end, so a
failed or stopped run leaves --out as it was. An existing --out is replaced only with --force.
Exit status: 0 written; 2 a mistake in a setting, a refused model, or a write that failed (a one-paragraph message).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below: Ctrl-C or SIGTERM while they load ends quietly
    from startup import quiet_startup

    quiet_startup()

import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from cli import run_main
from configurator import configure
from errors import UsageError

# -----------------------------------------------------------------------------
init_from: str = 'gpt2'  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub repo id, a model folder or a nanoGPT ckpt.pt
to: str | None = None  # hf (a transformers folder), gguf (a llama.cpp file) or nanogpt (an out_dir with ckpt.pt)
out: str | None = None  # the folder (hf, nanogpt) or file (gguf) to write
gguf_type: str = 'f16'  # with --to=gguf: f32, f16 or q8_0, the matrices' type (norms and biases stay float32)
force: bool = False  # replace an existing --out (a file, or a folder of model files only)
tiktoken_file: str | None = None  # GPT-2's gpt2.tiktoken rank file (else $GPT2_TIKTOKEN_FILE, the model's vocab.json)
# -----------------------------------------------------------------------------

FORMATS = {"hf": "a Hugging Face folder", "gguf": "a GGUF file for llama.cpp", "nanogpt": "a nanoGPT out_dir"}
# what a folder may hold for --force to replace it: a model's files, never anything else a user keeps there
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pkl", ".gguf")
MODEL_NAMES = ("merges.txt",)


def check_out(target: Path) -> None:
    """Refuse an --out that is there already, unless --force, and even then one that is not a model's: a folder
    holding other files (or a folder where a file goes, and the reverse)."""
    if not os.path.lexists(target):
        if to == "nanogpt" and target.suffix == ".pt":
            raise UsageError(f"--out={out}: --to=nanogpt writes a folder (nanoGPT's out_dir), which holds ckpt.pt; "
                             f"name the folder, e.g. --out={target.parent / 'out-resume'}")
        return
    if not force:
        raise UsageError(f"--out={out} already exists: pass --force to replace it, or choose another --out")
    folder = to != "gguf"
    if target.is_dir() != folder:
        have, want = ("a folder", "a file") if target.is_dir() else ("a file", "a folder")
        raise UsageError(f"--out={out} is {have}, and --to={to} writes {want}: choose another --out")
    others = sorted(p.name + "/" * p.is_dir() for p in target.iterdir() if p.is_dir() or not (
        p.suffix in MODEL_SUFFIXES or p.name in MODEL_NAMES)) if folder else []
    if others:
        raise UsageError(f"--out={out} holds more than a model's files ({', '.join(others[:5])}"
                         f"{' ...' if len(others) > 5 else ''}): --force replaces only a model folder, so nothing "
                         f"else is lost; choose another --out")


def model_vocabulary(source: Path, vocab_size: int) -> tuple[Optional[dict[bytes, int]], Optional[Path],
                                                              Optional[str]]:
    """GPT-2's ranks, where the model's vocabulary is GPT-2's; the meta.pkl of a character-level vocabulary; and
    a line for stderr where the vocabulary is not GPT-2's (the others then None)."""
    from save import ranks_of
    from tokenizer import EOT_ID, char_tokenizer, check_fits, find_meta, load_tokenizer

    meta = find_meta(source)
    if meta is not None:
        check_fits(char_tokenizer(meta), vocab_size)
        not_written = {"hf": "no tokenizer files are written (transformers' GPT-2 tokenizer cannot hold it)",
                       "gguf": "the file carries no vocabulary: llama.cpp runs it on token ids only",
                       "nanogpt": "its meta.pkl is copied beside ckpt.pt"}[to]
        return None, meta, (f"the model's vocabulary is the {vocab_size} characters of {meta}, not GPT-2's: "
                            f"{not_written}")
    folder = source if source.is_dir() else source.parent
    if vocab_size <= EOT_ID and not os.path.lexists(folder / "vocab.json"):
        return None, None, (f"the model's vocabulary has {vocab_size:,} tokens, fewer than GPT-2's {EOT_ID + 1:,}, "
                            f"and no meta.pkl or vocab.json describes it: its weights are exported without a "
                            f"tokenizer")
    enc = load_tokenizer(source, tiktoken_file)  # GPT-2's, or the byte-level BPE of the model's own vocab.json
    check_fits(enc, vocab_size)
    return ranks_of(enc), None, None


def main() -> int:
    if to not in FORMATS:
        raise UsageError(f"--to={to} is not a format this exports: --to=hf ({FORMATS['hf']}), --to=gguf "
                         f"({FORMATS['gguf']}) or --to=nanogpt ({FORMATS['nanogpt']})")
    import save

    if gguf_type not in save.GGUF_TYPES:
        raise UsageError(f"--gguf_type={gguf_type} is not one of {', '.join(save.GGUF_TYPES)} (float32, float16, "
                         f"or llama.cpp's 8-bit blocks)")
    if not out:
        raise UsageError(f"--out names what to write: a folder for --to=hf or nanogpt, a file for --to=gguf "
                         f"(e.g. --to={to} --out={'model.gguf' if to == 'gguf' else 'my-gpt2'})")
    if to == "gguf" and find_spec("gguf") is None:
        raise UsageError("--to=gguf needs the gguf package, llama.cpp's GGUF writer: pip install gguf")
    target = Path(out).expanduser()
    check_out(target)  # before the model loads: a refusal answers at once

    import load
    from tokenizer import nanogpt_dataset

    source = load.resolve_checkpoint(init_from)
    config_args, state_dict = load.read_checkpoint(source)
    ranks, meta, note = model_vocabulary(source, config_args["vocab_size"])
    if note:
        print(f"export.py: {note}", file=sys.stderr)
    with save.publishing(target, folder=to != "gguf") as temp:
        if to == "hf":
            save.write_hf(temp, config_args, state_dict, ranks)
        elif to == "gguf":
            vocabulary = save.gpt2_vocabulary(ranks) if ranks is not None else None
            save.write_gguf(temp, config_args, state_dict, gguf_type, vocabulary)
        else:
            config_file, weights = load.locate_checkpoint(source)
            dataset = nanogpt_dataset(load.load_pickle(weights[0])) if config_file is None else None
            save.write_nanogpt(temp, config_args, state_dict, meta, dataset)
    print(f"export.py: wrote {target} ({FORMATS[to]}{f', {gguf_type}' if to == 'gguf' else ''})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    run_main(main)
