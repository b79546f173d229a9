#!/usr/bin/env python3
"""brittle's input-margin attacks against the published implementations, same model, samples
and thread count.

References (all attacking the model's predicted label, like `brittle margins` by default):
adv-lib FMN, FAB, min-APGD (adv-lib's `apgd` inside a bisection on ε), DDN (L2); torchattacks
FAB; foolbox FMN; and long runs of brittle's own attacks (`--long`). "Best known" is, per sample,
the smallest margin any of them (or brittle's run under test) found. For each attack it prints the
share of samples within 1% of the best known margin, the median and worst ratio to it, its time
per sample and forwards + backwards per sample, and the time ratio against the adv-lib
FMN-1000 + FAB-100 pair.

The references' per-sample margins, times and costs are cached on disk (`--cache`, keyed by the
weights file, data file, norm, n, threads and the attack with its budget), so a rerun after a change
of brittle's defaults only runs brittle. The cache for `--all-models --n 100 --threads 1` is committed
(`bench/references/`): that table needs torch and a release build, not the reference libraries. The
pair's time is kept in the cache with the 1-minute load average when it was measured and a
calibration of the machine's speed; `--retime` measures the pair again.

Installs nothing. Needs the dev venv plus the three reference libraries (once; adv-lib imports
visdom, whose sdist needs an old setuptools; pin torchvision to the venv's torch, or torchattacks'
dependency on it upgrades torch):
    BRITTLE_DEV=1 source scripts/env.sh
    echo 'setuptools<70' > /tmp/c.txt && PIP_CONSTRAINT=/tmp/c.txt pip install visdom
    pip install --no-deps adv-lib && pip install torchattacks foolbox safetensors 'torchvision==0.28.*'
    cargo build --release
    python bench/attacks.py --norm linf --n 100                    # resnet_2b
    python bench/attacks.py --all-models --n 100                   # every model, both norms
"""
import argparse
import csv
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
POOL = os.path.join(SHARED, "data", "cifar10", "real-pool.bin")
MNIST = os.path.join(ROOT, "assets", "mnist-test-1000-images-idx3-ubyte.gz")
SHARED_MODELS = ["resnet_2b", "cifar_cnn_a_adv", "cifar_deep_kw", "sri_resnet_a"]
PAIR = ("adv-lib FMN-1000", "adv-lib FAB-100")


# ---------------------------------------------------------------- data and models

def load_pool(path, n):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)[:n]
    return torch.tensor(raw[:, 1:].reshape(-1, 3, 32, 32) / 255.0, dtype=torch.float32)


def load_idx(path, n):
    with gzip.open(path) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    return torch.tensor(raw / 255.0, dtype=torch.float32)


def load_data(path, n):
    return load_idx(path, n) if "idx3" in os.path.basename(path) else load_pool(path, n)


class SmallCnn(torch.nn.Module):
    """brittle's native `small-cnn` (src/model/native/small_cnn.rs), same state-dict names."""

    def __init__(self, w):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(w, 2 * w, 3, padding=1)
        self.fc1 = torch.nn.Linear(2 * w * 7 * 7, 4 * w)
        self.fc2 = torch.nn.Linear(4 * w, 10)

    def forward(self, x):
        f = torch.nn.functional
        x = f.max_pool2d(f.relu(self.conv1(x)), 2)
        x = f.max_pool2d(f.relu(self.conv2(x)), 2)
        return self.fc2(f.relu(self.fc1(x.flatten(1))))


# A traced model's file -> the file its weights come from: cache keys hash the latter, which
# stays the same when another torch traces it to other bytes.
WEIGHTS = {}


def mnist_torchscript():
    """The embedded PGD-trained small-cnn traced to TorchScript, so both sides run one file."""
    from safetensors.torch import load_file

    src = os.path.join(ROOT, "assets", "mnist-small-cnn.safetensors")
    cache = os.path.expanduser("~/.cache/brittle/bench-attacks")
    out = os.path.join(cache, f"mnist-small-cnn-{sha256(src)[:12]}.pt")
    WEIGHTS[out] = src
    if not os.path.exists(out):
        sd = {k.removeprefix("model."): v for k, v in load_file(src).items()}
        m = SmallCnn(sd["conv1.weight"].shape[0])
        m.load_state_dict(sd)
        os.makedirs(cache, exist_ok=True)
        torch.jit.trace(m.eval(), torch.zeros(1, 1, 28, 28)).save(out)
    return out


def model_set(names):
    """`[(name, model file, data file)]` for `--all-models` / `--models`."""
    out = []
    for name in names:
        if name == "mnist-small-cnn":
            out.append((name, mnist_torchscript(), MNIST))
        else:
            out.append((name, os.path.join(SHARED, "models", f"{name}.pt"), POOL))
    return out


class Counted(torch.nn.Module):
    """Counts the rows that go through forward and (each backward through an output) backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fwd = 0
        self.bwd = 0

    def forward(self, x):
        out = self.model(x)
        rows = x.shape[0]
        self.fwd += rows
        if out.requires_grad:
            def hook(g):
                self.bwd += rows
            out.register_hook(hook)
        return out


def calibrate(model, x, reps=10):
    """Seconds of `reps` forward + backward passes of the model on `x`: the machine's speed now.
    The pair's time is scaled by the ratio of this figure now to the one measured with it, so that
    a cached time compares with brittle's under another load (the machine is shared)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        xx = x.clone().requires_grad_(True)
        model(xx).sum().backward()
    return time.perf_counter() - t0


def margins(model, x, adv, labels, p):
    with torch.no_grad():
        wrong = model(adv).argmax(1) != labels
    d = (adv - x).flatten(1).norm(p=p, dim=1).double()
    return torch.where(wrong, d, torch.full_like(d, float("inf"))).numpy()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- the attacks

def pnorm(norm):
    return float("inf") if norm == "linf" else 2.0


def python_references(norm, a):
    """`{name: fn(model, x, labels, upper_bound) -> adversarial inputs}`, in run order."""
    p = pnorm(norm)
    refs = {}
    try:
        from adv_lib.attacks import apgd, ddn, fab, fmn

        refs[f"adv-lib FMN-{a.fmn_steps}"] = lambda m, x, y, ub: fmn(m, x, y, norm=p, steps=a.fmn_steps)
        refs[f"adv-lib FAB-{a.fab_steps}"] = lambda m, x, y, ub: fab(m, x, y, norm=p, n_iter=a.fab_steps)
        if norm == "l2":
            refs[f"adv-lib DDN-{a.ddn_steps}"] = lambda m, x, y, ub: ddn(m, x, y, steps=a.ddn_steps)

        def min_apgd(m, x, y, ub):
            """APGD (DLR loss) at ε halfway between a bracket, `apgd_bisect` times; the bracket
            starts at [0.8, 1] × the pair's margin (the smallest margin found so far)."""
            ub = torch.tensor(ub, dtype=torch.float64)
            worst = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
            hi = torch.where(torch.isfinite(ub), ub, torch.full_like(ub, worst))
            lo = torch.where(torch.isfinite(ub), 0.8 * hi, torch.zeros_like(hi))
            best = x.clone()
            best_d = torch.full_like(hi, float("inf"))
            for _ in range(a.apgd_bisect):
                eps = (lo + hi) / 2
                adv = apgd(m, x, y, eps=eps.float(), norm=p, n_iter=a.apgd_steps).detach()
                d = torch.tensor(margins(m, x, adv, y, p))
                ok = torch.isfinite(d)
                better = d < best_d
                best = torch.where(better.view(-1, 1, 1, 1), adv, best)
                best_d = torch.minimum(best_d, d)
                hi = torch.where(ok, torch.minimum(d, eps), hi)
                lo = torch.where(ok, lo, eps)
            return best

        refs[f"adv-lib min-APGD-{a.apgd_steps}x{a.apgd_bisect}"] = min_apgd
    except ImportError as e:
        print(f"skipping adv-lib: {e}", file=sys.stderr)
    try:
        import torchattacks

        def ta_fab(m, x, y, ub):
            eps = 1.0 if norm == "linf" else 100.0  # large: we want the minimal point, not eps-bounded
            atk = torchattacks.FAB(m, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=a.fab_steps,
                                   n_restarts=1, n_classes=10)
            return atk(x, y)

        refs[f"torchattacks FAB-{a.fab_steps}"] = ta_fab
    except ImportError as e:
        print(f"skipping torchattacks: {e}", file=sys.stderr)
    try:
        import foolbox as fb

        def fb_fmn(m, x, y, ub):
            fm = fb.PyTorchModel(m, bounds=(0, 1))
            atk = (fb.attacks.LInfFMNAttack if norm == "linf" else fb.attacks.L2FMNAttack)(steps=a.fmn_steps)
            _, clipped, _ = atk(fm, x, y, epsilons=None)
            return clipped

        refs[f"foolbox FMN-{a.fmn_steps}"] = fb_fmn
    except ImportError as e:
        print(f"skipping foolbox: {e}", file=sys.stderr)
    return refs


def run_brittle(a, model, data, norm, extra):
    """brittle margins as a fresh process: margins, wall seconds, seconds in the attack (the CSV's
    per-sample `seconds`, summed) and forwards + backwards per sample."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.csv")
        cmd = [a.brittle, "margins", "--model", model, "--data", data, "--limit", str(a.n),
               "--norm", norm, "--threads", str(a.threads), "--device", "cpu", "--out", out] + extra
        env = dict(os.environ, BRITTLE_NO_PROGRESS="1")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        secs = time.perf_counter() - t0
        with open(out) as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
    return {
        "margins": [float(r["input_margin"]) for r in rows],
        "seconds": secs,
        "attack_seconds": sum(float(r["seconds"]) for r in rows),
        "fwd": float(np.mean([int(r["forwards"]) for r in rows])),
        "bwd": float(np.mean([int(r["backwards"]) for r in rows])),
    }


# ---------------------------------------------------------------- the cache

def cache_path(a, model, data, norm, attack):
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in attack)
    key = f"{os.path.basename(model)}-{sha256(WEIGHTS.get(model, model))[:12]}_{sha256(data)[:12]}"
    return os.path.join(a.cache, key, f"{norm}-n{a.n}-t{a.threads}", f"{slug}.json")


def cached(a, model, data, norm, attack, compute, refresh=False):
    """The record of `attack` from the cache, or `compute()`'s, stored with the date and load."""
    path = cache_path(a, model, data, norm, attack)
    if os.path.exists(path) and not refresh:
        with open(path) as f:
            return json.load(f)
    load_before = os.getloadavg()[0]
    rec = compute()
    rec.update(attack=attack, model=os.path.basename(model), model_sha256=sha256(model), data=data,
               data_sha256=sha256(data), norm=norm, n=a.n, threads=a.threads,
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               load1_before=load_before, load1_after=os.getloadavg()[0], torch=torch.__version__)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)
    return rec


# ---------------------------------------------------------------- one model, one norm

def evaluate(a, name, model_path, data, norm):
    p = pnorm(norm)
    model = torch.jit.load(model_path).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    x = load_data(data, a.n)
    with torch.no_grad():
        pred = model(x).argmax(1)
    recs = {}

    def python_attack(fn, ub):
        def compute():
            counted = Counted(model).eval()
            torch.manual_seed(0)
            calib = calibrate(model, x)
            t0 = time.perf_counter()
            adv = fn(counted, x.clone(), pred.clone(), ub).detach()
            secs = time.perf_counter() - t0
            calib = (calib + calibrate(model, x)) / 2
            return {"margins": margins(model, x, adv.clamp(0, 1), pred, p).tolist(), "seconds": secs,
                    "calib_seconds": calib, "fwd": counted.fwd / a.n, "bwd": counted.bwd / a.n}
        return compute

    skip = [s for s in a.skip.split(",") if s]
    for ref, fn in python_references(norm, a).items():
        if any(s in ref for s in skip):
            continue
        found = [np.array(r["margins"]) for r in recs.values()]
        ub = np.min(np.stack(found), axis=0) if found else np.full(a.n, np.inf)
        recs[ref] = cached(a, model_path, data, norm, ref, python_attack(fn, ub),
                           refresh=a.retime and ref in PAIR)
        print(f"  {ref}: {recs[ref]['seconds']:.1f} s ({recs[ref]['date']})", flush=True)
    for extra in a.long:
        ref = f"brittle {extra} (long)"
        if any(s in ref for s in skip):
            continue
        recs[ref] = cached(a, model_path, data, norm, ref, lambda: run_brittle(a, model_path, data, norm, extra.split()))
        print(f"  {ref}: {recs[ref]['seconds']:.1f} s ({recs[ref]['date']})", flush=True)
    if a.references_only:
        return None
    name_b = f"brittle {a.brittle_args}"
    load_before = os.getloadavg()[0]
    calib = calibrate(model, x)
    recs[name_b] = run_brittle(a, model_path, data, norm, a.brittle_args.split())
    calib = (calib + calibrate(model, x)) / 2
    recs[name_b].update(load1_before=load_before, load1_after=os.getloadavg()[0], calib_seconds=calib)
    print(f"  {name_b}: {recs[name_b]['seconds']:.1f} s (attack {recs[name_b]['attack_seconds']:.1f} s)", flush=True)
    return report(a, name, norm, name_b, recs)


def report(a, name, norm, name_b, recs):
    """Prints the per-attack table; returns brittle's summary row."""
    m = {k: np.array(r["margins"], dtype=np.float64) for k, r in recs.items()}
    best = np.min(np.stack(list(m.values())), axis=0)
    rows = dict(recs)
    if all(k in m for k in PAIR):
        m["adv-lib FMN+FAB pair"] = np.minimum(m[PAIR[0]], m[PAIR[1]])
        rows["adv-lib FMN+FAB pair"] = {
            "seconds": sum(recs[k]["seconds"] for k in PAIR),
            "fwd": sum(recs[k]["fwd"] for k in PAIR), "bwd": sum(recs[k]["bwd"] for k in PAIR),
            "load1_before": recs[PAIR[0]]["load1_before"], "load1_after": recs[PAIR[1]]["load1_after"]}
    pair_s = rows.get("adv-lib FMN+FAB pair", {}).get("seconds", float("nan"))
    # The pair's time as it would be at the machine's speed during brittle's run.
    if all("calib_seconds" in recs[k] for k in PAIR):
        pair_now = sum(recs[k]["seconds"] * recs[name_b]["calib_seconds"] / recs[k]["calib_seconds"] for k in PAIR)
    else:
        pair_now = float("nan")
    ok = np.isfinite(best) & (best > 0)
    print(f"\n{a.n} samples of {name}, {norm}, {a.threads} threads; best known: min over all rows "
          f"({int(np.sum(~np.isfinite(best)))} samples with none, {int(np.sum(best == 0))} misclassified)")
    print(f"{'attack':40s} {'within 1%':>9s} {'median':>8s} {'worst':>8s} {'fails':>5s} {'ms/sample':>9s} "
          f"{'vs pair':>7s} {'fwd+bwd/sample':>15s}")
    summary, withins = None, {}
    for k, r in rows.items():
        ratio = np.where(ok, m[k] / np.where(ok, best, 1.0), 1.0)
        within = withins[k] = float(np.mean(ratio <= 1.01))
        fails = int(np.sum(ok & ~np.isfinite(m[k])))
        med, worst = float(np.median(ratio[ok])), float(np.max(ratio[np.isfinite(ratio)]))
        t = r["seconds"] / pair_s
        cost = f"{r['fwd']:.0f}+{r['bwd']:.0f}"
        print(f"{k:40s} {within:9.1%} {med:8.4f} {worst:8.3f} {fails:5d} {1e3 * r['seconds'] / a.n:9.1f} {t:7.3f} {cost:>15s}")
        if k == name_b:
            summary = dict(model=name, norm=norm, within=within, median=med, worst=worst, fails=fails, time_ratio=t,
                           attack_ratio=r["attack_seconds"] / pair_s, ms=1e3 * r["seconds"] / a.n,
                           scaled_ratio=r["seconds"] / pair_now, scaled_attack_ratio=r["attack_seconds"] / pair_now,
                           speed=recs[PAIR[0]].get("calib_seconds", float("nan")) / r["calib_seconds"],
                           fwd=r["fwd"], bwd=r["bwd"], pair_ms=1e3 * pair_s / a.n,
                           pair_cost=f"{rows['adv-lib FMN+FAB pair']['fwd']:.0f}+{rows['adv-lib FMN+FAB pair']['bwd']:.0f}"
                           if "adv-lib FMN+FAB pair" in rows else "",
                           pair_load=rows.get("adv-lib FMN+FAB pair", {}).get("load1_before", float("nan")))
    if summary:
        # The pair's row comes after brittle's: its share is known only once the loop is done.
        summary["pair_within"] = withins.get("adv-lib FMN+FAB pair", float("nan"))
    if a.save:
        path = a.save.format(model=name, norm=norm)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index"] + list(m))
            for i in range(a.n):
                w.writerow([i] + [repr(float(m[k][i])) for k in m])
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "resnet_2b.pt"))
    ap.add_argument("--data", default=POOL)
    ap.add_argument("--all-models", action="store_true",
                    help="the four shared CIFAR-10 models and the embedded MNIST small-cnn, both norms")
    ap.add_argument("--models", default="", help="comma-separated subset of the --all-models names")
    ap.add_argument("--brittle", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                      "release", "brittle"))
    ap.add_argument("--norm", choices=["linf", "l2", "both"], default="linf")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fmn-steps", type=int, default=1000)
    ap.add_argument("--fab-steps", type=int, default=100)
    ap.add_argument("--ddn-steps", type=int, default=1000)
    ap.add_argument("--apgd-steps", type=int, default=100, help="APGD iterations per bisection step")
    ap.add_argument("--apgd-bisect", type=int, default=7, help="bisection steps of min-APGD")
    ap.add_argument("--long", action="append", default=None,
                    help="arguments of a long brittle reference run (repeatable; default: --attack fmn --steps 2000)")
    ap.add_argument("--brittle-args", default="--attack best", help="extra arguments of brittle margins")
    ap.add_argument("--skip", default="", help="comma-separated substrings of references to skip")
    ap.add_argument("--references-only", action="store_true", help="fill the cache; run no brittle --attack best")
    ap.add_argument("--retime", action="store_true", help="measure the adv-lib pair again instead of its cached time")
    ap.add_argument("--cache", default=os.path.join(ROOT, "bench", "references"),
                    help="the references' cache (default: the committed one)")
    ap.add_argument("--save", help="write every attack's per-sample margins to this CSV ({model} and {norm} filled in)")
    a = ap.parse_args()
    if a.long is None:
        a.long = ["--attack fmn --steps 2000"]
    torch.set_num_threads(a.threads)
    if a.all_models or a.models:
        names = a.models.split(",") if a.models else SHARED_MODELS + ["mnist-small-cnn"]
        models = model_set(names)
        norms = ["linf", "l2"] if a.all_models or a.norm == "both" else [a.norm]
    else:
        models = [(os.path.basename(a.model).removesuffix(".pt"), a.model, a.data)]
        norms = ["linf", "l2"] if a.norm == "both" else [a.norm]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1-minute load {os.getloadavg()[0]:.2f}", flush=True)
    summary = []
    for name, model, data in models:
        for norm in norms:
            print(f"== {name} {norm}", flush=True)
            summary.append(evaluate(a, name, model, data, norm))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1-minute load {os.getloadavg()[0]:.2f}")
    print(f"\nbrittle {a.brittle_args} against the best known margin, {a.n} samples per model and norm, "
          f"{a.threads} threads:\n")
    print("time vs pair: brittle's wall time (process start included; in brackets, the attack's own time)\n"
          "over the pair's, the pair's cached time scaled to the machine's speed during brittle's run\n"
          "(`calibrate`); raw: unscaled. speed: machine speed during brittle's run / during the pair's.\n")
    print("| model | norm | within 1% | median ratio | worst ratio (failures) | time vs pair (attack only) | raw "
          "| speed | brittle ms/sample | pair ms/sample (load) | fwd+bwd/sample brittle | pair | pair within 1% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in filter(None, summary):
        print(f"| {s['model']} | {s['norm']} | {s['within']:.0%} | {s['median']:.4f} | {s['worst']:.3f} ({s['fails']}) "
              f"| {s['scaled_ratio']:.3f} ({s['scaled_attack_ratio']:.3f}) | {s['time_ratio']:.3f} | {s['speed']:.2f} "
              f"| {s['ms']:.1f} | {s['pair_ms']:.1f} ({s['pair_load']:.1f}) | {s['fwd']:.0f}+{s['bwd']:.0f} "
              f"| {s['pair_cost']} | {s['pair_within']:.0%} |")


if __name__ == "__main__":
    main()
