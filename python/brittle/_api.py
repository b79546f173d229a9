"""The Python API: checks the inputs, builds the Rust-side model, runs the library's job and
reads back the files it wrote (the CLI's files: same columns, same numbers)."""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch

from . import _brittle

#: What `brittle.margins` calls `source` in the sidecar for in-memory data.
_SOURCE = "python:tensor{}"


def _check_images(x, name="x"):
    """x: float [N, C, H, W] in [0, 1], finite. Returns it unchanged (no copy, same device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (one image? use x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"{name} must be images [N, C, H, W], got shape {list(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} holds no images (shape {list(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; brittle needs float pixels in [0, 1] "
            f"(for 8-bit images: x.float() / 255)"
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"{name} has NaN or infinite pixels (first in image {bad})")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} has pixels in [{lo:.4g}, {hi:.4g}]; brittle needs unnormalised pixels in [0, 1] "
            f"(normalise inside the model, e.g. nn.Sequential(Normalize(mean, std), net))"
        )
    return x


def _check_labels(y, n):
    """Labels as a list of ints (or None)."""
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        if y.is_floating_point() or y.is_complex():
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        y = y.detach().cpu().reshape(-1).tolist()
    else:
        y = list(y)
        if not all(isinstance(v, int) or hasattr(v, "__index__") for v in y):
            raise TypeError("y must hold integer class labels")
        y = [int(v) for v in y]
    if len(y) != n:
        raise ValueError(f"y has {len(y)} labels for {n} images")
    if any(v < 0 for v in y):
        raise ValueError("y has negative labels")
    return y


def fingerprint(module):
    """sha256 of an nn.Module: its class and every state_dict entry (name, dtype, shape, bytes).
    A margins file records it, so a resumed run refuses another model."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _module_device(module, default):
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return default


def _device_text(d):
    d = torch.device(d)
    return f"cuda:{d.index or 0}" if d.type == "cuda" else d.type


@contextlib.contextmanager
def _eval_mode(module):
    """The module in eval mode for the call (attacks assume fixed batch-norm statistics and no
    dropout); the training flags of every submodule are restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _model(model, x, arch=None, num_classes=None, mean=None, std=None, device=None):
    """The Rust-side model for `model`: an nn.Module (called back), a ScriptModule (saved and
    loaded as `brittle --model` would), or a path (`.pt`, `.onnx`, weights with `arch`)."""
    input_shape = list(x.shape[1:])
    if isinstance(model, (str, os.PathLike)):
        dev = _device_text(device if device is not None else x.device)
        yield _brittle.Model.from_file(
            os.fspath(model), dev, input_shape, arch, num_classes, _floats(mean), _floats(std)
        )
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, a torch.jit.ScriptModule or a model path, "
            f"got {type(model).__name__}"
        )
    if arch is not None or mean is not None or std is not None:
        raise ValueError(
            "arch, mean and std apply to a model file; normalise inside the module instead"
        )
    dev = _module_device(model, x.device)
    if dev != x.device:
        raise ValueError(
            f"the model is on {dev} but x is on {x.device}; move one of them "
            f"(x.to({str(dev)!r}) or model.to({str(x.device)!r}))"
        )
    with _eval_mode(model):
        if isinstance(model, torch.jit.ScriptModule):
            with tempfile.TemporaryDirectory(prefix="brittle-") as tmp:
                path = Path(tmp) / "model.pt"
                torch.jit.save(model, str(path))
                yield _brittle.Model.from_file(str(path), _device_text(dev), input_shape)
            return
        probe = x[: min(2, x.shape[0])]
        yield _brittle.Model.from_module(
            model, _device_text(dev), type(model).__name__, fingerprint(model), probe
        )


def _floats(v):
    return None if v is None else [float(a) for a in v]


@contextlib.contextmanager
def _out_path(out, name):
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="brittle-") as tmp:
        yield Path(tmp) / name


def _read_csv(path):
    return pd.read_csv(path)


def margins(
    model,
    x,
    y=None,
    norm="linf",
    attack="best",
    batch_size=128,
    seed=0,
    progress=True,
    out=None,
    *,
    steps=None,
    topk=9,
    effort=1,
    chunk=None,
    target_true=False,
    allow_low_accuracy=False,
    arch=None,
    num_classes=None,
    mean=None,
    std=None,
    device=None,
):
    """Input margins of every image, as `brittle margins` computes them.

    model: a ``torch.nn.Module`` (called back; ``forward(x)`` takes float pixels in [0, 1] and
    returns logits ``[N, K]``), a ``torch.jit.ScriptModule``, or a model file (``.pt``,
    ``.onnx``, weights with ``arch``; ``mean``/``std`` as the CLI's ``--mean``/``--std``).
    x: float images ``[N, C, H, W]`` in [0, 1] on the model's device. y: labels (default: the
    model's predictions, the label the attacks move away from anyway).

    steps, topk, effort, chunk, target_true: as the CLI's flags (``effort=k`` runs ``best`` with
    every budget times k: tighter margins at about k times the cost).

    Returns a DataFrame with the margins CSV's columns. With ``out`` the CSV and its sidecar
    ``<out>.meta.json`` are written there, flushed per chunk: after an interruption (Ctrl-C
    raises KeyboardInterrupt within one attack step) the same call resumes, exactly as the CLI.
    """
    _check_images(x)
    y = _check_labels(y, x.shape[0])
    with _model(model, x, arch, num_classes, mean, std, device) as m, _out_path(out, "margins.csv") as path:
        _brittle.margins(
            m, x.detach(), y, str(path), norm, attack, steps, topk, effort, batch_size, chunk, seed,
            target_true, progress, _SOURCE.format(list(x.shape)), allow_low_accuracy,
        )
        df = _read_csv(path)
        side = Path(str(path) + ".meta.json")
        df.attrs["sidecar"] = json.loads(side.read_text())
    return df


def scores(model, x, y=None, norm="linf", batch_size=256, *, arch=None, num_classes=None, mean=None, std=None, device=None):
    """Free scores of every image (one forward pass each), as `brittle score`: a DataFrame with
    its CSV's columns (``index,label,pred,correct,logit_margin,...``)."""
    _check_images(x)
    y = _check_labels(y, x.shape[0])
    with _model(model, x, arch, num_classes, mean, std, device) as m, _out_path(None, "scores.csv") as path:
        _brittle.scores(m, x.detach(), y, str(path), norm, batch_size, _SOURCE.format(list(x.shape)))
        return _read_csv(path)


def _eps_text(e):
    if isinstance(e, str):
        return e
    if isinstance(e, (int, float)) and math.isfinite(e):
        return repr(float(e))
    raise TypeError(f"eps values must be numbers or texts like '8/255', got {e!r}")


def _margins_file(margins, tmp):
    """A margins CSV path for `margins`: a path as is, a DataFrame written with its sidecar."""
    if isinstance(margins, (str, os.PathLike)):
        return Path(margins)
    if not isinstance(margins, pd.DataFrame):
        raise TypeError(f"margins must be a DataFrame from brittle.margins or a CSV path, got {type(margins).__name__}")
    path = Path(tmp) / "margins.csv"
    margins.to_csv(path, index=False)
    side = margins.attrs.get("sidecar")
    if side is not None:
        Path(str(path) + ".meta.json").write_text(json.dumps(side))
    return path


def analyze(margins, eps=None, report=None, *, norm=None, seed=0, bootstrap=1000):
    """Margin consistency and detection from margins (a DataFrame of `brittle.margins` or a
    margins CSV), as `brittle analyze`: returns the metrics.json dict. ``report``: a folder
    that also gets report.html and the figures. ``eps``: e.g. ``["2/255", "8/255"]`` or floats
    (default: the CLI's sweep for the norm)."""
    with tempfile.TemporaryDirectory(prefix="brittle-") as tmp:
        csv = _margins_file(margins, tmp)
        out = Path(report) if report is not None else Path(tmp) / "report"
        argv = ["analyze", str(csv), "--out", str(out), "--seed", str(seed), "--bootstrap", str(bootstrap)]
        if eps:
            argv += ["--eps", ",".join(_eps_text(e) for e in eps)]
        if norm is not None:
            argv += ["--norm", norm]
        _brittle.cli(argv)
        return json.loads((out / "metrics.json").read_text())


class Detector:
    """A detector of brittle decisions, as `brittle fit` makes it: a folder with detector.json
    (threshold λ on the logit margin or on a learned pseudo-margin) and the pseudo-margin weights.

    ``Detector.fit(margins, model, x, eps=...)`` fits one, ``.save(dir)`` / ``Detector.load(dir)``
    keep it (the CLI's ``brittle score --detector dir`` reads the same folder), ``.flag(model, x)``
    scores new images: the free scores plus ``brittle`` (1: flagged) and ``pseudo_margin``."""

    def __init__(self, path, _keep=None):
        self.path = Path(path)
        self.spec = json.loads((self.path / "detector.json").read_text())
        self._keep = _keep  # the temporary folder of a detector not saved yet

    @classmethod
    def fit(cls, margins, model, x, eps, y=None, *, pseudo="auto", target_tpr=0.95, seed=0,
            batch_size=256, arch=None, num_classes=None, mean=None, std=None, device=None):
        """Fits on `margins` (a DataFrame of `brittle.margins` on these `x`, or its CSV path).
        ``eps``: the budget, e.g. ``"8/255"``; the norm is the margins'. ``y``: the labels
        (default: the margins file's)."""
        _check_images(x)
        keep = tempfile.TemporaryDirectory(prefix="brittle-detector-")
        csv = _margins_file(margins, keep.name)
        table = pd.read_csv(csv)
        side = Path(str(csv) + ".meta.json")
        norm = json.loads(side.read_text())["settings"]["norm"] if side.exists() else "linf"
        if y is None:
            by_index = dict(zip(table["index"], table["label"]))
            missing = [i for i in range(x.shape[0]) if i not in by_index]
            if missing:
                raise ValueError(f"the margins have no row for images {missing[:5]}...; pass y")
            y = [int(by_index[i]) for i in range(x.shape[0])]
        y = _check_labels(y, x.shape[0])
        out = Path(keep.name) / "detector"
        with _model(model, x, arch, num_classes, mean, std, device) as m:
            _brittle.fit(m, x.detach(), y, str(csv), str(out), _eps_text(eps), norm, pseudo,
                         target_tpr, seed, batch_size, _SOURCE.format(list(x.shape)))
        return cls(out, _keep=keep)

    @classmethod
    def load(cls, path):
        return cls(path)

    def save(self, path):
        """Copies the detector folder to `path` (created); returns the saved detector."""
        shutil.copytree(self.path, path, dirs_exist_ok=True)
        return Detector(path)

    def flag(self, model, x, batch_size=256, *, arch=None, num_classes=None, mean=None, std=None, device=None):
        """Free scores of `x` and the detector's decision: a DataFrame as `brittle score
        --detector` writes. The model must be the one the detector was fitted on."""
        _check_images(x)
        with _model(model, x, arch, num_classes, mean, std, device) as m, _out_path(None, "scores.csv") as csv:
            brittle, pseudo = _brittle.flag(m, x.detach(), str(self.path), str(csv), batch_size,
                                            _SOURCE.format(list(x.shape)))
            df = _read_csv(csv)
        df["brittle"] = [int(b) for b in brittle]
        df["pseudo_margin"] = [float("nan") if p is None else p for p in pseudo]
        return df
