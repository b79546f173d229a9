"""Bad input is a Python exception with a message that names the cause, never a crash; a
KeyboardInterrupt stops a run within one attack step and leaves resumable files."""

import json
import os
import subprocess
import sys
import threading
import _thread

import pandas as pd
import pytest
import torch
from torch import nn

import brittle


def small(mnist, n=8):
    return mnist[0][:n].clone(), mnist[1][:n].clone()


def test_three_dimensional_input_is_refused(embedded_model, mnist):
    x, _ = small(mnist)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*unsqueeze"):
        brittle.margins(embedded_model, x[0], progress=False)


def test_integer_images_are_refused(embedded_model, mnist):
    x, _ = small(mnist)
    with pytest.raises(TypeError, match=r"torch.uint8.*x.float\(\) / 255"):
        brittle.margins(embedded_model, (x * 255).to(torch.uint8), progress=False)


def test_nan_pixels_are_refused(embedded_model, mnist):
    x, _ = small(mnist)
    x[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite pixels.*image 3"):
        brittle.margins(embedded_model, x, progress=False)


def test_normalised_pixels_are_refused(embedded_model, mnist):
    x, _ = small(mnist)
    with pytest.raises(ValueError, match=r"\[0, 1\].*inside the model"):
        brittle.margins(embedded_model, (x - 0.13) / 0.31, progress=False)


def test_float_labels_and_wrong_count_are_refused(embedded_model, mnist):
    x, y = small(mnist)
    with pytest.raises(TypeError, match="integer class labels"):
        brittle.margins(embedded_model, x, y.float(), progress=False)
    with pytest.raises(ValueError, match="7 labels for 8 images"):
        brittle.margins(embedded_model, x, y[:7], progress=False)


def test_label_beyond_the_model_classes_is_a_brittle_error(embedded_model, mnist):
    x, y = small(mnist)
    y[2] = 10
    with pytest.raises(brittle.BrittleError, match="label"):
        brittle.margins(embedded_model, x, y, progress=False)


def test_effort_of_a_one_pass_attack_is_refused(embedded_model, mnist):
    x, _ = small(mnist)
    with pytest.raises(brittle.BrittleError, match="effort.*fmn has one pass: give it more steps"):
        brittle.margins(embedded_model, x, attack="fmn", effort=2, progress=False)


class Tuple(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x.flatten(1)


def test_model_returning_a_tuple_is_refused(embedded_model, mnist):
    x, _ = small(mnist)
    with pytest.raises(brittle.BrittleError, match="returned a tuple of 2 items.*logits tensor"):
        brittle.margins(Tuple(embedded_model), x, progress=False)


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten()


def test_model_returning_a_wrong_shape_is_refused(mnist):
    x, _ = small(mnist)
    with pytest.raises(brittle.BrittleError, match=r"returned shape \[\d+\] for a batch of 2"):
        brittle.margins(Flat(), x, progress=False)


class Nan(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * float("nan")


def test_model_returning_nan_is_refused(embedded_model, mnist):
    x, _ = small(mnist)
    with pytest.raises(brittle.BrittleError, match="returns logit NaN"):
        brittle.margins(Nan(embedded_model), x, progress=False)


def test_model_on_another_device_than_the_data_is_refused(embedded_model, mnist):
    x, _ = small(mnist)
    # The meta device stands in for a GPU on machines without one: the check is the same.
    elsewhere = type(embedded_model)(width=embedded_model.conv1.out_channels).to("meta")
    with pytest.raises(ValueError, match="model is on meta but x is on cpu"):
        brittle.margins(elsewhere, x, progress=False)


def test_an_error_raised_by_the_module_comes_back_as_itself(embedded_model, mnist):
    class Broken(nn.Module):
        def forward(self, x):
            raise ZeroDivisionError("inside forward")

    x, _ = small(mnist)
    with pytest.raises(ZeroDivisionError, match="inside forward"):
        brittle.margins(Broken(), x, progress=False)


class Counting(nn.Module):
    """Counts forward calls; raises KeyboardInterrupt on call `stop` (as Ctrl-C in forward)."""

    def __init__(self, inner, stop=None):
        super().__init__()
        self.inner, self.calls, self.stop = inner, 0, stop

    def forward(self, x):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.inner(x)


def no_timing(df):
    return df.drop(columns=["seconds"]).reset_index(drop=True)


def test_keyboard_interrupt_mid_run_stops_and_the_files_resume(embedded_model, mnist, tmp_path):
    x, y = mnist[0][:16], mnist[1][:16]
    kw = dict(norm="linf", attack="fmn", steps=40, batch_size=8, chunk=8, progress=False)
    whole = Counting(embedded_model)
    ref = brittle.margins(whole, x, y, out=tmp_path / "ref.csv", **kw)
    # Interrupt during the second chunk: the first chunk's rows are on disk, flushed.
    out = tmp_path / "m.csv"
    with pytest.raises(KeyboardInterrupt):
        brittle.margins(Counting(embedded_model, stop=whole.calls * 3 // 4), x, y, out=out, **kw)
    side = json.loads(out.with_name("m.csv.meta.json").read_text())
    assert side["complete"] is False
    partial = pd.read_csv(out)
    assert list(partial["index"]) == list(range(8))
    resumed = brittle.margins(Counting(embedded_model), x, y, out=out, **kw)
    pd.testing.assert_frame_equal(no_timing(resumed), no_timing(ref), check_exact=True)
    assert json.loads(out.with_name("m.csv.meta.json").read_text())["complete"] is True


def test_ctrl_c_from_another_thread_interrupts_within_one_step(embedded_model, mnist, tmp_path):
    x = mnist[0][:64]
    calls = Counting(embedded_model)
    # Simulates Ctrl-C (SIGINT on the main thread) once the run is under way.
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            brittle.margins(calls, x, attack="fmn", steps=100000, batch_size=64, progress=False,
                            out=tmp_path / "m.csv")
    finally:
        timer.cancel()
    assert calls.calls > 1


def test_resume_with_another_model_is_refused(embedded_model, mnist, tmp_path):
    x, y = small(mnist)
    out = tmp_path / "m.csv"
    brittle.margins(embedded_model, x, y, attack="fmn", steps=5, out=out, progress=False)
    other = type(embedded_model)(width=embedded_model.conv1.out_channels)
    other.load_state_dict(embedded_model.state_dict())
    with torch.no_grad():
        other.fc2.bias += 1e-3
    with pytest.raises(brittle.BrittleError, match="other settings"):
        brittle.margins(other, x, y, attack="fmn", steps=5, out=out, progress=False)


def test_wrong_torch_version_is_an_import_error(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.5.1+cpu'\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-c", "import brittle"], capture_output=True, text=True, env=env)
    assert p.returncode == 1
    assert "ImportError: brittle needs torch==2.13.0" in p.stderr and "2.5.1+cpu" in p.stderr
