"""What rank 0 reports: a console line and TensorBoard scalars every `logging.every` steps, and a progress bar.

Scalars (TensorBoard tag, console name):
    train/loss, train/ppl         mean over the steps since the last line (all ranks)
    train/lr, train/grad_norm     at the last step (grad_norm before clipping; inf or NaN on a skipped step)
    train/skipped_steps           steps skipped so far for a non-finite loss or gradient
    train/tokens_seen
    perf/tps, perf/tps_total      tokens per second per device, and over all devices, in the steps' own time
                                  (validation and checkpoint saves between them do not count)
    perf/tflops, perf/mfu         model TFLOP/s per device (training/flops.py) and its share of the peak, in %
    perf/memory_gib               peak memory of the device since the last line (the process's peak RSS on the CPU)
    perf/data_wait_s              seconds per step spent waiting for batches
    val/loss, val/ppl
"""
from __future__ import annotations

import math
import os
import resource
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from training import flops


class Metrics:
    def __init__(self, enabled: bool, tensorboard_dir: Path, every: int, progress_bar: bool, start_step: int,
                 max_steps: int, tokens_per_step: int, world_size: int, flops_per_token: float,
                 peak_flops: float | None, device: torch.device):
        self.enabled, self.every, self.device = enabled, every, device
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.writer = self.bar = None
        if enabled:
            # purge_step: TensorBoard hides what an interrupted earlier run logged after the resumed step.
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1)
            if progress_bar and sys.stderr.isatty():
                # Some terminals report a size of 0 columns or 0 rows (`script` without a terminal of its own, say:
                # 0 x 0), in which tqdm would draw nothing: give those 80 x 24.
                size = os.get_terminal_size(sys.stderr.fileno())
                known = size.columns > 0 and size.lines > 0
                self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=known,
                                ncols=None if known else 80, nrows=None if known else 24)
        self._reset()

    def _reset(self) -> None:
        self.losses, self.data_wait, self.seconds = [], 0.0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def step(self, loss: float, data_wait: float, seconds: float) -> None:
        self.losses.append(loss)
        self.data_wait += data_wait
        self.seconds += seconds
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def log(self, step: int, max_steps: int, lr: float, grad_norm: float, skipped: int, tokens_seen: int) -> None:
        """Report the steps since the last call; every rank calls it, rank 0 writes."""
        steps = len(self.losses)
        tps_total = self.tokens_per_step * steps / self.seconds
        tps = tps_total / self.world_size
        loss = sum(self.losses) / steps
        scalars = {
            "train/loss": loss, "train/ppl": _ppl(loss), "train/lr": lr, "train/grad_norm": grad_norm,
            "train/skipped_steps": skipped, "train/tokens_seen": tokens_seen,
            "perf/tps": tps, "perf/tps_total": tps_total, "perf/tflops": tps * self.flops_per_token / 1e12,
            "perf/memory_gib": _peak_memory(self.device) / 2 ** 30, "perf/data_wait_s": self.data_wait / steps,
        }
        if self.peak_flops:
            scalars["perf/mfu"] = 100 * flops.mfu(tps, self.flops_per_token, self.peak_flops)
        self._reset()
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        mfu = f" | mfu {scalars['perf/mfu']:.1f}%" if "perf/mfu" in scalars else ""
        self.print(f"step {step}/{max_steps} | loss {loss:.4f} | ppl {scalars['train/ppl']:.2f} | lr {lr:.2e} | "
                   f"grad_norm {grad_norm:.3f} | tps {tps:,.0f} ({tps_total:,.0f} total) | "
                   f"tflops {scalars['perf/tflops']:.2f}{mfu} | mem {scalars['perf/memory_gib']:.2f} GiB | "
                   f"data_wait {scalars['perf/data_wait_s']:.3f} s | skipped {skipped}")

    def validation(self, step: int, loss: float) -> None:
        if self.enabled:
            self.writer.add_scalar("val/loss", loss, step)
            self.writer.add_scalar("val/ppl", _ppl(loss), step)
            self.print(f"step {step} | validation loss {loss:.4f} | ppl {_ppl(loss):.2f}")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _ppl(loss: float) -> float:
    """exp(loss): inf past the largest float (a diverged run, or a loss of inf), NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
