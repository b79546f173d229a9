"""Same margins through every door: `brittle.margins` on an nn.Module (called back from Rust),
on its `torch.jit.trace`, and the CLI on the saved trace. Bit for bit: every door runs the same
ATen kernels in the same order on the same libtorch, so no tolerance is needed; only the
`seconds` column (wall time) may differ."""

import pandas as pd
import pytest
import torch
from torch import nn

import brittle

from conftest import read_cifar_bin, shared_path

TIMING = ["seconds"]


def same_rows(a, b):
    pd.testing.assert_frame_equal(
        a.drop(columns=TIMING).reset_index(drop=True),
        b.drop(columns=TIMING).reset_index(drop=True),
        check_exact=True,
    )


def three_doors(module, x, y, tmp_path, cli, data_args, **kw):
    """The margins of the three doors (nn.Module, trace, CLI on the trace), checked equal."""
    by_module = brittle.margins(module, x, y, progress=False, **kw)
    trace = torch.jit.trace(module, x[:2])
    by_trace = brittle.margins(trace, x, y, progress=False, **kw)
    path = tmp_path / "trace.pt"
    trace.save(str(path))
    out = tmp_path / "cli.csv"
    cli("margins", "--model", path, *data_args, "--norm", kw["norm"], "--attack", kw["attack"],
        "--batch-size", kw["batch_size"], "--seed", kw["seed"], "--threads", torch.get_num_threads(),
        "--device", "cpu", "--out", out)
    by_cli = pd.read_csv(out)
    assert list(by_module.columns) == list(by_cli.columns)
    same_rows(by_module, by_trace)
    same_rows(by_module, by_cli)
    return by_module


def test_embedded_model_same_margins_through_every_door(embedded_model, mnist, tmp_path, cli):
    n = 16
    x, y = mnist[0][:n], mnist[1][:n]
    data = ["--data", "assets/mnist-test-1000-images-idx3-ubyte.gz", "--limit", n]
    from conftest import REPO

    data[1] = REPO / data[1]
    df = three_doors(embedded_model, x, y, tmp_path, cli, data,
                     norm="linf", attack="best", batch_size=8, seed=0)
    assert len(df) == n and df["success"].sum() >= n - 2
    assert (df.loc[df.success == 1, "input_margin"] > 0).all()


@pytest.mark.shared
def test_shared_cifar_model_same_margins_through_every_door(tmp_path, cli):
    pool = shared_path("data", "cifar10", "real-pool.bin")
    n = 8
    x, y = read_cifar_bin(pool, n)

    class AsModule(nn.Module):
        """The shared TorchScript model behind a plain nn.Module, so brittle calls it back."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    module = AsModule(torch.jit.load(str(shared_path("models", "resnet_2b.pt")))).eval()
    df = three_doors(module, x, y, tmp_path, cli, ["--data", pool, "--limit", n],
                     norm="linf", attack="best", batch_size=4, seed=0)
    assert df["success"].sum() >= n - 1
