#!/usr/bin/env bash
# One-shot driver for detrq. See README.md.
#   ./reproduce.sh [--profile paper|complete] [--reuse]
#                                     the embedded default (mini DETR, synthetic data, CPU), computed into runs/default/
#                                     (complete, the default) or runs/paper/ (the paper's numbers only)
#   ./reproduce.sh int8 [--reuse]     the INT8 Faster R-CNN workflow (notebook 06), computed into runs/int8/
#   ./reproduce.sh accept             make the compared runs/ the committed results/, figures/ and notebooks/
#   ./reproduce.sh full --coco DIR --checkpoint FILE [--device cuda] [--nproc N] [--profile paper|complete]
#                                     the paper's setting, into runs/full/
#   ./reproduce.sh test               pytest, then nbval on the committed notebooks
# Each sets up .venv with the pinned dependencies first when it is missing or out of date. A run never writes the
# committed results: it computes everything into its run directory and ends with the reproduction report
# (results/reproduction.json), which compares every number with the committed one.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'TXT'
usage: ./reproduce.sh [--profile paper|complete] [--reuse]
                                       run the embedded default from scratch (CPU), then compare it with the
                                       committed results: profile complete (the default) computes everything
                                       into runs/default/; profile paper only what reproducing the paper needs
                                       (Table 1's 14 rows with intervals, its claims, Figures 1-2; one probe
                                       seed) into runs/paper/, and its report marks the rest "not run"
       ./reproduce.sh int8 [--reuse]   run the INT8 Faster R-CNN workflow into runs/int8/ (CPU, 10-25 minutes), 
                                       then compare it with the committed results
       ./reproduce.sh accept           replace the committed results/, figures/, notebooks/ and README numbers
                                       with the runs in runs/ (after reading their report)
       ./reproduce.sh full --coco DIR --checkpoint FILE [--device cuda|cpu] [--nproc N] [--profile P]
                                       run the paper's setting on COCO 2017 (GPU) into runs/full/; with
                                       --nproc N the traces and Table 1's evaluations run as N torchrun
                                       ranks (one GPU each); --profile as above (default: complete)
       ./reproduce.sh test             run the tests, then nbval on the committed notebooks
--reuse keeps the run directory's cached results (a copy of the committed ones when it has none) and
re-renders from them; the report then says the results were reused, not reproduced.
TXT
}

die_usage() { usage >&2; echo "error: $1" >&2; exit 2; }

setup_venv() {
  local py="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $("$py" --version)"
    "$py" -m venv .venv
  fi
  # Reinstall when requirements.lock or pyproject.toml changed since the last successful install. Every package
  # comes from the lock (pinned with hashes, setuptools included); detrq itself is then installed editable
  # without its dependencies and without build isolation, with the locked setuptools.
  if [ ! -f .venv/.detrq-installed ] || [ requirements.lock -nt .venv/.detrq-installed ] \
    || [ pyproject.toml -nt .venv/.detrq-installed ]; then
    echo "== installing the locked dependencies (requirements.lock) into .venv (first time: several minutes)"
    .venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
    touch .venv/.detrq-installed
  fi
  # JupyterLab as the project ships it (no news popup, no autosave over the committed notebooks): the venv's
  # settings overrides, which apply to this environment only, never to the user's home.
  local lab_settings=.venv/share/jupyter/lab/settings
  if ! cmp -s notebooks/jupyterlab-overrides.json "$lab_settings/overrides.json"; then
    mkdir -p "$lab_settings"
    cp notebooks/jupyterlab-overrides.json "$lab_settings/overrides.json"
  fi
}

acquire_run_lock() {  # one ./reproduce.sh at a time per checkout: a second one names the first and stops
  mkdir -p runs
  local lock=runs/.reproduce.pid
  if ! ( set -C; echo $$ > "$lock" ) 2>/dev/null; then
    local holder; holder="$(cat "$lock" 2>/dev/null || true)"
    if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then
      echo "error: another ./reproduce.sh (pid $holder) is running in this checkout; wait for it or stop it" >&2
      exit 2
    fi
    echo $$ > "$lock"  # the holder is gone: its lock is stale
  fi
  trap 'rm -f runs/.reproduce.pid' EXIT
}

TIMES=()  # NAME=SECONDS of each step, recorded in runs/<run>/runtime.json
LAST=0
timed() {  # timed NAME CMD...: run and time one step (the command says what it does and how long it took)
  local name="$1"; shift
  local t0=$SECONDS
  "$@"
  LAST=$((SECONDS - t0))
  TIMES+=("$name=$LAST")
}
step() {  # step NAME CMD...: say, run and time one step
  echo "== $1"
  timed "$@"
  echo "   ($1: $LAST s)"
}

parse_reuse() {  # parse_reuse ARGS...: sets REUSE to --reuse or empty, and PROFILE (default complete)
  REUSE=""
  PROFILE=complete
  while [ $# -gt 0 ]; do
    case "$1" in
      --reuse) REUSE="--reuse"; shift ;;
      --profile) [ $# -ge 2 ] || die_usage "--profile needs paper or complete"; PROFILE="$2"; shift 2 ;;
      *) die_usage "unknown argument '$1'" ;;
    esac
  done
  check_profile "$PROFILE"
}

check_profile() {
  case "$1" in paper|complete) ;; *) die_usage "--profile must be paper or complete, got '$1'" ;; esac
}

ensure_data() {
  step "synthetic data (generated if missing)" .venv/bin/python -c "import sys; from detrq.cli import EMBEDDED, \
ensure_embedded_data, guarded; sys.exit(guarded(ensure_embedded_data, EMBEDDED['data']))"
}

in_run() {  # in_run RUN: the parameter overrides that send a notebook's results, figures and copy to runs/RUN/
  echo "--set results_dir=runs/$1/results --set figures_dir=runs/$1/figures --out-dir runs/$1/notebooks"
}

notebook_steps() {  # notebook_steps PARAMS PROFILE ARGS...: one timed step per step of the profile: a notebook,
  local params="$1" profile="$2"; shift 2   # or notebooks that run together (a nested list in the profile)
  local steps line
  steps="$(.venv/bin/python -c "import sys; from detrq.cli import guarded; \
from detrq.artifact.notebooks import profile_steps, step_name; \
sys.exit(guarded(lambda: print('\n'.join(step_name(s) + '|' + ' '.join(s) for s in profile_steps('$params', \
'$profile')))))")"
  while IFS='|' read -r name line; do
    # shellcheck disable=SC2086
    timed "$name" .venv/bin/python -m detrq notebooks --params "$params" --profile "$profile" "$@" --only $line \
      $([ "${line#* }" != "$line" ] && echo --together)
  done <<< "$steps"
}

run_default() {
  parse_reuse "$@"
  local run=default
  [ "$PROFILE" = complete ] || run="$PROFILE"
  acquire_run_lock
  setup_venv
  ensure_data
  .venv/bin/python -m detrq run-start --run "$run" $REUSE
  # shellcheck disable=SC2046
  notebook_steps params/default.yaml "$PROFILE" $(in_run "$run")
  if [ "$PROFILE" = complete ]; then
    step "uniform quantization curve (float, W8..W3)" .venv/bin/python -m detrq curve --quiet \
      --results-dir runs/default/results
  fi
  .venv/bin/python -m detrq report --run "$run" --profile "$PROFILE" --runtime "${TIMES[@]}"
}

run_int8() {
  parse_reuse "$@"
  acquire_run_lock
  setup_venv
  ensure_data
  .venv/bin/python -m detrq run-start --run int8 $REUSE
  # shellcheck disable=SC2046
  step "notebook 06 (INT8 Faster R-CNN)" .venv/bin/python -m detrq notebooks --params params/int8.yaml \
    $(in_run int8) --only 06_int8_faster_rcnn
  .venv/bin/python -m detrq report --run int8 --runtime "${TIMES[@]}"
}

run_accept() {
  [ $# -eq 0 ] || die_usage "accept takes no arguments"
  acquire_run_lock
  setup_venv
  .venv/bin/python -m detrq accept
  # The committed notebooks are re-rendered from the accepted results into the walkthrough's run directory,
  # filled afresh from them (every step is a cache hit), so that they show the values and outputs a reader gets
  # when opening them, and nbval re-executes them there; the committed results/ and figures/ are only read.
  rm -rf runs/walkthrough
  local walkthrough="--set results_dir=runs/walkthrough/results --set figures_dir=runs/walkthrough/figures"
  # shellcheck disable=SC2086
  step "re-render notebooks 01-05 and 07 from the accepted results" .venv/bin/python -m detrq notebooks \
    --params params/default.yaml $walkthrough
  if ls results/int8/int8_*.json >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    step "re-render notebook 06 from the accepted results" .venv/bin/python -m detrq notebooks \
      --params params/int8.yaml $walkthrough --only 06_int8_faster_rcnn
  fi
  echo "== accepted; review with git status / git diff, then commit"
}

run_full() {
  local coco="" checkpoint="" device="cuda" nproc=1 profile=complete
  while [ $# -gt 0 ]; do
    case "$1" in
      --profile) [ $# -ge 2 ] || die_usage "--profile needs paper or complete"; profile="$2"; shift 2 ;;
      --nproc) [ $# -ge 2 ] || die_usage "--nproc needs a number of processes"; nproc="$2"; shift 2 ;;
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
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die_usage "--nproc must be a whole number >= 1, got '$nproc'"
  check_profile "$profile"
  acquire_run_lock
  setup_venv
  # Absolute paths: the notebooks resolve relative ones against the repository root, not this shell's cwd.
  local paths=(--set "coco_root=$(cd "$coco" && pwd)"
    --set "checkpoint=$(cd "$(dirname "$checkpoint")" && pwd)/$(basename "$checkpoint")" --set "device=$device"
    --set "nproc=$nproc")
  # shellcheck disable=SC2046
  notebook_steps params/full.yaml "$profile" "${paths[@]}" $(in_run full)
  echo "== results in runs/full/results, figures in runs/full/figures, executed notebooks in runs/full/notebooks"
}

run_tests() {
  setup_venv
  ensure_data  # the notebooks that nbval re-executes read the synthetic set
  step "pytest" .venv/bin/python -m pytest -q "$@"
  # nbval re-executes the committed notebooks with their recorded parameters; the cached results make it quick.
  step "nbval" .venv/bin/python -m pytest -q --nbval-lax --nbval-current-env notebooks/
}

case "${1:-}" in
  ""|--reuse|--profile) run_default "$@" ;;
  int8) shift; run_int8 "$@" ;;
  accept) shift; run_accept "$@" ;;
  full) shift; run_full "$@" ;;
  test) shift; run_tests "$@" ;;
  -h|--help|help) usage ;;
  *) die_usage "unknown argument '$1'" ;;
esac
