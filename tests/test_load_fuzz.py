"""Corruption fuzz of load.read_checkpoint: seeded random truncations and byte flips of a small real checkpoint's
files (written by transformers' save_pretrained). Each damaged checkpoint must either load exactly the original
(the same config and every tensor torch.equal) or be refused with a LoadError: any other exception, or a model
that differs from what its files say, fails.

Flips hit only the bytes that describe the weights: the safetensors header (its 8-byte length and its JSON),
config.json, and in pytorch_model.bin everything but the tensors' data (the zip's headers and directory, the
pickle, the small version records). A flip inside tensor data changes a weight, and nothing records what the
weight was (safetensors has no checksum; torch.load checks no CRC), so no loader can tell it from a real weight.
Truncations cut anywhere. One flip in config.json can turn n_head into another divisor of n_embd: no weight's
shape shows n_head, so there the check is that the model loaded is the one the damaged file describes.
"""

import json
import random
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from load import LoadError, read_checkpoint

CASES = {"safetensors_flip": 120, "safetensors_cut": 30, "config_flip": 80, "config_cut": 20, "bin_flip": 120,
         "bin_cut": 30}


@pytest.fixture(scope="module")
def originals(tmp_path_factory, random_checkpoint) -> dict:
    """For each weight format: the checkpoint folder, what it loads to, and the byte ranges a flip may hit."""
    config = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=512)
    found = {}
    for kind, safe in (("safetensors", True), ("bin", False)):
        folder = random_checkpoint(tmp_path_factory.mktemp(kind), safe_serialization=safe, **config)
        weights = folder / ("model.safetensors" if safe else "pytorch_model.bin")
        found[kind] = dict(folder=folder, file=weights, loaded=read_checkpoint(folder),
                           regions=safetensors_header(weights) if safe else outside_tensor_data(weights))
    found["config"] = dict(found["safetensors"], file=found["safetensors"]["folder"] / "config.json")
    found["config"]["regions"] = [(0, found["config"]["file"].stat().st_size)]
    return found


def safetensors_header(file: Path) -> list[tuple[int, int]]:
    header_length = struct.unpack("<Q", file.read_bytes()[:8])[0]
    return [(0, 8 + header_length)]


def outside_tensor_data(file: Path) -> list[tuple[int, int]]:
    """The byte ranges of a torch.save zip archive outside the tensors' data records."""
    data = file.read_bytes()
    inside = []
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename:
                name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
                start = info.header_offset + 30 + name_length + extra_length
                inside.append((start, start + info.compress_size))
    regions, at = [], 0
    for start, end in sorted(inside):
        regions.append((at, start))
        at = end
    return regions + [(at, len(data))]


def damaged(data: bytes, regions: list[tuple[int, int]], cut: bool, rng: random.Random) -> bytes:
    if cut:
        return data[:rng.randrange(len(data))]
    offsets = [i for start, end in regions for i in range(start, end)]
    flipped = bytearray(data)
    flipped[rng.choice(offsets)] ^= 1 << rng.randrange(8)
    return bytes(flipped)


@pytest.mark.parametrize("case", [f"{name}-{seed}" for name, count in CASES.items() for seed in range(count)])
def test_damaged_checkpoint_loads_the_same_or_is_refused(originals, tmp_path, case):
    name, seed = case.rsplit("-", 1)
    kind, how = name.rsplit("_", 1)
    original = originals[kind]
    folder = tmp_path / "checkpoint"
    shutil.copytree(original["folder"], folder)
    target = folder / original["file"].name
    target.write_bytes(damaged(original["file"].read_bytes(), original["regions"], how == "cut",
                               random.Random(f"{case}")))
    try:
        config_args, state_dict = read_checkpoint(folder)
    except LoadError:
        return
    expected_config, expected_state = original["loaded"]
    if kind == "config" and config_args["n_head"] != expected_config["n_head"]:
        assert config_args["n_head"] == json.loads(target.read_bytes())["n_head"]  # what the damaged file says
        config_args = dict(config_args, n_head=expected_config["n_head"])
    assert config_args == expected_config
    assert state_dict.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(state_dict[key], tensor), key
