#!/usr/bin/env bash
""":"
# This file is both a bash script and a Python program:
#
#   bash launch/train.sh CONFIG [--set KEY=VALUE ...]    a person: starts the DeepSpeed launcher on this file
#   deepspeed launch/train.sh CONFIG [--set ...]          the launcher: runs `python -u launch/train.sh` per rank
#
# To bash, the quotes on line 2 are the no-op command ':', and the lines up to `exit` are the script (bash reads
# a script as it runs it, so it never reaches the Python). To Python, everything from those quotes to the
# matching ones below is a string, and the code after it is each rank's entry point.
# Launcher options go in DEEPSPEED_ARGS, e.g. DEEPSPEED_ARGS="--num_gpus 2" bash launch/train.sh CONFIG.
# Python: $PYTHON, else the repository's .venv (made by `make`), else python3.
set -euo pipefail
venv="$(dirname "$0")/../.venv/bin/python"
[[ -x "$venv" ]] || venv=python3
python=${PYTHON:-$venv}
# One rank already: of a launcher that runs this file as a program (--no_python), or one srun task of several
# (training/distributed.py reads the rank from Slurm then).
if [[ -n "${RANK:-}${LOCAL_RANK:-}" || ( -n "${SLURM_STEP_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ) ]]; then
  exec "$python" -u "$0" "$@"
fi
# The DeepSpeed launcher dies on SIGTERM and SIGUSR1 without passing them on, which would leave the ranks training.
# So it runs in a process group of its own (set -m) with both ignored (the ranks install their own handlers), and
# this script passes the signals it gets on to that whole group, then waits for the ranks' checkpoint.
trap '' TERM USR1
# A signal that comes before the ranks catch it (they take seconds to start) is written here too: they read it
# when they start catching (training/train.py).
export MEMMAMBA_STOP_FILE="${TMPDIR:-/tmp}/memmamba-stop.$$"
rm -f "$MEMMAMBA_STOP_FILE"   # one a killed script of the same process id left behind
trap 'rm -f "$MEMMAMBA_STOP_FILE"' EXIT
set -m
"$python" -m deepspeed.launcher.runner ${DEEPSPEED_ARGS:-} "$0" "$@" &
run=$!
# From here on the script passes signals on and waits: a command of `stop` that fails (no stop file can be written
# in TMPDIR, the run has just ended) must not end it, which would leave the ranks training without the signal.
set +m +e
# Every signal the script gets (SIGTERM, SIGUSR1, Ctrl-C, HUP) stops the run with a checkpoint: it goes on to the
# group as SIGUSR1, which the per-node launcher leaves ignored, where after a SIGTERM it would kill the ranks 30 s
# later, in the middle of a long step or save. The top launcher still gets a SIGTERM, which it ignores on one node
# and passes on to the other nodes' processes across nodes. A second Ctrl-C kills the run at once.
stopping=0
stop() {
  if [[ $stopping == 1 && $1 == INT ]]; then
    echo "launch/train.sh: SIGINT again: killing the run" >&2
    kill -s KILL -- -"$run"
  else
    stopping=1
    echo "launch/train.sh: SIG$1: the ranks checkpoint and stop (Ctrl-C again kills them)" >&2
    echo "SIG$1" > "$MEMMAMBA_STOP_FILE"
    kill -s USR1 -- -"$run"
    kill -s TERM "$run"
  fi
}
for signal in HUP INT TERM USR1; do trap "stop $signal" "$signal"; done
status=0
wait "$run" || status=$?
while kill -0 "$run" 2>/dev/null; do   # a signal's trap ends a wait early
  status=0
  wait "$run" || status=$?
done
exit $status
":"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `import training`

from training.train import main  # noqa: E402

sys.exit(main())
