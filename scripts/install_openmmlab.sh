#!/usr/bin/env bash
# Installs mmengine, mmcv (with compiled ops), mmdet and mmsegmentation into the venv.
# mmcv 2.1.0 has no wheel for torch 2.14: it is built once from its PyPI source (torch 2.14's
# headers need C++20) and the wheel is kept in a cache outside the repo, so later installs
# take seconds. Usage: scripts/install_openmmlab.sh [PYTHON]
set -euo pipefail
PY="${1:-.venv/bin/python}"
CACHE="${INTRAIN_WHEEL_CACHE:-$HOME/.cache/intrain/wheels}"
MMCV_VERSION=2.1.0
OTHERS="mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2"

# Already installed at these versions, compiled ops included: nothing to do (even without the cache).
if "$PY" - "mmcv==$MMCV_VERSION" $OTHERS >/dev/null 2>&1 <<'CHECK'; then
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    assert version(name) == wanted, pin
version("ftfy"), version("regex")
import mmcv.ops, mmdet, mmseg  # noqa: E401,F401  (mmcv.ops: the compiled kernels load)
CHECK
    echo "openmmlab ready (already installed): mmcv==$MMCV_VERSION $OTHERS"
    exit 0
fi
mkdir -p "$CACHE"

# setuptools >= 70 dropped what mmcv's setup.py imports; the build sees the venv's setuptools.
"$PY" -m pip install -q "setuptools>=61,<70" wheel ninja

wheel=$(ls "$CACHE"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    build=$(mktemp -d)
    echo "building mmcv $MMCV_VERSION with ops (one time, about 20 minutes on 2 cores) in $build"
    "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$build"
    tar -xzf "$build"/mmcv-$MMCV_VERSION.tar.gz -C "$build"
    src="$build/mmcv-$MMCV_VERSION"
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
    grep -q -- '-std=c++20' "$src/setup.py" || { echo "mmcv setup.py: no C++ standard flag to patch" >&2; exit 1; }
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE" "$src"
    rm -rf "$build"
    wheel=$(ls "$CACHE"/mmcv-$MMCV_VERSION-*.whl | head -1)
fi

# The constraints keep every package on the torch already installed and on the versions
# this project was tested with (openmmlab-constraints.txt: a pip freeze of a working venv).
constraints=$(mktemp)
"$PY" -m pip freeze | grep -iE '^(torch|torchvision|numpy)==' > "$constraints"
# ftfy and regex: mmseg imports its text tokenizer with its models.
"$PY" -m pip install -q -c "$constraints" -c "$(dirname "$0")/openmmlab-constraints.txt" \
    "$wheel" $OTHERS ftfy regex
rm -f "$constraints"
"$PY" -c "import mmcv.ops, mmdet, mmseg; print('openmmlab ready: mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__)"
