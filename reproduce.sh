#!/usr/bin/env bash
# One-shot driver for detrq. See README.md.
#   ./reproduce.sh                                              the embedded default (mini DETR, synthetic data, CPU)
#   ./reproduce.sh full --coco DIR --checkpoint FILE [--device cuda]   the paper's setting (DETR-R50, COCO 2017)
#   ./reproduce.sh test                                         pytest, then nbval on the committed notebooks
# Each sets up .venv with the pinned dependencies first when it is missing or out of date. The runs execute
# notebooks/01..05 with papermill (parameters from params/*.yaml); the executed copies replace the committed
# ones, and the results and figures go to results/ and figures/.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'TXT'
usage: ./reproduce.sh                                        run the embedded default (CPU, about 30 minutes)
       ./reproduce.sh full --coco DIR --checkpoint FILE [--device cuda|cpu]
                                                             run the paper's setting on COCO 2017 (GPU)
       ./reproduce.sh test                                   run the tests, then nbval on the notebooks
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

TIMES=()  # NAME=SECONDS of each step, recorded in results/runtime_default.json by the default run
step() {  # step NAME CMD...: run and time one step
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name"
  "$@"
  echo "   ($name: $((SECONDS - t0)) s)"
  TIMES+=("$name=$((SECONDS - t0))")
}

PAPER_NOTEBOOKS="01_hessian_traces 02_bit_allocation 03_table1 04_figures"
run_notebooks() {  # run_notebooks PARAMS_FILE [--set KEY=VALUE ...]
  # shellcheck disable=SC2086
  step "notebooks 01-04 with $1" .venv/bin/python -m detrq notebooks --params "$@" --only $PAPER_NOTEBOOKS
  step "notebook 05 (sensitivity check) with $1" .venv/bin/python -m detrq notebooks --params "$@" \
    --only 05_sensitivity_check
}

ensure_data() {
  step "synthetic data (generated if missing)" .venv/bin/python -c \
    "from detrq.cli import EMBEDDED, ensure_embedded_data; ensure_embedded_data(EMBEDDED['data'])"
}

run_default() {
  setup_venv
  ensure_data
  run_notebooks params/default.yaml
  step "uniform quantization curve (float, W8..W3)" .venv/bin/python -m detrq curve --quiet
  .venv/bin/python -m detrq readme --runtime "${TIMES[@]}"
  echo "== results in results/ (table1.md, claims.json, ...), figures in figures/, executed notebooks in notebooks/"
}

run_full() {
  local coco="" checkpoint="" device="cuda"
  while [ $# -gt 0 ]; do
    case "$1" in
      --coco) [ $# -ge 2 ] || die_usage "--coco needs a directory"; coco="$2"; shift 2 ;;
      --checkpoint) [ $# -ge 2 ] || die_usage "--checkpoint needs a file"; checkpoint="$2"; shift 2 ;;
      --device) [ $# -ge 2 ] || die_usage "--device needs cuda or cpu"; device="$2"; shift 2 ;;
      *) die_usage "unknown argument to full: '$1'" ;;
    esac
  done
  [ -n "$coco" ] || die_usage "full needs --coco DIR (COCO 2017 with annotations/, train2017/, val2017/)"
  [ -n "$checkpoint" ] || die_usage "full needs --checkpoint FILE (detr-r50-e632da11.pth)"
  [ -d "$coco" ] || die_usage "COCO directory not found: $coco"
  [ -f "$checkpoint" ] || die_usage "checkpoint not found: $checkpoint"
  case "$device" in cuda|cpu|cuda:*) ;; *) die_usage "--device must be cuda or cpu, got '$device'" ;; esac
  setup_venv
  # Absolute paths: the notebooks resolve relative ones against the repository root, not this shell's cwd.
  run_notebooks params/full.yaml --set "coco_root=$(cd "$coco" && pwd)" \
    --set "checkpoint=$(cd "$(dirname "$checkpoint")" && pwd)/$(basename "$checkpoint")" --set "device=$device"
  echo "== results in results/, figures in figures/, executed notebooks in notebooks/"
}

run_tests() {
  setup_venv
  ensure_data  # the notebooks that nbval re-executes read the synthetic set
  step "pytest" .venv/bin/python -m pytest -q "$@"
  # nbval re-executes the committed notebooks with their recorded parameters; the cached results make it quick.
  step "nbval" .venv/bin/python -m pytest -q --nbval-lax --nbval-current-env notebooks/
}

case "${1:-}" in
  "") run_default ;;
  full) shift; run_full "$@" ;;
  test) shift; run_tests "$@" ;;
  -h|--help|help) usage ;;
  *) die_usage "unknown argument '$1'" ;;
esac
