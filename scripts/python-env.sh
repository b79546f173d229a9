# Source this file: it makes (once, cached) the venv of the Python package's tests, with the
# full torch==2.13.0 wheel set (Python's `import torch` needs its CUDA libraries; the libtorch
# venv of env.sh is the slim set and cannot import torch), numpy, pandas, pytest and maturin.
# Measured: 2.6 GB downloaded in ~35 s, 4.9 GB installed. Override with BRITTLE_PY_VENV.
BRITTLE_TORCH_VERSION=2.13.0
BRITTLE_PY_VENV="${BRITTLE_PY_VENV:-$HOME/.cache/brittle/venv-py-torch-$BRITTLE_TORCH_VERSION}"
if [ ! -f "$BRITTLE_PY_VENV/.brittle-py-ready" ]; then
  echo "brittle: creating the Python package's test venv in $BRITTLE_PY_VENV (once)" >&2
  rm -rf "$BRITTLE_PY_VENV"
  "${BRITTLE_PYTHON:-python3}" -m venv "$BRITTLE_PY_VENV" \
    && "$BRITTLE_PY_VENV/bin/pip" install -q --disable-pip-version-check \
      "torch==$BRITTLE_TORCH_VERSION" numpy pandas pytest "maturin>=1.5,<2" \
    && touch "$BRITTLE_PY_VENV/.brittle-py-ready" \
    || { echo "brittle: Python venv set-up failed" >&2; return 1 2>/dev/null || exit 1; }
fi
