#!/usr/bin/env bash
# The README's quick start (`make quickstart`): tokenize pg19-mini with a small vocabulary, train the tiny
# MemMamba on the CPU for a short run, and say where the TensorBoard logs went.
#
#   bash launch/quickstart.sh [--set KEY=VALUE ...]     extra arguments go to the training run
#
# Environment: PYTHON (default .venv/bin/python), CORPUS (../shared/data/pg19-mini), DATA (data/pg19-mini),
# OUT (runs/quickstart). Relative paths, these and those given with --set, are taken from the repository root,
# wherever the script is called from.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/data/pg19-mini}
DATA=${DATA:-data/pg19-mini}
OUT=${OUT:-runs/quickstart}

bash launch/preprocess.sh "$CORPUS" "$DATA" --vocab-size 1024 --sample-mb 2 --tokens-per-shard 1000000 --quiet
bash launch/train.sh configs/tiny_cpu.json --set data.path="$DATA" output_dir="$OUT" train.max_steps=100 "$@"
echo "TensorBoard logs: $OUT/tensorboard  (view: $PYTHON -m tensorboard.main --logdir $OUT/tensorboard)"
