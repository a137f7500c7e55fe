#!/usr/bin/env bash
# Tokenize a PG19-layout corpus into WebDataset shards: tokenizer.model + <split>/shard-*.tar + <split>/manifest.json.
#
#   launch/preprocess.sh [INPUT] [OUTPUT] [more `prepare` options]
#
# INPUT defaults to pg19-mini (../shared/data/pg19-mini), OUTPUT to data/pg19-mini; both may be fsspec URLs,
# e.g. the full PG19:  launch/preprocess.sh gs://deepmind-gutenberg gs://my-bucket/pg19   (needs gcsfs)
# Safe to re-run: finished work is kept, a killed run goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
input=${1:-../shared/data/pg19-mini}
output=${2:-data/pg19-mini}
exec "${PYTHON:-.venv/bin/python}" -m data_pipeline prepare --input "$input" --output "$output" "${@:3}"
