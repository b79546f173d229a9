"""Shared fixtures: the repository's data readers (the CLI's decoding: bytes / 255 in float32),
the embedded MNIST model as an nn.Module, the CLI binary, and the `shared` marker.

Tests marked `shared` need ../shared (the real CIFAR-10 models and pool). Like the Rust tests
`#[ignore]`d for the same reason, they run only when asked: `pytest --shared`, which
scripts/test passes whenever ../shared exists (and there a missing file fails the test)."""

import gzip
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
SHARED = Path(os.environ.get("BRITTLE_SHARED", REPO.parent / "shared"))


def pytest_addoption(parser):
    parser.addoption("--shared", action="store_true", help="run the tests that need ../shared")


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs ../shared (real CIFAR-10 models); run with --shared")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--shared"):
        return
    ignore = pytest.mark.skip(reason="needs ../shared (real CIFAR-10 models): run with --shared")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(ignore)


def read_idx_images(path, n):
    """The first n images of an MNIST IDX file as [n, 1, H, W] float32 in [0, 1]."""
    raw = gzip.open(path).read()
    magic, count, h, w = struct.unpack(">IIII", raw[:16])
    assert magic == 2051
    n = min(n, count)
    x = torch.frombuffer(bytearray(raw[16 : 16 + n * h * w]), dtype=torch.uint8)
    return x.reshape(n, 1, h, w).to(torch.float32) / 255.0


def read_idx_labels(path, n):
    raw = gzip.open(path).read()
    magic, count = struct.unpack(">II", raw[:8])
    assert magic == 2049
    return torch.tensor(list(raw[8 : 8 + min(n, count)]), dtype=torch.int64)


def read_cifar_bin(path, n):
    """The first n records of a CIFAR-10 binary file: [n, 3, 32, 32] float32 in [0, 1], labels."""
    raw = Path(path).read_bytes()
    rec = 1 + 3 * 32 * 32
    n = min(n, len(raw) // rec)
    buf = torch.frombuffer(bytearray(raw[: n * rec]), dtype=torch.uint8).reshape(n, rec)
    return buf[:, 1:].reshape(n, 3, 32, 32).to(torch.float32) / 255.0, buf[:, 0].to(torch.int64)


def read_safetensors(path):
    """A safetensors file's float32 tensors (the format is a JSON header and raw bytes)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", (name, meta["dtype"])
        a, b = meta["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(meta["shape"])
    return out


class SmallCnn(nn.Module):
    """brittle's `small-cnn` (src/model/native/small_cnn.rs) in torch.nn, same state-dict names."""

    def __init__(self, width=16, classes=10, side=28):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (side // 4) ** 2, 4 * width)
        self.fc2 = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="session")
def mnist():
    x = read_idx_images(ASSETS / "mnist-test-1000-images-idx3-ubyte.gz", 1000)
    y = read_idx_labels(ASSETS / "mnist-test-1000-labels-idx1-ubyte.gz", 1000)
    return x, y


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded MNIST model (assets/mnist-small-cnn.safetensors) as an nn.Module."""
    weights = read_safetensors(ASSETS / "mnist-small-cnn.safetensors")
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    m = SmallCnn(width=weights["conv1.weight"].shape[0])
    m.load_state_dict(weights)
    return m.eval()


@pytest.fixture(scope="session")
def cli():
    """Runs the brittle binary of this checkout (scripts/test builds it before pytest)."""
    exe = Path(os.environ.get("BRITTLE_BIN", REPO / "target" / "debug" / "brittle"))
    assert exe.exists(), f"{exe} is missing: build it first (cargo build --bin brittle)"

    def run(*args):
        env = dict(os.environ, BRITTLE_NO_PROGRESS="1")
        p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)
        assert p.returncode == 0, f"brittle {' '.join(map(str, args))} failed:\n{p.stderr}"
        return p.stdout

    return run


def shared_path(*parts):
    """A file of ../shared; missing is a failure (these tests run only with --shared)."""
    p = SHARED.joinpath(*parts)
    assert p.exists(), f"{p} is missing: the tests marked `shared` need ../shared"
    return p
