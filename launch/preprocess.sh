#!/usr/bin/env bash
# Tokenize a PG19-layout corpus into WebDataset shards: tokenizer.model + <split>/shard-*.tar + <split>/manifest.json.
#
#   launch/preprocess.sh [options]                         pg19-mini -> data/pg19-mini, 1,024 pieces: the data that
#                                                          configs/tiny_cpu.json (and `make quickstart`) read
#   launch/preprocess.sh INPUT OUTPUT [`prepare` options]  any corpus, `prepare`'s defaults (32,000 pieces)
#
# INPUT and OUTPUT may be fsspec URLs, e.g. the full PG19:
#   launch/preprocess.sh gs://deepmind-gutenberg gs://my-bucket/pg19   (needs gcsfs)
# Relative paths (INPUT, OUTPUT, $PYTHON) are the caller's: the script runs where it is called from, with the
# repository on PYTHONPATH. Python: $PYTHON, else the repository's .venv (made by `make`), else python3.
# Safe to re-run: finished work is kept, a killed run goes on where it stopped.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ $# -eq 0 || $1 == --* ]]; then  # options given after these replace them
  set -- "$repo/../shared/data/pg19-mini" "$repo/data/pg19-mini" --vocab-size 1024 --sample-mb 2 \
    --tokens-per-shard 1000000 "$@"
elif [[ $# -eq 1 || $2 == --* ]]; then
  echo "usage: launch/preprocess.sh [INPUT OUTPUT] [prepare options]" >&2
  exit 2
fi
venv="$repo/.venv/bin/python"
[[ -x "$venv" ]] || venv=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-$venv}" -m data_pipeline prepare --input "$1" --output "$2" "${@:3}"
