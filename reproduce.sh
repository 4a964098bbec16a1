#!/usr/bin/env bash
# One-shot driver for detrq. See README.md.
#   ./reproduce.sh                 the embedded default (mini DETR on synthetic data, CPU)
#   ./reproduce.sh test            the test suite (pytest)
# Each sets up .venv with the pinned dependencies first when it is missing or out of date.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'TXT'
usage: ./reproduce.sh            run the embedded default (CPU)
       ./reproduce.sh test       run the tests
TXT
}

die_usage() { usage >&2; echo "error: $1" >&2; exit 2; }

setup_venv() {
  local py="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $("$py" --version)"
    "$py" -m venv .venv
  fi
  # Reinstall when pyproject.toml changed since the last successful install.
  if [ ! -f .venv/.detrq-installed ] || [ pyproject.toml -nt .venv/.detrq-installed ]; then
    echo "== installing the pinned dependencies into .venv (first time: several minutes)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e .
    touch .venv/.detrq-installed
  fi
}

step() {  # step NAME CMD...: run and time one step
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name"
  "$@"
  echo "   ($name: $((SECONDS - t0)) s)"
}

run_default() {
  setup_venv
  step "synthetic data (generated if missing)" .venv/bin/python -c \
    "from detrq.cli import EMBEDDED, ensure_embedded_data; ensure_embedded_data(EMBEDDED['data'])"
  mkdir -p results
  for bits in float 8 6 5 4 3; do
    if [ "$bits" = float ]; then
      step "evaluate float" .venv/bin/python -m detrq evaluate --quiet --out results/eval_mini_float.json
    else
      step "evaluate uniform W$bits" .venv/bin/python -m detrq evaluate --quiet --bits "$bits" \
        --out "results/eval_mini_w$bits.json"
    fi
  done
  echo "== results are in results/"
}

run_tests() {
  setup_venv
  .venv/bin/python -m pytest -q "$@"
}

case "${1:-}" in
  "") run_default ;;
  test) shift; run_tests "$@" ;;
  -h|--help|help) usage ;;
  *) die_usage "unknown argument '$1'" ;;
esac
