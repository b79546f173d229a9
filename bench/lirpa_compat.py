"""Shims that let auto_LiRPA 0.3 (2022, the one PyPI release) import and bound under torch 2.13
and numpy 2: each replaces a name those releases removed or changed, and one works around a
non-contiguous view. Import this instead of importing auto_LiRPA first: it imports auto_LiRPA
itself, after the shims its import needs, to patch two methods.

auto_LiRPA 0.3 and the pure-Python tqdm and appdirs it imports go in a side folder, never into
the brittle venv (`pip install --no-deps --target DIR auto-lirpa==0.3 appdirs tqdm`), put on
PYTHONPATH (bench/certify.py's docstring lists what its ONNX loader adds).
"""
import sys
import types

import numpy as np
import torch
import torch.onnx.symbolic_helper
from torch.onnx._internal.torchscript_exporter import _globals

# numpy 2 removed numpy.lib.arraysetops; auto_LiRPA.operators reads `isin` from it.
_arraysetops = types.ModuleType("numpy.lib.arraysetops")
_arraysetops.isin = np.isin
sys.modules.setdefault("numpy.lib.arraysetops", _arraysetops)

# torch 2.x dropped symbolic_helper._set_opset_version; parse_graph calls it before _optimize_graph.
torch.onnx.symbolic_helper._set_opset_version = lambda v: setattr(_globals.GLOBALS, "export_onnx_opset_version", v)

# torch 2.x dropped torch._C.Node.__getitem__ (node["attr"]); parse_graph reads attributes so.
torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)

import auto_LiRPA.bound_general  # noqa: E402 - the shims above must come first

# torch 2.x passes remove_duplicate= to Module._named_members, which BoundedModule overrides.
_named_members = auto_LiRPA.bound_general.BoundedModule._named_members
auto_LiRPA.bound_general.BoundedModule._named_members = (
    lambda self, get_members_fn, prefix="", recurse=True, remove_duplicate=True:
    _named_members(self, get_members_fn, prefix, recurse)
)

import auto_LiRPA.operators.pooling as _pooling  # noqa: E402

# AveragePool's backward .view()s its A, which reaches it non-contiguous here: pass a contiguous copy.
_avg_backward = _pooling.BoundAveragePool.bound_backward
_pooling.BoundAveragePool.bound_backward = lambda self, lA, uA, x: _avg_backward(
    self, *(a.contiguous() if isinstance(a, torch.Tensor) else a for a in (lA, uA)), x
)
