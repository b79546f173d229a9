"""`brittle score` throughput against PyTorch eager on the same TorchScript model, same batch
size and thread count, measured in the same run (best of --repeat runs each).

Usage (from the repo root, after `cargo build --release`):
    BRITTLE_DEV=1 source scripts/env.sh
    python bench/score.py [--model ../shared/models/sri_resnet_a.pt] [--threads 2] [--batch-size 256] [--tile 20]

The PyTorch peer does what `brittle score` does per batch: a forward pass without autograd,
then softmax, the top-2 logit margin, max probability and entropy. The 705 pool images are
repeated --tile times (a data set of 14100 by default), so that one-time costs (libtorch and
oneDNN set-up, TorchScript's profiling runs) weigh little against steady-state throughput.
Prints samples/s of both and the ratios brittle / PyTorch, against PyTorch warm (best pass in a
process that already ran the data set) and cold (first pass of a fresh process, as every
`brittle score` run is). Target: ratio >= 1.0.
"""

import argparse
import os
import re
import subprocess
import tempfile
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def read_cifar(path):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    return torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def torch_rate(model_path, x, batch_size, repeat):
    model = torch.jit.load(model_path, map_location="cpu").eval()
    best = 0.0
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            for s in range(0, len(x), batch_size):
                logits = model(x[s:s + batch_size])
                p = logits.softmax(1)
                top = logits.topk(2, 1).values
                _ = (top[:, 0] - top[:, 1], p.max(1).values, -(p * p.clamp_min(1e-30).log()).sum(1))
            best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def torch_cold_rate(model_path, data, batch_size, threads, repeat):
    """First pass of a fresh Python process, as `brittle score` is timed: one-time libtorch set-up
    (oneDNN primitives per conv shape, allocator growth) is paid by both sides."""
    best = 0.0
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--torch-once", "--model", model_path, "--data", data,
             "--batch-size", str(batch_size), "--threads", str(threads)],
            check=True, capture_output=True, text=True,
        ).stdout
        best = max(best, float(out.strip().splitlines()[-1]))
    return best


def brittle_rate(exe, model_path, data, batch_size, threads, repeat):
    best = 0.0
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeat):
            out = subprocess.run(
                [exe, "score", "--model", model_path, "--data", data, "--out", os.path.join(d, "s.csv"),
                 "--batch-size", str(batch_size), "--threads", str(threads), "--device", "cpu"],
                check=True, capture_output=True, text=True,
                env={**os.environ, "BRITTLE_NO_PROGRESS": "1"},
            ).stdout
            rate = float(re.search(r"([0-9.]+) samples/s", out).group(1))
            best = max(best, rate)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "../shared/models/sri_resnet_a.pt"))
    ap.add_argument("--data", default=os.path.join(ROOT, "../shared/data/cifar10/real-pool.bin"))
    ap.add_argument("--exe", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                  "release", "brittle"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tile", type=int, default=20, help="repeat the pool this many times")
    ap.add_argument("--torch-once", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.torch_once:
        print(torch_rate(a.model, read_cifar(a.data), a.batch_size, 1))
        return
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "tiled.bin")
        with open(a.data, "rb") as f:
            raw = f.read()
        with open(data, "wb") as f:
            f.write(raw * a.tile)
        x = read_cifar(data)
        tc = torch_cold_rate(a.model, data, a.batch_size, a.threads, a.repeat)
        b = brittle_rate(a.exe, a.model, data, a.batch_size, a.threads, a.repeat)
        t = torch_rate(a.model, x, a.batch_size, a.repeat + 1)
    print(f"model {os.path.basename(a.model)}, {len(x)} samples, batch {a.batch_size}, "
          f"{a.threads} threads, torch {torch.__version__}")
    print(f"brittle score: {b:.1f} samples/s")
    print(f"pytorch eager, warm (best pass of {a.repeat + 1} in one process): {t:.1f} samples/s")
    print(f"pytorch eager, cold (first pass of a fresh process, as brittle is timed): {tc:.1f} samples/s")
    print(f"ratio brittle/pytorch warm: {b / t:.2f} (target >= 1.0)")
    print(f"ratio brittle/pytorch cold: {b / tc:.2f}")


if __name__ == "__main__":
    main()
