#!/usr/bin/env python3
"""Certified radii on the four shared CIFAR-10 models (issue 18's benchmark; not a test).

Per model, on the first N pool images (L∞):
* `brittle margins --certify crown`: the attack's margin and CROWN's certified radius of every
  sample, then `brittle analyze`: the bracket ratio (attack margin / certified radius) and the
  soundness count (certified radius > attack margin, must be 0);
* `brittle certify --method crown` and `--method alpha-crown`: time per certified radius
  (bisection over ε to 1% relative) and bound passes per sample;
* `examples/bound_pass.rs`: brittle's time of one bound call on the N images at a fixed ε
  (`--eps`, default 1/255), timed as auto_LiRPA's below (a radius's passes run at the
  bisection's ε, whose first ones are wider and cost more);
* auto_LiRPA's CROWN and α-CROWN on the same model and images in the same run, where it imports:
  time of one bound call on the N images (α-CROWN with its default 20 iterations), and how many
  of brittle's radii auto_LiRPA certifies at 1× and at 1.02× (identical bounds give N and ~0).
  Before the models, auto_LiRPA's IBP, CROWN and α-CROWN margin bounds are compared with the
  float64 references of tests/fixtures/certify (scripts/fixtures/bounds.py, which brittle's
  tests match within 1e-5).

auto_LiRPA 0.3 (2022, the one PyPI release) runs under torch 2.13 / numpy 2 with the shims of
bench/lirpa_compat.py; it and what it and the ONNX loader need go in a side folder, never into
the brittle venv:
    pip download --no-deps auto-lirpa==0.3 appdirs tqdm onnx protobuf ml_dtypes
    pip install --no-deps --target /work/lirpa-pkgs *.whl
    PYTHONPATH=/work/lirpa-pkgs python bench/certify.py --n 16 --threads 1
Without it the script reports the import error and runs brittle alone.

Needs a brittle binary (default target/release/brittle, else target/debug/brittle) and, for the
fixed-ε timings, the example (`cargo build --release --example bound_pass`; `cargo test` builds
the debug one).
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
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "certify")
METHODS = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def load_auto_lirpa():
    """(auto_LiRPA, None) after the compatibility shims, or (None, why it does not import)."""
    try:
        import lirpa_compat  # noqa: F401
        import auto_LiRPA

        return auto_LiRPA, None
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return None, f"{type(e).__name__}: {e}"


class OnnxNet(torch.nn.Module):
    """The ONNX graphs of the shared models and the certify fixtures (Conv, Gemm, Relu, Add, Sub,
    Div, BatchNormalization, AveragePool, Flatten, Reshape) as torch functions auto_LiRPA can trace, the
    input normalisation (x - mean) / std first, inside the bounded model."""

    def __init__(self, path, mean=None, std=None):
        super().__init__()
        import onnx
        from onnx import helper, numpy_helper

        g = onnx.load(path).graph
        # auto_LiRPA wants the weights and biases of Conv, Gemm and BatchNormalization as
        # parameters, and the rest (Sub/Div operands, running statistics) as buffers: it bounds a
        # Div by a parameter as a product of two perturbed inputs, and sets requires_grad on them.
        weights = {i for n in g.node if n.op_type in ("Conv", "Gemm", "BatchNormalization") for i in n.input[1:3]}
        self.names = {}
        for i, init in enumerate(g.initializer):
            w = torch.from_numpy(numpy_helper.to_array(init).copy())
            if init.name in weights:
                self.register_parameter(f"c{i}", torch.nn.Parameter(w, requires_grad=False))
            else:
                self.register_buffer(f"c{i}", w)
            self.names[init.name] = f"c{i}"
        self.nodes = [
            (n.op_type, list(n.input), n.output[0], {a.name: helper.get_attribute_value(a) for a in n.attribute})
            for n in g.node
        ]
        self.input, self.output = g.input[0].name, g.output[0].name
        # The normalisation as a 1×1 convolution: auto_LiRPA's default (patches) mode cannot
        # divide a convolution's patches by a per-channel constant.
        self.norm = mean is not None
        if self.norm:
            inv = 1 / torch.tensor(std, dtype=torch.float32)
            w = torch.diag(inv).view(len(std), len(std), 1, 1)
            self.norm_w = torch.nn.Parameter(w, requires_grad=False)
            self.norm_b = torch.nn.Parameter(-torch.tensor(mean, dtype=torch.float32) * inv, requires_grad=False)

    def forward(self, x):
        env = {self.input: F.conv2d(x, self.norm_w, self.norm_b) if self.norm else x}
        for op, ins, out, at in self.nodes:
            a = [env[i] if i in env else getattr(self, self.names[i]) for i in ins]
            if op == "Conv":
                p = at.get("pads", [0, 0, 0, 0])
                assert p[:2] == p[2:] and at.get("group", 1) == 1, (op, at)
                y = F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None, at.get("strides", 1), p[:2])
            elif op == "Gemm":
                assert at.get("transB") == 1 and at.get("alpha", 1.0) == 1.0 and at.get("beta", 1.0) == 1.0, at
                y = F.linear(a[0], a[1], a[2])
            elif op == "BatchNormalization":
                y = F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, at.get("epsilon", 1e-5))
            elif op == "AveragePool":
                y = F.avg_pool2d(a[0], at["kernel_shape"], at["strides"])
            elif op == "Flatten":
                y = torch.flatten(a[0], at.get("axis", 1))
            elif op == "Reshape":
                # sri_resnet_a's flatten, [1, -1] for a batch of one: kept per sample.
                assert a[1].tolist()[1:] == [-1], a[1]
                y = torch.flatten(a[0], 1)
            else:
                y = {"Relu": lambda: F.relu(a[0]), "Add": lambda: a[0] + a[1],
                     "Sub": lambda: a[0] - a[1], "Div": lambda: a[0] / a[1]}[op]()
            env[out] = y
        return env[self.output]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def margin_spec(pred, k):
    """Rows e_pred - e_j (j != pred, class order) [N, K-1, K], brittle's margin matrix."""
    eye = torch.eye(k)
    return torch.stack([torch.stack([eye[p] - eye[j] for j in range(k) if j != p]) for p in pred])


class Lirpa:
    """auto_LiRPA margin lower bounds of one model over L∞ balls ∩ [0, 1]."""

    def __init__(self, lirpa, net, x, conv_mode="patches"):
        self.lirpa, self.net = lirpa, net.eval()
        # 0.3's sparse α over conv features fails to index (a shape mismatch in
        # reconstruct_full_alpha: cnn in matrix mode, resnet_2b in patches mode); dense α is the
        # same bound.
        opts = {"conv_mode": conv_mode, "sparse_features_alpha": False}
        self.bounded = lirpa.BoundedModule(self.net, torch.zeros_like(x[:1]), bound_opts=opts, device="cpu")

    def lower(self, x, pred, eps, method):
        e = torch.as_tensor(eps, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1)).expand(len(x), *[1] * (x.dim() - 1))
        ptb = self.lirpa.PerturbationLpNorm(norm=np.inf, eps=e, x_L=(x - e).clamp(0, 1), x_U=(x + e).clamp(0, 1))
        c = margin_spec(pred, self.net(x[:1]).shape[1])
        bx = self.lirpa.BoundedTensor(x, ptb)
        lb, _ = self.bounded.compute_bounds(x=(bx,), C=c, method=METHODS[method], bound_upper=False)
        return lb.detach().double().numpy()


def fixture_agreement(lirpa):
    """Max |auto_LiRPA - reference| of IBP and CROWN on the certify fixtures (L∞ cases), and the
    smallest gain of auto_LiRPA's α-CROWN over the reference CROWN (>= 0 when sound and tighter)."""
    out = {}
    for name in ("mlp", "cnn", "cnn_a"):
        spec = read_json(os.path.join(FIXTURES, name + ".json"))
        if name == "cnn_a":
            raw = np.fromfile(os.path.join(SHARED, "data", "cifar10", "real-pool.bin"), dtype=np.uint8)
            x = raw.reshape(-1, 3073)[spec["rows"], 1:].astype(np.float32) / 255.0
            x = torch.from_numpy(x).reshape(-1, 3, 32, 32)
            net = OnnxNet(os.path.join(SHARED, "models", "cifar_cnn_a_adv.onnx"), spec["mean"], spec["std"])
        else:
            x = torch.tensor(spec["x"], dtype=torch.float32).reshape(-1, *spec["input_shape"])
            net = OnnxNet(os.path.join(FIXTURES, name + ".onnx"))
        # cnn.onnx divides by std in the graph, which only the matrix mode bounds.
        bounded = Lirpa(lirpa, net, x, "matrix" if name == "cnn" else "patches")
        for case in spec["cases"]:
            if case["norm"] != "linf":
                continue
            ref = np.array(case["lower"])
            got = bounded.lower(x, spec["pred"], case["eps"], case["method"])
            out[f"{name} eps={case['eps']:.4g} {case['method']}"] = float(np.abs(got - ref).max())
            if case["method"] == "crown":
                alpha = bounded.lower(x, spec["pred"], case["eps"], "alpha-crown")
                out[f"{name} eps={case['eps']:.4g} alpha-crown gain min"] = float((alpha - ref).min())
                out[f"{name} eps={case['eps']:.4g} alpha-crown gain max"] = float((alpha - ref).max())
    return out


def lirpa_columns(lirpa, model_path, norm, data, n, radii, eps):
    """auto_LiRPA's s per bound call on the n images (best of 3 for CROWN, of 2 for α-CROWN,
    after one untimed call) and how many of brittle's radii [method -> per-sample array] it
    certifies at 1× and 1.02× (rows with radius 0 left out)."""
    raw = np.fromfile(data, dtype=np.uint8).reshape(-1, 3073)[:n]
    x = torch.from_numpy(raw[:, 1:].astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)
    bounded = Lirpa(lirpa, OnnxNet(model_path, norm["mean"], norm["std"]), x)
    with torch.no_grad():
        pred = bounded.net(x).argmax(1).tolist()
    row = {}
    for method, r in radii.items():
        bounded.lower(x, pred, eps, method)
        row[f"lirpa_{method}_fixed_eps_certified"] = f"{int((bounded.lower(x, pred, eps, method).min(1) > 0).sum())}/{n}"
        times = []
        for _ in range(3 if method == "crown" else 2):
            t0 = time.perf_counter()
            bounded.lower(x, pred, eps, method)
            times.append(time.perf_counter() - t0)
        row[f"lirpa_{method}_s_per_call"] = min(times)
        row[f"lirpa_{method}_s_per_sample_pass"] = min(times) / n
        keep = r > 0
        for scale in (1.0, 1.02):
            lb = bounded.lower(x[keep], [p for p, k in zip(pred, keep) if k], r[keep] * scale, method)
            row[f"lirpa_{method}_certifies_{scale}x"] = f"{int((lb.min(1) > 0).sum())}/{int(keep.sum())}"
    return row


def bound_pass(exe, common, n, method, eps):
    """brittle's s per bound call on the first n images at a fixed ε (examples/bound_pass.rs),
    timed as lirpa_columns times auto_LiRPA's."""
    out = subprocess.run([exe, *common, "--n", str(n), "--method", method, "--eps", repr(eps)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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
    ap.add_argument("--models", default=None, help="comma-separated manifest names (default: all)")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--bound-pass", default=None, help="examples/bound_pass binary (default: target/*/examples)")
    ap.add_argument("--eps", type=float, default=1 / 255, help="ε of the fixed-ε pass timings (both tools)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exe = args.brittle or next(
        p for p in (os.path.join(ROOT, "target", b, "brittle") for b in ("release", "debug")) if os.path.exists(p)
    )
    pass_exe = args.bound_pass or next(
        (p for p in (os.path.join(ROOT, "target", b, "examples", "bound_pass") for b in ("release", "debug"))
         if os.path.exists(p)), None)
    manifest = read_json(os.path.join(SHARED, "models", "manifest.json"))
    data = os.path.join(SHARED, "data", "cifar10", "real-pool.bin")
    lirpa, why = load_auto_lirpa()
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, numpy {np.__version__}")
    print(f"auto_LiRPA: {'imports (shims: bench/lirpa_compat.py)' if lirpa else 'unavailable (' + why + ')'}")
    agreement = fixture_agreement(lirpa) if lirpa else {}
    for k, v in agreement.items():
        print(f"  {k}: {v:.3g}")
    table = []
    wanted = args.models.split(",") if args.models else None
    with tempfile.TemporaryDirectory() as tmp:
        for m in manifest["models"]:
            name = m["name"]
            if wanted and name not in wanted:
                continue
            norm = m["normalisation"]
            model_path = os.path.join(SHARED, "models", m["onnx"])
            model_args = [
                "--model", model_path,
                "--mean", ",".join(map(str, norm["mean"])), "--std", ",".join(map(str, norm["std"])),
                "--data", data, "--threads", str(args.threads),
            ]
            common = [*model_args, "--limit", str(args.n), "--device", "cpu"]
            row = {"model": name, "n": args.n}
            margins = os.path.join(tmp, f"{name}-margins.csv")
            row["margins_certify_s"] = run([exe, "margins", *common, "--certify", "crown", "--out", margins])
            report = os.path.join(tmp, f"{name}-report")
            run([exe, "analyze", margins, "--out", report, "--bootstrap", "0"])
            b = read_json(os.path.join(report, "metrics.json"))["brackets"]
            row.update(
                bracket_median=b["ratio"]["median"], bracket_q25=b["ratio"]["q25"], bracket_q75=b["ratio"]["q75"],
                uncertified=b["n_uncertified"], violations=b["violations"], with_both=b["n"],
            )
            radii = {}
            for method in args.methods.split(","):
                out = os.path.join(tmp, f"{name}-{method}.csv")
                wall = run([exe, "certify", *common, "--method", method, "--out", out])
                df = pd.read_csv(out).sort_values("index")
                radii[method] = df["certified_radius"].to_numpy()
                row[f"{method}_s_per_radius"] = float(df["seconds"].mean())
                row[f"{method}_passes"] = float(df["passes"].mean())
                row[f"{method}_s_per_pass"] = float(df["seconds"].sum() / df["passes"].sum())
                row[f"{method}_median_radius_255"] = float(df["certified_radius"].median() * 255)
                row[f"{method}_wall_s"] = wall
                if pass_exe:
                    p = bound_pass(pass_exe, model_args, args.n, method, args.eps)
                    row[f"{method}_fixed_eps_s_per_sample_pass"] = p["s_per_sample_pass"]
                    row[f"{method}_fixed_eps_certified"] = f"{p['certified']}/{p['n']}"
            if lirpa:
                row.update(lirpa_columns(lirpa, model_path, norm, data, args.n, radii, args.eps))
            table.append(row)
            print(json.dumps(row))
    print(pd.DataFrame(table).to_string())
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            summary = {"rows": table, "auto_lirpa": why or "imports", "agreement": agreement, "threads": args.threads}
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
