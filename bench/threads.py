#!/usr/bin/env python3
"""Thread count and OpenMP wait policy under a competing CPU load: `brittle margins` on the
embedded MNIST small CNN against PyTorch doing the same forward+backward steps, both idle and
with one busy loop per available core, in one run.

Every configuration runs in its own process (OpenMP reads its environment once, at start-up) and
times only its attack loop: brittle's own `ms/sample` (after the model is loaded), the PyTorch
peer's loop after import. Each ratio is against the peer measured in the same condition of the
same run. `uptime` before each condition says how loaded the machine was.

    BRITTLE_DEV=1 source scripts/env.sh      # Python torch (once, several minutes)
    cargo build --release
    python bench/threads.py                  # N=32 STEPS=200 REPS=3 LOAD_SECONDS=120
    BRITTLE=target/debug/brittle python bench/threads.py --n 64

The configurations: brittle's defaults (the CPUs it may use, OpenMP threads that sleep while they
wait), `--threads 1`, and its default thread count with libgomp's own wait policy (GOMP_SPINCOUNT
=300000: spin, then sleep; what brittle ran with before); PyTorch with its default threads and
wait policy, with one thread, and with OMP_WAIT_POLICY=PASSIVE.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "assets/mnist-small-cnn.safetensors")
DATA = os.path.join(ROOT, "assets/mnist-test-1000-images-idx3-ubyte.gz")


def peer(n, steps, threads):
    """The PyTorch side (run in a child process): `steps` forward+backward passes of the small
    CNN on `n` MNIST images with a sign-gradient update, as FMN's steps do; prints seconds."""
    import gzip

    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from safetensors.torch import load_file

    if threads > 0:
        torch.set_num_threads(threads)

    class SmallCnn(nn.Module):
        def __init__(self, w=16):
            super().__init__()
            self.conv1 = nn.Conv2d(1, w, 3, padding=1)
            self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
            self.fc1 = nn.Linear(2 * w * 49, 4 * w)
            self.fc2 = nn.Linear(4 * w, 10)

        def forward(self, x):
            h = F.max_pool2d(F.relu(self.conv1(x)), 2)
            h = F.max_pool2d(F.relu(self.conv2(h)), 2)
            return self.fc2(F.relu(self.fc1(h.flatten(1))))

    model = SmallCnn()
    model.load_state_dict(load_file(MODEL))
    model.eval()
    raw = gzip.open(DATA).read()
    x = torch.tensor(np.frombuffer(raw, np.uint8, offset=16)[: n * 784].reshape(n, 1, 28, 28) / 255.0,
                     dtype=torch.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        label = model(x).argmax(1)
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = model(adv)
        true = logits.gather(1, label[:, None])[:, 0]
        other = logits.scatter(1, label[:, None], float("-inf")).max(1).values
        (grad,) = torch.autograd.grad((other - true).sum(), adv)
        adv = (adv.detach() + 0.01 * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        model(adv)
    print(time.perf_counter() - t0)


def run_brittle(binary, n, steps, threads, env):
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [binary, "margins", "--model", MODEL, "--arch", "small-cnn", "--data", DATA,
             "--limit", str(n), "--attack", "fmn", "--steps", str(steps), "--batch-size", str(n),
             "--device", "cpu", "--threads", str(threads), "--out", os.path.join(d, "m.csv")],
            env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"brittle failed:\n{out.stderr}")
    ms = float(re.search(r"([0-9.]+) ms/sample", out.stdout).group(1))
    return ms * n / 1e3


def run_peer(n, steps, threads, env):
    out = subprocess.run([sys.executable, __file__, "--peer", "--n", str(n), "--steps", str(steps),
                          "--threads", str(threads)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"PyTorch peer failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


def busy_loops(seconds):
    """One busy loop per CPU this process may use, each ending by itself after `seconds`."""
    code = f"import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in os.sched_getaffinity(0)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=int(os.environ.get("N", 32)))
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 200)))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 3)))
    ap.add_argument("--load-seconds", type=int, default=int(os.environ.get("LOAD_SECONDS", 120)))
    a = ap.parse_args()
    if a.peer:
        return peer(a.n, a.steps, a.threads)
    binary = os.environ.get("BRITTLE", os.path.join(ROOT, "target/release/brittle"))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base["BRITTLE_NO_PROGRESS"] = "1"
    configs = [
        ("brittle, default threads", "b", 0, {}),
        ("brittle, --threads 1", "b", 1, {}),
        # libgomp's own default (spin 300000 rounds, then sleep): brittle before it chose PASSIVE.
        ("brittle, default threads, GOMP_SPINCOUNT=300000", "b", 0, {"GOMP_SPINCOUNT": "300000"}),
        ("pytorch, default threads", "p", 0, {}),
        ("pytorch, 1 thread", "p", 1, {}),
        ("pytorch, default threads, OMP_WAIT_POLICY=PASSIVE", "p", 0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ]
    print(f"{binary}; N={a.n} images, FMN {a.steps} steps (batch {a.n}); "
          f"{len(os.sched_getaffinity(0))} CPUs in the affinity mask; median of {a.reps}")
    for condition in ("idle", "loaded"):
        loops = busy_loops(a.load_seconds) if condition == "loaded" else []
        try:
            time.sleep(1 if loops else 0)
            print(f"== {condition} ({len(loops)} busy loops); uptime: "
                  f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
            secs = {}
            for name, who, threads, extra in configs:
                env = dict(base, **extra)
                f = run_brittle if who == "b" else run_peer
                times = [f(binary, a.n, a.steps, threads, env) if who == "b"
                         else f(a.n, a.steps, threads, env) for _ in range(a.reps)]
                secs[name] = statistics.median(times)
            ref = secs["pytorch, default threads"]
            ref1 = secs["pytorch, 1 thread"]
            for name, _, _, _ in configs:
                print(f"{name:55s} {secs[name]:8.3f} s   x{secs[name] / ref:6.2f} of pytorch default,"
                      f" x{secs[name] / ref1:6.2f} of pytorch 1 thread")
            d, one = secs["brittle, default threads"], secs["brittle, --threads 1"]
            print(f"brittle default / --threads 1 = {d / one:.2f}")
        finally:
            for p in loops:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
