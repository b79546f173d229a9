"""maturin's PEP 517 backend, with tch's build pointed at the target environment's libtorch.

The extension must link the libtorch that `import torch` loads (one libtorch: tensors and
autograd are shared with the user's modules). tch's build script can find it by importing
torch (`LIBTORCH_USE_PYTORCH=1`), but in pip's default isolated build environment torch is not
importable; so this wrapper locates the torch package of the environment pip installs into and
passes its directory as `LIBTORCH` (a caller's own LIBTORCH or LIBTORCH_USE_PYTORCH wins).
"""

import os
import sys
import sysconfig
from pathlib import Path

from maturin import *  # noqa: F401,F403 (the PEP 517 hooks)
from maturin import build_wheel as _build_wheel
from maturin import build_editable as _build_editable


def _target_torch():
    """The `torch` package directory of the environment running pip, if it has one."""
    bases = {sys.prefix, getattr(sys, "base_prefix", sys.prefix)}
    for base in bases:
        for key in ("purelib", "platlib"):
            path = Path(sysconfig.get_paths(vars={"base": base, "platbase": base})[key]) / "torch"
            if (path / "lib").is_dir() and (path / "include").is_dir():
                return path
    return None


def _point_tch_at_torch():
    if os.environ.get("LIBTORCH_USE_PYTORCH") or os.environ.get("LIBTORCH"):
        return  # the caller chose
    torch = _target_torch()
    if torch is None:
        try:
            import torch as found  # importable here: --no-build-isolation outside a venv

            torch = Path(found.__file__).parent
        except ImportError:
            raise RuntimeError(
                "brittle links the libtorch of the installed torch==2.13.0: install torch "
                "first (pip install torch==2.13.0), then brittle"
            ) from None
    # The same variable in every mode, so that cargo's cached build of tch stays valid.
    os.environ["LIBTORCH"] = str(torch)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _point_tch_at_torch()
    return _build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _point_tch_at_torch()
    return _build_editable(wheel_directory, config_settings, metadata_directory)
