# Source this file: it makes (once, cached) the Python venv whose torch wheel carries the
# libtorch that `tch` links against, then exports what tch's build script needs.
# Idempotent: a second run only exports. Override the location with BRITTLE_VENV.
# Extra Python tools for fixtures and benchmarks: BRITTLE_DEV=1 (numpy, scipy, sklearn, onnx...).
BRITTLE_TORCH_VERSION=2.13.0
BRITTLE_VENV="${BRITTLE_VENV:-$HOME/.cache/brittle/venv-torch-$BRITTLE_TORCH_VERSION}"
_brittle_py="${BRITTLE_PYTHON:-python3}"
if [ ! -f "$BRITTLE_VENV/.brittle-ready" ]; then
  echo "brittle: creating the libtorch venv in $BRITTLE_VENV (once)" >&2
  rm -rf "$BRITTLE_VENV"
  "$_brittle_py" -m venv "$BRITTLE_VENV" || return 1 2>/dev/null || exit 1
  # The plain torch wheel pulls 2.6 GB of CUDA wheels; the slim set is enough for CPU and CUDA.
  # The companions go in first, through pip's resolver (so sympy gets the mpmath it supports);
  # torch goes in last with --no-deps, which also skips pip's environment check: run after
  # torch, that check prints one "ERROR: pip's dependency resolver..." line per CUDA wheel that
  # torch names and this venv leaves out on purpose. A real failure (network, missing version)
  # still prints pip's own error and stops here.
  "$BRITTLE_VENV/bin/pip" install -q --disable-pip-version-check nvidia-cuda-runtime \
    nvidia-cuda-cupti numpy typing-extensions filelock sympy networkx jinja2 fsspec \
    && "$BRITTLE_VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
      "torch==$BRITTLE_TORCH_VERSION" \
    && touch "$BRITTLE_VENV/.brittle-ready" \
    || { echo "brittle: venv set-up failed" >&2; return 1 2>/dev/null || exit 1; }
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  # An NVIDIA GPU: libtorch_cuda needs the CUDA wheels left out above (cuDNN, cuBLAS, NCCL...),
  # i.e. torch's own requirements, installed once (about 3 GB); cargo then links libtorch_cuda
  # (build.rs, BRITTLE_CUDA=1). Without nvidia-smi nothing here runs: the CPU path is unchanged.
  if [ ! -f "$BRITTLE_VENV/.brittle-cuda-ready" ]; then
    echo "brittle: NVIDIA GPU found: installing the CUDA libraries libtorch needs in $BRITTLE_VENV (once)" >&2
    "$BRITTLE_VENV/bin/pip" install -q --disable-pip-version-check "torch==$BRITTLE_TORCH_VERSION" \
      && touch "$BRITTLE_VENV/.brittle-cuda-ready" \
      || { echo "brittle: installing the CUDA libraries failed" >&2; return 1 2>/dev/null || exit 1; }
  fi
  export BRITTLE_CUDA="${BRITTLE_CUDA:-1}"
fi
if [ "${BRITTLE_DEV:-0}" = 1 ] && [ ! -f "$BRITTLE_VENV/.brittle-dev-ready" ]; then
  # Python torch itself needs the CUDA libraries to import: the full wheel set (dev machines only).
  "$BRITTLE_VENV/bin/pip" install -q "torch==$BRITTLE_TORCH_VERSION" scipy scikit-learn safetensors onnx onnxruntime \
    && touch "$BRITTLE_VENV/.brittle-dev-ready"
fi
_brittle_site="$("$BRITTLE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export LIBTORCH="$_brittle_site/torch"
export LIBTORCH_BYPASS_VERSION_CHECK=0
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$BRITTLE_VENV/bin:$PATH"
unset _brittle_py _brittle_site
