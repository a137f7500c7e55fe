"""What a training step launches outside the model: DeepSpeed's backward and optimizer step, counted per phase.

    python bench/step_overhead.py --data data/pg19-mini --set model.vocab_size=1024

The stack is set up by `training.train.setup` on one rank (the config plus `--set`, no accumulation), and one
step after a warm-up runs under a dispatch mode that counts the ATen operations each phase launches and the
bytes they write: the engine's forward, `engine.backward` (the model's backward, then DeepSpeed's gradient
reduction) and `engine.step()` (clipping and AdamW). On a GPU each operation is a kernel the host launches, and
what the step launches after the backward is host time the GPU waits for at the end of every step. The model's
own operations are `bench/op_count.py`'s subject; here they are the same in every variant.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.op_count import OperationCount  # noqa: E402
from data_pipeline import DataError  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.train import setup, train_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "200m_8k.json"))
    parser.add_argument("--data", required=True, help="a prepared data folder whose tokenizer fits the config")
    parser.add_argument("--seq-len", type=int, default=64, help="short: the step's overhead does not depend on it")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as held:
        try:
            run = setup(args.config, [f"data.path={args.data}", f"data.seq_len={args.seq_len}", "data.num_workers=0",
                                      "train.micro_batch_size=1", "train.grad_accum=1", "train.global_batch_size=null",
                                      "validation.windows=1", "logging.progress_bar=false", "checkpoint.resume=never",
                                      f"output_dir={tmp}", *args.overrides], stop_signal=[], held=held)
        except (ConfigError, DataError) as error:   # a missing config or data folder, a mistyped --set
            print(f"error: {error}", file=sys.stderr)
            return 1
        train_step(run)   # warm-up: the optimizer's state is allocated in its first step
        engine, (window, loss_mask) = run.engine, next(run.batches)
        with OperationCount() as ops:
            loss = engine(window, loss_mask, run.sp)
            ops.phase = "backward"
            engine.backward(loss)
            ops.phase = "step"
            engine.step()
        run.close()

    n_tensors = sum(1 for _ in engine.module.parameters())
    print(f"{Path(args.config).name} --set {' '.join(args.overrides)}: ZeRO stage {run.cfg.zero_stage}, "
          f"{n_tensors} parameter tensors, {sum(p.numel() for p in engine.module.parameters()) / 1e6:.1f} M parameters")
    print("| phase | operations | MB written | host reads (syncs) |")
    print("| --- | ---: | ---: | ---: |")
    for phase in ("forward", "backward", "step"):
        print(f"| {phase} | {ops.count[phase]} | {ops.bytes[phase] / 2**20:.0f} | {ops.syncs[phase]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
