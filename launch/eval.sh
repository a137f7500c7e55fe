#!/usr/bin/env bash
# The paper's evaluations (python -m training.evaluate), one task or all of them on one checkpoint.
#
#   launch/eval.sh TASK [options]                  ppl | passkey | retrieval | fidelity | latency  (TASK --help)
#   launch/eval.sh all CHECKPOINT [DATA] [OUT]     ppl, passkey, retrieval and fidelity, paper settings
#
# Paths are relative to the repository root. Python: $PYTHON, else the repository's .venv (made by `make`), else
# python3. DATA defaults to data/pg19-mini (the --output of
# launch/preprocess.sh), OUT to runs/eval/<name>, where <name> is the run's for its checkpoints folder
# (runs/x/checkpoints: x), the run's and the step's for one checkpoint (runs/x/checkpoints/step-00001000:
# x/step-00001000, as training.evaluate names its row) and the folder's own otherwise; each task writes
# OUT/<task>/<task>.{json,md}. Run again after an interruption (a scheduler's time limit), `all` skips the
# tasks whose results it holds for the same weights and goes on inside the one that was stopped.
# Latency needs no data: launch/eval.sh latency --model memmamba:200m --model transformer:200m
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv/bin/python
[[ -x $venv ]] || venv=python3
python=${PYTHON:-$venv}
if [[ "${1:-}" == "all" ]]; then
  usage="usage: launch/eval.sh all CHECKPOINT [DATA] [OUT]"
  if (( $# < 2 || $# > 4 )); then echo "$usage" >&2; exit 2; fi
  checkpoint=$2
  data=${3:-data/pg19-mini}
  name=$(basename "$checkpoint")
  [[ $name == checkpoints ]] && name=$(basename "$(dirname "$checkpoint")")
  # two runs' step-00001000 must not share a folder
  [[ $name == step-* ]] && name=$(basename "$(dirname "$(dirname "$checkpoint")")")/$name
  out=${4:-runs/eval/$name}
  for task in ppl passkey retrieval fidelity; do
    "$python" -m training.evaluate "$task" --checkpoint "$checkpoint" --data "$data" --out "$out/$task" --skip-done
  done
  exit 0
fi
exec "$python" -m training.evaluate "$@"
