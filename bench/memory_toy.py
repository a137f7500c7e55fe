"""The paper's central claim at toy scale, on a CPU: does MemMamba keep retrieving a passkey
far beyond its training length where a plain Mamba of the same size forgets?

Task: random filler tokens (44 symbols), somewhere in them a key marker followed by a key
token (one of 16 other symbols), and at the end a query marker, after which the model must
produce the key (chance: 1/16). Both models are trained at --train-len tokens with the same
seed, data, steps and optimizer, the loss on the key only, the key's distance from the query
growing over the first half of training (a curriculum). They are evaluated by exact match
(the key is the argmax: greedy decoding) at 1x, 4x, 16x and 64x the training length, with
the key at depths evenly spread over the input; the long inputs run chunk by chunk through
the model's state-carrying forward.

For MemMamba it also records whether the key's note is still in each layer's pool when the
query arrives, and the fraction of tokens whose importance passes the note threshold tau1:
the two things that decide whether notes can carry the key across distance.

    python bench/memory_toy.py                      # 8 to 13 minutes on 2 shared cores
    python bench/memory_toy.py --memmamba pool_policy=priority --out runs/toy-priority
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import build_model  # noqa: E402
from training.loss import lm_loss  # noqa: E402
from training.tasks import place_needle  # noqa: E402

VOCAB = 64
KEY_MARK, QUERY_MARK = 1, 2
KEYS = (4, 20)              # key tokens 4..19, filler tokens 20..63
KEY_LEN = 1
EMPTY = np.zeros(0, dtype=np.int64)
# The tiny size, narrowed and made shallower so that a thousand training steps fit in minutes on a
# CPU; its memory (pool of K = 8 notes of W = 16-token windows, tau1 = tau2 = 0.5) is tiny's own.
TOY_MEMMAMBA = {"arch": "memmamba", "size": "tiny", "vocab_size": VOCAB, "d_model": 32, "n_layer": 2,
                "d_state": 4, "summary_dim": 16, "attn_dim": 32}


def make_batch(rng: np.random.Generator, depths, prompt_len: int):
    """windows [B, prompt_len + KEY_LEN] (prompt then key), and the index of each key's first token."""
    windows, positions = [], []
    for depth in depths:
        key = rng.integers(*KEYS, KEY_LEN)
        filler = rng.integers(KEYS[1], VOCAB, prompt_len - KEY_LEN - 2)
        ids, position = place_needle(EMPTY, filler, np.concatenate([[KEY_MARK], key]), np.array([QUERY_MARK]), depth)
        windows.append(np.concatenate([ids, key]))
        positions.append(position + 1)
    return torch.from_numpy(np.stack(windows)), positions


def answer_mask(batch: int, window_len: int) -> torch.Tensor:
    mask = torch.zeros(batch, window_len - 1, dtype=torch.bool)
    mask[:, -KEY_LEN:] = True
    return mask


def reach(step: int, steps: int) -> float:
    """Curriculum: the farthest depth from the query, a fraction of the window that grows from
    0.1 to 1 over the first half of training (a short copy is learnt first, then stretched)."""
    return min(1.0, 0.1 + 0.9 * step / (steps / 2))


def train(model, args, log) -> dict:
    rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    start, recent = time.time(), []
    for step in range(1, args.steps + 1):
        windows, _ = make_batch(rng, 1 - reach(step, args.steps) * rng.random(args.batch), args.train_len)
        mask = answer_mask(args.batch, windows.shape[1])
        for group in optimizer.param_groups:   # linear warm-up over the first 5% of steps
            group["lr"] = args.lr * min(1.0, step / max(1, args.steps // 20))
        loss = lm_loss(model, windows, None, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            log(f"step {step}/{args.steps}  loss {np.mean(recent):.3f}  {time.time() - start:.0f}s")
            recent = []
    return {"steps": args.steps, "train_seconds": round(time.time() - start, 1)}


@torch.no_grad()
def evaluate(model, length: int, samples: int, batch: int, chunk_len: int, seed: int) -> dict:
    """Exact-match accuracy at `length` tokens, depths evenly spread over [0, 1]."""
    model.eval()
    rng = np.random.default_rng([seed, length])
    depths = np.linspace(0, 1, samples)
    correct, in_pool, kept = 0, [], []
    for first in range(0, samples, batch):
        windows, positions = make_batch(rng, depths[first:first + batch], length)
        inputs, answers = windows[:, :-1], windows[:, -KEY_LEN:]
        T = inputs.shape[1]
        logits, state = model.prefill(inputs, chunk_len=chunk_len,
                                      keep_logits=lambda s, e: slice(max(T - KEY_LEN - s, 0), e - s))
        correct += int((logits.argmax(-1) == answers).all(-1).sum())
        if getattr(model.config, "notes", False):
            in_pool.append(key_note_in_pool(model, state, positions))
            kept.append(kept_fraction(model, inputs[:, :min(T, 4096)]))
    result = {"length": length, "samples": samples, "accuracy": correct / samples}
    if in_pool:
        in_pool = np.concatenate(in_pool)
        result["key_note_in_pool_per_layer"] = in_pool.mean(0).round(3).tolist()
        result["key_note_in_some_pool"] = round(float(in_pool.any(1).mean()), 3)
        result["tokens_above_tau1_per_layer"] = np.mean(kept, 0).round(5).tolist()
    return result


def key_note_in_pool(model, state, positions) -> np.ndarray:
    """[B, n_layer]: whether the note of the key's window is in each layer's pool."""
    W = model.config.note_window
    key_window = torch.tensor([p // W for p in positions])[:, None]
    return np.stack([(layer.notes.window == key_window).any(1).numpy() for layer in state.layers], 1)


def kept_fraction(model, inputs) -> list[float]:
    """Per layer, the fraction of tokens whose I_token passes tau1 (all but one are filler)."""
    fractions = []

    def record(module, args, output):
        importance = args[0]
        fractions.append(float((importance > module.tau1).float().mean()))

    hooks = [layer.notes.register_forward_hook(record) for layer in model.layers]
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return fractions


def parse_overrides(items) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:   # a bare word such as priority
            overrides[key] = value
    return overrides


def count_params(spec: dict) -> int:
    return sum(p.numel() for p in build_model(spec).parameters())


def matched_mamba(memmamba: dict) -> dict:
    """The plain Mamba (notes off, same depth) whose width gives the parameter count closest to MemMamba's."""
    target = count_params(memmamba)
    base = {**memmamba, "notes": False}
    widths = range(memmamba.get("d_model", 64), 4 * memmamba.get("d_model", 64))
    best = min(widths, key=lambda d: abs(count_params({**base, "d_model": d}) - target))
    return {**base, "d_model": best}


def run(name: str, spec: dict, args) -> dict:
    """Train one model and evaluate it at every length (one process, one thread)."""
    torch.set_num_threads(args.threads)

    def log(message):
        print(f"[memory_toy] {name} {message}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    model = build_model(spec)
    result = {"config": spec, "params": sum(p.numel() for p in model.parameters())}
    log(f"{result['params']:,} parameters, training {args.steps} steps of {args.batch} x {args.train_len} tokens")
    result.update(train(model, args, log))
    result["eval"] = []
    for multiple in args.multiples:
        start = time.time()
        entry = evaluate(model, multiple * args.train_len, args.eval_samples, args.eval_batch, args.chunk_len,
                         args.seed + 1)
        entry["seconds"] = round(time.time() - start, 1)
        result["eval"].append(entry)
        log(f"{multiple}x: {json.dumps(entry)}")
    return result


def markdown(results: dict, args) -> str:
    multiples = args.multiples
    head = "| model | params | " + " | ".join(f"{m}x ({m * args.train_len})" for m in multiples) + " |"
    lines = [head, "|" + "---|" * (len(multiples) + 2)]
    for name, r in results.items():
        accs = " | ".join(f"{e['accuracy']:.2f}" for e in r["eval"])
        lines.append(f"| {name} | {r['params']:,} | {accs} |")
    if "memmamba" in results:
        lines += ["", "| MemMamba at | accuracy | key's note in a pool | in each layer's pool | tokens above tau1 |",
                  "|---|---|---|---|---|"]
        for e in results["memmamba"]["eval"]:
            per_layer = " / ".join(f"{x:.2f}" for x in e["key_note_in_pool_per_layer"])
            kept = " / ".join(f"{x:.2%}" for x in e["tokens_above_tau1_per_layer"])
            lines.append(f"| {e['length']} | {e['accuracy']:.2f} | {e['key_note_in_some_pool']:.2f} | {per_layer} "
                         f"| {kept} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--chunk-len", type=int, default=2048)
    parser.add_argument("--memmamba", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the toy MemMamba config, e.g. pool_policy=priority note_window=32; "
                             "the Mamba is matched to it")
    parser.add_argument("--models", nargs="+", choices=["memmamba", "mamba"], default=["memmamba", "mamba"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model; the models train side by side, one process each")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default="runs/memory_toy")
    args = parser.parse_args(argv)

    memmamba = {**TOY_MEMMAMBA, **parse_overrides(args.memmamba)}
    specs = {"memmamba": memmamba, "mamba": matched_mamba(memmamba)}
    load_start = os.getloadavg()[0]
    print(f"[memory_toy] {os.cpu_count()} cores, load average {load_start:.1f} at start", file=sys.stderr)
    started = time.time()
    with ProcessPoolExecutor(len(args.models), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(run, name, specs[name], args) for name in args.models}
        results = {name: future.result() for name, future in futures.items()}
    table = markdown(results, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "wall_seconds": round(time.time() - started, 1),
              "load_average": {"start": load_start, "end": os.getloadavg()[0]}, "results": results}
    (out / "memory_toy.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "memory_toy.md").write_text(table + "\n")
    print(table)
    print(f"[memory_toy] done in {record['wall_seconds'] / 60:.1f} min; {out}/memory_toy.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
