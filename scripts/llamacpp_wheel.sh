#!/usr/bin/env bash
# Build llama-cpp-python from source once, keep the wheel, install it into the venv.
#
#   bash scripts/llamacpp_wheel.sh [PYTHON]      (PYTHON: the venv's python, default .venv/bin/python)
#
# The PyPI package is an sdist that compiles llama.cpp with CMake and a C++ compiler: ~15-20 minutes on
# 2 cores. The wheel is cached in $MICROGPT_WHEELS (default ~/.cache/microgpt/wheels) and reused by every
# later run, so only the first `make test-llamacpp` pays for the build. Pin: $LLAMA_CPP_PYTHON_VERSION.
# Build flags: $CMAKE_ARGS (default: the library only, tuned for this CPU with GGML_NATIVE=ON: such a wheel
# is for this machine's CPU family; point MICROGPT_WHEELS elsewhere to keep wheels for other machines).
set -euo pipefail

PY="${1:-.venv/bin/python}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEELS="${MICROGPT_WHEELS:-$HOME/.cache/microgpt/wheels}"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON}"

if [ ! -x "$PY" ]; then
    echo "error: $PY is not an executable python; run \`make install\` first or pass the venv's python" >&2
    exit 2
fi

have="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
if [ "$have" = "$VERSION" ] && "$PY" -c 'import llama_cpp' 2>/dev/null; then
    echo "llama-cpp-python $VERSION is installed"
    exit 0
fi

mkdir -p "$WHEELS"
wheel="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION from source (CMAKE_ARGS=$CMAKE_ARGS); this takes ~15-20 minutes on 2 cores"
    start=$(date +%s)
    "$PY" -m pip wheel --no-deps "llama-cpp-python==$VERSION" -w "$WHEELS"
    echo "built in $(( $(date +%s) - start )) s"
    wheel="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)"
fi
echo "installing $wheel"
# its pure-Python dependencies (numpy, typing-extensions, diskcache, jinja2) come from the index as usual
"$PY" -m pip install -q "$wheel"
"$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'
