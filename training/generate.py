"""Generate text from a checkpoint, printed as it is produced.

    python -m training.generate --checkpoint exports/200m --prompt "It was a dark and stormy night"
    echo "Once upon a time" | python -m training.generate --checkpoint exports/200m --prompt-file -

The prompt is prefilled chunk by chunk, then every new token is one `step` of the model:
constant time and memory per token for MemMamba (the Transformer's KV cache grows).
An empty prompt starts a new document (after an end-of-sequence token). Generation stops
at --max-new-tokens or at the end-of-sequence token.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import EOS_ID
from model import ConfigError
from training.checkpoint import CheckpointError
from training.evaluate import HelpFormatter
from training.evaluation.common import DTYPES, EvalError, load_checkpoint, pick_device

CONTEXT_TOKENS = 8   # printed tokens kept to decode the next one with its neighbours' spacing
MAX_CHAR_BYTES = 4   # of the longest UTF-8 character


class TextStream:
    """Text of tokens as they come: what a token adds is decode(context + token) minus
    decode(context). Bytes of a character split over several byte-fallback tokens wait
    until the character is complete; as many as the longest character has, and still no
    character, they never will be one, and are printed as invalid (U+FFFD)."""

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer, self.context, self.pending = tokenizer, context[-CONTEXT_TOKENS:], []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.context + self.pending)
        if text.endswith("\ufffd") and len(self.pending) < MAX_CHAR_BYTES:
            return ""
        new = text[len(self.tokenizer.decode(self.context)):]
        self.context = (self.context + self.pending)[-CONTEXT_TOKENS:]
        self.pending = []
        return new


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="exported model, training checkpoint or folder of them")
    parser.add_argument("--tokenizer", help="tokenizer.model, if not next to the checkpoint")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="the text to continue (default: a new document)")
    prompt.add_argument("--prompt-file", help="read the prompt from a file, - for stdin")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="of the sampling softmax (0: greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument("--seed", type=int, default=0, help="of the sampling")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the weights")
    parser.add_argument("--chunk-len", type=int, default=4096, help="tokens per chunk of the prompt's prefill")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # `not 0 <= t < inf` also refuses nan, which would stop the sampling with a traceback
        if args.max_new_tokens < 1 or args.chunk_len < 1 or not 0 <= args.temperature < math.inf or args.top_k < 0:
            raise EvalError("--max-new-tokens and --chunk-len must be positive, --temperature (finite) and --top-k "
                            ">= 0")
        device = pick_device(args.device)
        checkpoint = load_checkpoint(args.checkpoint, device, DTYPES[args.dtype], args.tokenizer)
        # As bytes, decoded here: Python reads stdin and the command line with undecodable bytes turned into
        # surrogates, which the tokenizer cannot take.
        if args.prompt_file == "-":
            source, raw = "stdin", sys.stdin.buffer.read()
        elif args.prompt_file:
            source, raw = args.prompt_file, Path(args.prompt_file).read_bytes()
        else:
            source, raw = "--prompt", os.fsencode(args.prompt)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise EvalError(f"{source}: not UTF-8 text (byte {error.start})") from None
    except (EvalError, DataError, CheckpointError, ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # while the model loads
        print("interrupted", file=sys.stderr)
        return 130
    tokenizer, model = checkpoint.tokenizer, checkpoint.model
    prompt = tokenizer.encode(text) or [EOS_ID]
    ids = torch.tensor([prompt], device=device)
    stream = TextStream(tokenizer, prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start, count, status = time.perf_counter(), 0, 0
    try:
        for token in model.stream(ids, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k or None, greedy=args.greedy, chunk_len=args.chunk_len,
                                  generator=generator, vocab_size=tokenizer.vocab_size):
            token = int(token[0])
            if token == EOS_ID:
                break
            count += 1
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
    except KeyboardInterrupt:   # Ctrl-C: the text so far is the answer
        status = 130
    except BrokenPipeError:   # the reader has all it wants (`| head`)
        # The rest goes nowhere, so that neither the newline below nor Python's flush at exit fails again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    seconds = time.perf_counter() - start
    print()
    print(f"[generate] {len(prompt)} prompt tokens, {count} new tokens in {seconds:.1f} s"
          + (", interrupted" if status else ""), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
