#!/usr/bin/env bash
# The two commands of the README, each installing what it needs into ./.venv first:
#   ./run.sh main [args]   the main job on the embedded default (bundled model, procedural data)
#   ./run.sh test [args]   the test suite (pytest)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing lrformer-edge and its dependencies into $VENV (first run only)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Pinned CPU build first, so nothing can pull a CUDA build in its place.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev,openvino,tensorrt,qat,coreml]"
  touch "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
  main) exec "$VENV/bin/python" deploy/quickstart.py "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh main|test [args]" >&2; exit 2 ;;
esac
