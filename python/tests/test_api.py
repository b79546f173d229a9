"""The API beyond margins: scores and analyze agree with the CLI; a RobustBench-architecture
nn.Module (PreActResNet-18, defined here as in RobustBench) runs through margins and analyze."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import brittle

from conftest import ASSETS


def test_scores_match_the_cli_on_the_trace(embedded_model, mnist, tmp_path, cli):
    n = 40
    x, y = mnist[0][:n], mnist[1][:n]
    df = brittle.scores(embedded_model, x, y)
    path = tmp_path / "m.pt"
    torch.jit.trace(embedded_model, x[:2]).save(str(path))
    out = tmp_path / "scores.csv"
    cli("score", "--model", path, "--data", ASSETS / "mnist-test-1000-images-idx3-ubyte.gz",
        "--limit", n, "--threads", torch.get_num_threads(), "--device", "cpu", "--out", out)
    pd.testing.assert_frame_equal(df, pd.read_csv(out), check_exact=True)
    assert list(df["pred"]) == embedded_model(x).argmax(1).tolist()


def test_analyze_gives_the_cli_metrics_and_writes_the_report(embedded_model, mnist, tmp_path, cli):
    x, y = mnist[0][:32], mnist[1][:32]
    out = tmp_path / "m.csv"
    df = brittle.margins(embedded_model, x, y, attack="fmn", steps=20, out=out, progress=False)
    eps = ["0.1", "0.2"]
    metrics = brittle.analyze(df, eps=eps, report=tmp_path / "report", bootstrap=50)
    cli("analyze", out, "--eps", ",".join(eps), "--bootstrap", 50, "--out", tmp_path / "cli-report")
    by_cli = json.loads((tmp_path / "cli-report" / "metrics.json").read_text())
    for m in (metrics, by_cli):
        m.pop("provenance", None)
    assert metrics == by_cli
    assert (tmp_path / "report" / "report.html").exists()
    assert metrics["n_rows"] == 32 and [d["eps_label"] for d in metrics["detection"]] == eps


class PreActBlock(nn.Module):
    """RobustBench `architectures/resnet.py` PreActBlock."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """RobustBench's PreActResNet-18 (`width` 64 there; smaller here to keep the test short)."""

    def __init__(self, width=64, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, stride in enumerate([1, 2, 2, 2]):
            cout = width * 2**i
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


def test_robustbench_preact_resnet18_through_margins_and_analyze():
    torch.manual_seed(0)
    model = PreActResNet18(width=8).eval()
    x = torch.rand(12, 3, 32, 32)
    df = brittle.margins(model, x, attack="fmn", steps=25, batch_size=6, progress=False)
    assert len(df) == 12 and df["correct"].all()  # labels default to the predictions
    ok = df[df.success == 1]
    assert len(ok) >= 10 and (ok["input_margin"] > 0).all() and (ok["input_margin"] < 0.5).all()
    # Each verified margin really flips the decision: brittle re-checks it; check the order.
    assert df["logit_margin"].ge(0).all()
    metrics = brittle.analyze(df, eps=["1/255", "8/255"], bootstrap=20)
    assert metrics["n_rows"] == 12
    assert -1.0 <= metrics["kendall_tau"] <= 1.0
    # The module's own training flags are left as they were.
    model.train()
    brittle.margins(model, x[:2], attack="fmn", steps=2, progress=False)
    assert model.training and model.bn.training


def test_detector_fit_save_load_flag_agrees_with_the_cli(embedded_model, mnist, tmp_path, cli):
    n = 60
    x, y = mnist[0][:n], mnist[1][:n]
    # A detector is bound to its model's fingerprint; a model file has the same one in Python
    # and in the CLI, so the CLI can use a detector fitted in Python on that file.
    path = tmp_path / "m.pt"
    torch.jit.trace(embedded_model, x[:2]).save(str(path))
    df = brittle.margins(str(path), x, y, attack="fmn", steps=30, batch_size=30, progress=False)
    eps = float(df["input_margin"].median())  # half the samples on each side
    det = brittle.Detector.fit(df, str(path), x, eps=eps, pseudo="off")
    assert det.spec["score"] == "logit_margin" and det.spec["eps"] == eps
    saved = det.save(tmp_path / "det")
    flags = brittle.Detector.load(tmp_path / "det").flag(str(path), x[:20])
    # The rule it applies: flagged exactly when the logit margin is at most λ.
    lam = saved.spec["lambda"]
    assert list(flags["brittle"]) == [int(v <= lam) for v in flags["logit_margin"]]
    assert 0 < flags["brittle"].sum() < 20
    out = tmp_path / "s.csv"
    cli("score", "--model", path, "--data", ASSETS / "mnist-test-1000-images-idx3-ubyte.gz", "--limit", 20,
        "--detector", tmp_path / "det", "--device", "cpu", "--out", out)
    assert list(pd.read_csv(out)["brittle"]) == list(flags["brittle"])
    # Another model is refused.
    with pytest.raises(brittle.BrittleError, match="fitted on model"):
        saved.flag(embedded_model, x[:4])
