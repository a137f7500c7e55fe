"""Evaluate checkpoints on the paper's benchmarks; one sub-command per table.

    python -m training.evaluate ppl       --checkpoint exports/200m --data data/pg19          # Table 1
    python -m training.evaluate passkey   --checkpoint exports/200m-passkey --data data/pg19  # Table 2
    python -m training.evaluate retrieval --checkpoint exports/200m --passages squad.jsonl    # Table 3
    python -m training.evaluate fidelity  --checkpoint exports/memmamba --checkpoint exports/mamba --data data/pg19
    python -m training.evaluate latency   --model memmamba:200m --model transformer:200m     # Sec. 5.2

--checkpoint takes an exported folder, a training checkpoint or a folder of checkpoints
(MemMamba, Mamba with notes off, or the Transformer), and can be repeated to put several
models in one table. Results go to --out (default runs/eval/<task>): <task>.json, <task>.md
and, when matplotlib is installed, <task>.png. An interrupted evaluation keeps what it finished
in <task>.partial.json, and the same command run again goes on from there. Problems end the
command with a one-line message and exit status 1 (a malformed command line: argparse's usage
message and status 2).
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.storage import outermost_new_folder
from model import ConfigError
from training.checkpoint import CheckpointError
from training.evaluation import fidelity, latency, passkey, perplexity, report, retrieval
from training.evaluation.common import (DTYPES, EvalError, hardware, load_checkpoint, log, pick_device,
                                        random_model, unique_names)

TASKS = {module.NAME: module for module in (perplexity, passkey, retrieval, fidelity, latency)}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A task's docstring as written, and the default of every option that has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0],
                                     epilog="`python -m training.evaluate <task> --help` describes a task.")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="task")
    for name, module in TASKS.items():
        command = tasks.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=HelpFormatter)
        command.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                             help="exported model, training checkpoint or folder of checkpoints (repeatable)")
        command.add_argument("--tokenizer", help="tokenizer.model, if not next to the checkpoint")
        command.add_argument("--out", help=f"results folder (default runs/eval/{name})")
        command.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        command.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the weights")
        command.add_argument("--chunk-len", type=int, default=4096,
                             help="tokens per chunk of the state-carrying forward (bounds activation memory)")
        command.add_argument("--skip-done", action="store_true",
                             help="do nothing if --out already holds the results of this command on the same "
                                  "weights (launch/eval.sh all: run again, it goes on at the task it stopped in)")
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # SIGTERM (a scheduler's time limit, `kill`, `timeout`) stops an evaluation as Ctrl-C does, with one line
    # and no empty results folder, where by default it ends the process without a word
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    created = partial = None
    try:
        if args.chunk_len < 1:
            raise EvalError(f"--chunk-len must be positive, got {args.chunk_len}")
        out = Path(args.out or f"runs/eval/{args.task}")
        report.check_out(out, args.task)
        args.device = pick_device(args.device)
        dtype = DTYPES[args.dtype]
        specs = getattr(args, "model", [])
        if not args.checkpoint and not specs:
            raise EvalError("give at least one --checkpoint" + (" or --model" if args.task == "latency" else ""))
        folders = [str(Path(path).resolve()) for path in args.checkpoint]
        for option, values in (("--checkpoint", folders), ("--model", specs)):
            repeated = next((value for value in values if values.count(value) > 1), None)
            if repeated is not None:   # results are keyed by model: the second would overwrite the first
                raise EvalError(f"{option} {repeated} is given twice")
        need_tokenizer = args.task != latency.NAME   # latency times random ids and never decodes them
        checkpoints = [load_checkpoint(path, args.device, dtype, args.tokenizer, name, need_tokenizer)
                       for path, name in zip(args.checkpoint, unique_names(args.checkpoint))]
        checkpoints += [random_model(spec, args.device, dtype) for spec in specs]
        work = TASKS[args.task].prepare(checkpoints, args)   # every model's inputs checked before any work
        try:
            # the outermost folder it makes: launch/eval.sh all makes runs/eval/<name>/<task> on a first run
            created = outermost_new_folder(out)
            out.mkdir(parents=True, exist_ok=True)   # only now: an error leaves no empty folder behind
        except OSError as error:
            raise EvalError(f"--out {out}: cannot be a results folder ({error.strerror})") from None
        # what identifies the results: every option but where they go, the weights, and what runs them
        identity = report.identity({"task": args.task, "models": [c.describe() for c in checkpoints], "options": {
            k: v for k, v in vars(args).items() if k not in ("out", "skip_done")}, "hardware": hardware(args.device)})
        if args.skip_done and report.made_by(out, args.task, identity):
            log(f"{out / args.task}.json holds the results of this command on these weights: nothing to do")
            return 0
        partial = report.PartialResults(out, args.task, identity)
        outcome = work(partial)
        written = report.write(out, args.task, argv, checkpoints, outcome, identity)
        partial.remove()
    except (EvalError, DataError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # Ctrl-C: the user knows where it stopped, a traceback adds nothing
        if partial is not None and partial.count():
            print(f"interrupted; what was finished is kept in {partial.path}, and the same command goes on "
                  "from there", file=sys.stderr)
        else:   # nothing to keep, and no empty folder left behind
            if created is not None and not any(path.is_file() for path in created.rglob("*")):
                shutil.rmtree(created)
            print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(outcome.markdown)
    log("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
