#!/usr/bin/env python3
"""brittle from Python on an nn.Module, against the CLI on its TorchScript trace and against
adv-lib's FMN-1000 + FAB-100 pair run in the same process (issue 14's benchmark; not a test).

The model is a shared CIFAR-10 TorchScript model behind a plain nn.Module, so that
`brittle.margins` calls it back from Rust for every forward pass: the difference with the CLI
on the trace is the cost of the Python callback (the CLI runs the same graph without Python).
Reports the time per sample of each, and the share of samples within 1% of the best margin
any of them found. All on the CPU with the same thread count.

Needs the Python package's venv (scripts/python-env.sh, with the wheel installed as
scripts/test does), adv-lib there (`pip install --no-deps adv-lib "torchvision==0.28.*" tqdm
visdom`: plain `pip install adv-lib` downgrades torch; skipped with a note when absent),
and a brittle binary (default target/release/brittle, else target/debug/brittle):
    python bench/python_margins.py --n 100 --threads 2
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

import brittle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def load_pool(path, n):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)[:n]
    x = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()).to(torch.float32) / 255.0
    return x, torch.from_numpy(raw[:, 0].astype(np.int64))


class AsModule(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def lp(adv, x, p):
    return (adv - x).flatten(1).norm(p=p, dim=1).double()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "resnet_2b.pt"))
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "cifar10", "real-pool.bin"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--brittle", default=None, help="the CLI binary")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    exe = args.brittle or next(
        (p for p in (os.path.join(ROOT, "target", b, "brittle") for b in ("release", "debug")) if os.path.exists(p)), None)
    torch.set_num_threads(args.threads)
    module = AsModule(torch.jit.load(args.model)).eval().to(args.device)
    x, _ = load_pool(args.data, args.n)
    x = x.to(args.device)
    with torch.no_grad():
        pred = module(x).argmax(1)
    res, secs = {}, {}

    t0 = time.perf_counter()
    df = brittle.margins(module, x, pred, norm="linf", attack="best", progress=False)
    secs["brittle.margins(nn.Module)"] = time.perf_counter() - t0
    res["brittle.margins(nn.Module)"] = df.sort_values("index")["input_margin"].to_numpy()

    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.pt")
        torch.jit.trace(module, x[:2]).save(trace)
        out = os.path.join(tmp, "m.csv")
        t0 = time.perf_counter()
        subprocess.run([exe, "margins", "--model", trace, "--data", args.data, "--limit", str(args.n),
                        "--norm", "linf", "--attack", "best", "--threads", str(args.threads),
                        "--device", "cpu" if args.device == "cpu" else "cuda", "--out", out],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, BRITTLE_NO_PROGRESS="1"))
        secs["CLI on the trace"] = time.perf_counter() - t0
        res["CLI on the trace"] = pd.read_csv(out).sort_values("index")["input_margin"].to_numpy()

    try:
        from adv_lib.attacks import fab, fmn

        for name, attack in (("adv-lib FMN-1000", lambda: fmn(module, x, pred, norm=float("inf"), steps=1000)),
                             ("adv-lib FAB-100", lambda: fab(module, x, pred, norm=float("inf"), n_iter=100))):
            t0 = time.perf_counter()
            adv = attack().detach().clamp(0, 1)
            secs[name] = time.perf_counter() - t0
            with torch.no_grad():
                wrong = module(adv).argmax(1) != pred
            d = lp(adv, x, float("inf"))
            res[name] = torch.where(wrong, d, torch.full_like(d, float("inf"))).cpu().numpy()
        res["adv-lib FMN+FAB pair"] = np.minimum(res["adv-lib FMN-1000"], res["adv-lib FAB-100"])
        secs["adv-lib FMN+FAB pair"] = secs["adv-lib FMN-1000"] + secs["adv-lib FAB-100"]
    except ImportError as e:
        print(f"adv-lib not installed ({e}): pip install adv-lib", file=sys.stderr)

    best = np.min(np.stack(list(res.values())), axis=0)
    print(f"{args.n} pool images of {os.path.basename(args.model)}, L∞, {args.threads} threads, {args.device}")
    print(f"{'':30s} {'ms/sample':>10s} {'within 1% of best':>18s} {'time vs pair':>13s}")
    pair = secs.get("adv-lib FMN+FAB pair")
    for k in res:
        ratio = f"{secs[k] / pair:13.3f}" if pair else f"{'n/a':>13s}"
        print(f"{k:30s} {1e3 * secs[k] / args.n:10.1f} {np.mean(res[k] <= best * 1.01):18.2%} {ratio}")
    same = np.array_equal(res["brittle.margins(nn.Module)"], res["CLI on the trace"])
    over = secs["brittle.margins(nn.Module)"] / secs["CLI on the trace"] - 1
    print(f"nn.Module and CLI margins identical: {same}; Python callback overhead: {over:+.1%} of the CLI's time")


if __name__ == "__main__":
    main()
