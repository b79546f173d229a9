#!/usr/bin/env python3
"""Certified radii on the four shared CIFAR-10 models (issue 18's benchmark; not a test).

Per model, on the first N pool images (L∞):
* `brittle margins --certify crown`: the attack's margin and CROWN's certified radius of every
  sample, then `brittle analyze`: the bracket ratio (attack margin / certified radius) and the
  soundness count (certified radius > attack margin, must be 0);
* `brittle certify --method crown` and `--method alpha-crown`: time per certified radius
  (bisection over ε to 1% relative) and bound passes per sample;
* auto_LiRPA's CROWN and α-CROWN on the same model in the same run, where it imports. The one
  PyPI release (auto-lirpa 0.3, 2022) does not import with torch 2.x / numpy 2 (it reads
  `torch.onnx.symbolic_helper._set_opset_version`), which this script reports instead.

Needs a brittle binary (default target/release/brittle, else target/debug/brittle):
    python bench/certify.py --n 20 --threads 1
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def auto_lirpa_status():
    """None when auto_LiRPA imports, else why not."""
    try:
        import types

        shim = types.ModuleType("numpy.lib.arraysetops")  # removed in numpy 2, read by 0.3
        shim.isin = np.isin
        sys.modules.setdefault("numpy.lib.arraysetops", shim)
        import auto_LiRPA  # noqa: F401

        return None
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return f"{type(e).__name__}: {e}"


def run(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--brittle", default=None)
    ap.add_argument("--methods", default="crown,alpha-crown")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    exe = args.brittle or next(
        p for p in (os.path.join(ROOT, "target", b, "brittle") for b in ("release", "debug")) if os.path.exists(p)
    )
    manifest = json.load(open(os.path.join(SHARED, "models", "manifest.json")))
    data = os.path.join(SHARED, "data", "cifar10", "real-pool.bin")
    lirpa = auto_lirpa_status()
    print(f"auto_LiRPA: {'imports' if lirpa is None else 'unavailable (' + lirpa + ')'}")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in manifest["models"]:
            name = m["name"]
            norm = m["normalisation"]
            common = [
                "--model", os.path.join(SHARED, "models", m["onnx"]),
                "--mean", ",".join(map(str, norm["mean"])), "--std", ",".join(map(str, norm["std"])),
                "--data", data, "--limit", str(args.n), "--threads", str(args.threads), "--device", "cpu",
            ]
            row = {"model": name, "n": args.n}
            margins = os.path.join(tmp, f"{name}-margins.csv")
            row["margins_certify_s"] = run([exe, "margins", *common, "--certify", "crown", "--out", margins])
            report = os.path.join(tmp, f"{name}-report")
            run([exe, "analyze", margins, "--out", report, "--bootstrap", "0"])
            b = json.load(open(os.path.join(report, "metrics.json")))["brackets"]
            row.update(
                bracket_median=b["ratio"]["median"], bracket_q25=b["ratio"]["q25"], bracket_q75=b["ratio"]["q75"],
                uncertified=b["n_uncertified"], violations=b["violations"], with_both=b["n"],
            )
            for method in args.methods.split(","):
                out = os.path.join(tmp, f"{name}-{method}.csv")
                wall = run([exe, "certify", *common, "--method", method, "--out", out])
                df = pd.read_csv(out)
                row[f"{method}_s_per_radius"] = float(df["seconds"].mean())
                row[f"{method}_passes"] = float(df["passes"].mean())
                row[f"{method}_s_per_pass"] = float(df["seconds"].sum() / df["passes"].sum())
                row[f"{method}_median_radius_255"] = float(df["certified_radius"].median() * 255)
                row[f"{method}_wall_s"] = wall
            table.append(row)
            print(json.dumps(row))
    print(pd.DataFrame(table).to_string())
    if args.out:
        json.dump({"rows": table, "auto_lirpa": lirpa or "imports", "threads": args.threads}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
