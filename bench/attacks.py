#!/usr/bin/env python3
"""brittle's input-margin attacks against the published implementations, same model, samples
and thread count, in one run.

References (all attacking the model's predicted label, like `brittle margins` by default):
adv-lib FMN, FAB, DDN (L2); torchattacks FAB; foolbox FMN. For each reference it prints the
median of brittle margin / reference margin (samples where both succeed), the fraction where
brittle is at least as tight, and the wall-time ratio brittle / reference; then, per attack,
the fraction of samples within 1% of the best margin any attack found.

Installs nothing. Needs the dev venv plus the three reference libraries (once):
    BRITTLE_DEV=1 source scripts/env.sh
    echo 'setuptools<70' > /tmp/c.txt && PIP_CONSTRAINT=/tmp/c.txt pip install adv-lib
    pip install torchattacks foolbox
    cargo build --release
    python bench/attacks.py --norm linf --n 100 --threads 2
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pool(path, n):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)[:n]
    x = torch.tensor(raw[:, 1:].reshape(-1, 3, 32, 32) / 255.0, dtype=torch.float32)
    return x, torch.tensor(raw[:, 0].astype(np.int64))


def margins(model, x, adv, labels, p):
    with torch.no_grad():
        wrong = model(adv).argmax(1) != labels
    d = (adv - x).flatten(1).norm(p=p, dim=1).double()
    return torch.where(wrong, d, torch.full_like(d, float("inf"))).numpy()


def references(norm, fmn_steps, fab_steps, ddn_steps):
    p = float("inf") if norm == "linf" else 2.0
    refs = {}
    try:
        from adv_lib.attacks import ddn, fab, fmn

        refs[f"adv-lib FMN-{fmn_steps}"] = lambda m, x, y: fmn(m, x, y, norm=p, steps=fmn_steps)
        refs[f"adv-lib FAB-{fab_steps}"] = lambda m, x, y: fab(m, x, y, norm=p, n_iter=fab_steps)
        if norm == "l2":
            refs[f"adv-lib DDN-{ddn_steps}"] = lambda m, x, y: ddn(m, x, y, steps=ddn_steps)
    except ImportError as e:
        print(f"skipping adv-lib: {e}", file=sys.stderr)
    try:
        import torchattacks

        def ta_fab(m, x, y):
            eps = 1.0 if norm == "linf" else 100.0  # large: we want the minimal point, not eps-bounded
            a = torchattacks.FAB(m, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=fab_steps,
                                 n_restarts=1, n_classes=10)
            return a(x, y)

        refs[f"torchattacks FAB-{fab_steps}"] = ta_fab
    except ImportError as e:
        print(f"skipping torchattacks: {e}", file=sys.stderr)
    try:
        import foolbox as fb

        def fb_fmn(m, x, y):
            fm = fb.PyTorchModel(m, bounds=(0, 1))
            a = (fb.attacks.LInfFMNAttack if norm == "linf" else fb.attacks.L2FMNAttack)(steps=fmn_steps)
            _, clipped, _ = a(fm, x, y, epsilons=None)
            return clipped

        refs[f"foolbox FMN-{fmn_steps}"] = fb_fmn
    except ImportError as e:
        print(f"skipping foolbox: {e}", file=sys.stderr)
    return refs


def run_brittle(args, extra):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.csv")
        cmd = [args.brittle, "margins", "--model", args.model, "--data", args.data, "--limit", str(args.n),
               "--norm", args.norm, "--threads", str(args.threads), "--device", "cpu", "--out", out] + extra
        env = dict(os.environ, BRITTLE_NO_PROGRESS="1")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        secs = time.perf_counter() - t0
        with open(out) as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
        return np.array([float(r["input_margin"]) for r in rows]), secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "..", "shared", "models", "resnet_2b.pt"))
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "cifar10", "real-pool.bin"))
    ap.add_argument("--brittle", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                      "release", "brittle"))
    ap.add_argument("--norm", choices=["linf", "l2"], default="linf")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fmn-steps", type=int, default=1000)
    ap.add_argument("--fab-steps", type=int, default=100)
    ap.add_argument("--ddn-steps", type=int, default=1000)
    ap.add_argument("--brittle-args", default="--attack best", help="extra arguments of brittle margins")
    ap.add_argument("--skip", default="", help="comma-separated substrings of references to skip")
    ap.add_argument("--save", help="write every attack's per-sample margins to this CSV")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.jit.load(args.model).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    x, _ = load_pool(args.data, args.n)
    with torch.no_grad():
        pred = model(x).argmax(1)
    p = float("inf") if args.norm == "linf" else 2.0
    results, times = {}, {}
    name = "brittle " + args.brittle_args
    results[name], times[name] = run_brittle(args, args.brittle_args.split())
    print(f"{name}: {times[name]:.2f} s", flush=True)
    for ref, fn in references(args.norm, args.fmn_steps, args.fab_steps, args.ddn_steps).items():
        if any(s and s in ref for s in args.skip.split(",")):
            continue
        t0 = time.perf_counter()
        adv = fn(model, x.clone(), pred.clone()).detach()
        times[ref] = time.perf_counter() - t0
        results[ref] = margins(model, x, adv.clamp(0, 1), pred, p)
        r, b = results[ref], results[name]
        both = np.isfinite(b) & np.isfinite(r) & (r > 0)
        print(f"{ref}: {times[ref]:.2f} s; median brittle/ref {np.median(b[both] / r[both]):.4f}, "
              f"brittle tighter on {np.mean(b <= r):.0%}, time ratio {times[name] / times[ref]:.3f}", flush=True)
    b = results[name]
    print(f"\n{args.n} samples of {os.path.basename(args.model)}, {args.norm}, {args.threads} threads")
    print(f"{'reference':28s} {'median b/ref':>12s} {'b tighter':>10s} {'time b/ref':>10s} {'ms/sample ref':>13s}")
    for ref in results:
        if ref == name:
            continue
        r = results[ref]
        both = np.isfinite(b) & np.isfinite(r) & (r > 0)
        ratio = np.median(b[both] / r[both]) if both.any() else float("nan")
        tighter = np.mean(b <= r)
        print(f"{ref:28s} {ratio:12.4f} {tighter:10.2%} {times[name] / times[ref]:10.3f} {1e3 * times[ref] / args.n:13.1f}")
    best = np.min(np.stack(list(results.values())), axis=0)
    print(f"\nwithin 1% of the best known margin (min over all attacks above):")
    within = {k: np.mean(v <= best * 1.01) for k, v in results.items()}
    fmn_fab = [k for k in results if k.startswith("adv-lib F")]
    if len(fmn_fab) == 2:
        pair = np.minimum(results[fmn_fab[0]], results[fmn_fab[1]])
        within["adv-lib FMN+FAB pair"] = np.mean(pair <= best * 1.01)
        times["adv-lib FMN+FAB pair"] = times[fmn_fab[0]] + times[fmn_fab[1]]
    for k, v in within.items():
        print(f"  {k:34s} {v:7.2%}   {1e3 * times[k] / args.n:8.1f} ms/sample")
    print(f"  max brittle/best ratio: {np.max(b / best):.3f}; brittle failures: {int(np.sum(~np.isfinite(b)))}")
    if args.save:
        with open(args.save, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index"] + list(results))
            for i in range(args.n):
                w.writerow([i] + [repr(float(results[k][i])) for k in results])


if __name__ == "__main__":
    main()
