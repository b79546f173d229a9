"""brittle from Python: input margins, margin consistency and brittle-decision detection of
image classifiers, on your own torch.

The Rust core (the `brittle` crate) runs in this process on the libtorch of the installed
torch, so any ``torch.nn.Module`` is a model: brittle calls it back, and autograd flows through
it as through a native model. Results are the CLI's files (same columns, same numbers).
"""

import torch as _torch

REQUIRED_TORCH = "2.13.0"
if _torch.__version__.split("+")[0] != REQUIRED_TORCH:
    # The extension links this exact libtorch (tch 0.26); another torch would crash, not fail.
    raise ImportError(
        f"brittle needs torch=={REQUIRED_TORCH} (its Rust core links that libtorch), but torch "
        f"{_torch.__version__} is installed at {_torch.__file__}; "
        f"pip install torch=={REQUIRED_TORCH}"
    )

from ._brittle import BrittleError  # noqa: E402
from ._api import Detector, analyze, margins, scores  # noqa: E402

__all__ = ["margins", "scores", "analyze", "Detector", "BrittleError", "REQUIRED_TORCH"]
