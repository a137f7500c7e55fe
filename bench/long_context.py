"""One training step on long sequences: unchunked vs chunked vs sequence-parallel.

Peak memory and time per token of forward+backward at 8k, 32k and 128k tokens, batch 1,
for the tiny and a mid-size MemMamba: unchunked, chunked (train.chunk_len = 4096, state
carried, activations checkpointed per chunk) and sequence-parallel over 2 processes.
Targets: chunked peak activation memory stays within 1.5x that of one chunk (the
unchunked 4k step) as the sequence grows; chunked time per token within 1.3x of unchunked.

    python bench/long_context.py [--sizes tiny mid] [--lengths 8192 32768 131072]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time

from harness import _rss_mb, machine, measure
from model_scaling import MODELS

CHUNK = 4096


def train_step(section: dict, T: int, chunk_len: int | None):
    import torch
    from model import build_model
    from training.loss import lm_loss
    torch.manual_seed(0)
    model = build_model(section)
    window = torch.randint(0, model.config.vocab_size, (1, T + 1))

    def step():
        lm_loss(model, window, chunk_len=chunk_len).backward()
        model.zero_grad(set_to_none=True)
    return step


def _sp_rank(rank: int, world: int, rendezvous: str, section: dict, T: int, queue) -> None:
    import torch
    import torch.distributed as dist
    from model import build_model
    from model.sequence_parallel import SequenceParallel
    from training.loss import lm_loss
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    torch.manual_seed(0)
    model = build_model(section)
    window = torch.randint(0, model.config.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(0))
    sp = SequenceParallel()
    base_mb = _rss_mb()
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        lm_loss(model, window, sp=sp).backward()
        model.zero_grad(set_to_none=True)
        dist.barrier()
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base_mb))
    dist.destroy_process_group()


def measure_sp(section: dict, T: int, world: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_sp_rank, args=(r, world, f"{tmp}/rendezvous", section, T, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            return {"error": "a rank failed (out of memory?)"}
    results = [queue.get() for _ in range(world)]
    return {"seconds": max(r[0] for r in results), "peak_mb": max(r[1] for r in results),
            "base_mb": max(r[2] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--modes", nargs="+", default=["unchunked", "chunked", "sp2"],
                        choices=["unchunked", "chunked", "sp2"])
    args = parser.parse_args()
    print(f"# long_context on {machine()}\n")
    for size in args.sizes:
        section = MODELS[size]["MemMamba"]
        one_chunk = measure(train_step, section=section, T=CHUNK, chunk_len=None)
        chunk_mb = one_chunk["peak_mb"] - one_chunk["base_mb"]
        print(f"## {size} MemMamba (batch 1, forward+backward; activations of one {CHUNK}-token "
              f"chunk: {chunk_mb:.0f} MB)\n")
        print("| T | mode | seconds | us/token | process peak MB | activation MB | activations / one chunk |")
        print("|---|---|---|---|---|---|---|")
        for T in args.lengths:
            for mode in args.modes:
                if mode == "sp2":
                    r = measure_sp(section, T)
                else:
                    r = measure(train_step, section=section, T=T, chunk_len=CHUNK if mode == "chunked" else None)
                if "error" in r:
                    print(f"| {T} | {mode} | {r['error']} | | | | |", flush=True)
                    continue
                activation_mb = r["peak_mb"] - r["base_mb"]
                print(f"| {T} | {mode} | {r['seconds']:.2f} | {r['seconds'] / T * 1e6:.0f} | {r['peak_mb']:.0f} | "
                      f"{activation_mb:.0f} | {activation_mb / chunk_mb:.2f} |", flush=True)
        print()


if __name__ == "__main__":
    main()
