"""Shared fixtures: offline hub, the trained model in ../shared, and small random checkpoints written by transformers."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def trained_dir() -> Path:
    """The small GPT-2-architecture model trained on English prose (4 layers, 128 wide, 256 positions)."""
    return SHARED / "tiny-gpt2-en"


def write_random_checkpoint(folder: Path, safe_serialization: bool = True, seed: int = 0, **config) -> Path:
    """A GPT-2 checkpoint with random weights, saved by transformers' save_pretrained, with the trained model's
    tokenizer files beside it as a hub repository has them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((SHARED / "tiny-gpt2-en" / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 with a short context, for fast end-to-end runs."""
    return write_random_checkpoint(tmp_path_factory.mktemp("small"), n_layer=2, n_head=2, n_embd=64, n_positions=64)
