#!/usr/bin/env bash
# The paper's evaluations (python -m training.evaluate), one task or all of them on one checkpoint.
#
#   launch/eval.sh TASK [options]                  ppl | passkey | retrieval | fidelity | latency  (TASK --help)
#   launch/eval.sh all CHECKPOINT [DATA] [OUT]     ppl, passkey, retrieval and fidelity, paper settings
#
# Paths are relative to the repository root. DATA defaults to data/pg19-mini (the --output of
# launch/preprocess.sh), OUT to runs/eval/<name>, where <name> is the run's for its checkpoints folder
# (runs/x/checkpoints: x) and the folder's own otherwise; each task writes OUT/<task>/<task>.{json,md}.
# Latency needs no data: launch/eval.sh latency --model memmamba:200m --model transformer:200m
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "all" ]]; then
  checkpoint=${2:?usage: launch/eval.sh all CHECKPOINT [DATA] [OUT]}
  data=${3:-data/pg19-mini}
  name=$(basename "$checkpoint")
  [[ $name == checkpoints ]] && name=$(basename "$(dirname "$checkpoint")")
  out=${4:-runs/eval/$name}
  for task in ppl passkey retrieval fidelity; do
    "$python" -m training.evaluate "$task" --checkpoint "$checkpoint" --data "$data" --out "$out/$task"
  done
  exit 0
fi
exec "$python" -m training.evaluate "$@"
