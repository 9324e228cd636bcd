#!/usr/bin/env bash
# The two commands of the README, each installing what it needs into ./.venv first:
#   ./run.sh main [args]   the main job on the embedded default (bundled model, procedural data)
#   ./run.sh test [args]   the test suite (pytest)
#   ./run.sh lock          re-resolve pyproject.toml's ranges and rewrite constraints.txt
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
PIP_VERSION=26.3
EXTRAS="dev,openvino,tensorrt,qat,coreml,executorch"
LOCK=constraints.txt

install() {  # install into the venv $1, with the lock file's exact versions unless $2 is "unlocked"
  local venv=$1 constraints=(-c "$LOCK")
  [ "${2:-}" = unlocked ] && constraints=()
  "$venv/bin/python" -m pip install -q --upgrade "pip==$PIP_VERSION"
  # Pinned CPU build first, so nothing can pull a CUDA build in its place.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q "${constraints[@]}" -e ".[$EXTRAS]"
}

command=${1:-}
shift || true
if [ "$command" = lock ]; then
  # A fresh resolve of pyproject.toml's ranges into a scratch venv, written to the lock file.
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  "$PYTHON" -m venv "$scratch/venv"
  install "$scratch/venv" unlocked
  { sed -n '1,3p' "$LOCK"
    "$scratch/venv/bin/python" -m pip freeze --exclude-editable \
      | sed -e 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' | grep -v '^lrformer' ; } > "$LOCK.new"
  mv "$LOCK.new" "$LOCK"
  echo "wrote $LOCK; run ./run.sh test (it reinstalls from the new lock) before committing it"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing lrformer-edge and its dependencies into $VENV (first run only; versions from $LOCK)"
  install "$VENV"
  touch "$stamp"
fi

case "$command" in
  main) exec "$VENV/bin/python" deploy/quickstart.py "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh main|test [args] | ./run.sh lock" >&2; exit 2 ;;
esac
