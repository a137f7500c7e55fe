"""Memory fidelity (App. A.2): ETMF across tokens, ECLMF across layers.

ETMF_delta = mean over i of cos(t_i, t^_{i+delta}), with t_i = E[x_i] the embedding of
token i and t^_j = sum_v p_j(v) E[v] the embedding expected under the model's output
distribution at position j, p_j = softmax(logits_j / tau), tau = 1. delta = 0 is the
paper's self-reconstruction ETMF, delta in {8, 16, 32} its distance-sensitive variant.
The definition is followed as written: in a causal LM logits_j predicts token j + 1, so
ETMF measures how much of token j its output still carries.

ECLMF_G: h^(l) is the residual stream after layer l (l = 1..L) at every token of every
window; a ridge decoder W = (X'X + lambda I)^-1 X'Y (lambda = 1e-4) maps X = h^(l) to
Y = h^(l+G), and the score 1 - ||Y - XW||_F / (||X||_F + eps) (eq. 25, normalised by X as
written) is averaged over l = 1..L-G. The decoder is fitted on all tokens at once from
streamed sufficient statistics (X'X, X'Y, ||X||^2, ||Y||^2), so any number of windows
fits in memory; a gap of L or more layers has no pair and is reported as missing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.evaluation import validation_windows
from training.evaluation.common import EvalError, Progress
from training.evaluation.report import Outcome, PartialResults, table

NAME = "fidelity"
HELP = "ETMF and ECLMF memory fidelity (App. A.2)"
SLICE = 1024     # positions whose full-vocabulary distribution is alive at once


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="prepared shards; windows are spread over the split")
    parser.add_argument("--split", default="test", help="the split the windows come from")
    parser.add_argument("--length", type=int, default=2048, help="tokens per window")
    parser.add_argument("--windows", type=int, default=16, help="windows of --length tokens")
    parser.add_argument("--deltas", nargs="+", type=int, default=[0, 8, 16, 32], help="ETMF distances")
    parser.add_argument("--gaps", nargs="+", type=int, default=[2, 5, 10], help="ECLMF layer gaps")
    parser.add_argument("--ridge", type=float, default=1e-4, help="lambda of the ridge decoder")


def cosine_fidelity(t: Tensor, t_hat: Tensor, delta: int = 0) -> tuple[float, int]:
    """(sum over i of cos(t_i, t^_{i+delta}), number of terms) for t, t^ [..., T, D]."""
    T = t.shape[-2]
    if delta >= T:
        return 0.0, 0
    cos = F.cosine_similarity(t[..., :T - delta, :].double(), t_hat[..., delta:, :].double(), dim=-1)
    return float(cos.sum()), cos.numel()


def expected_embedding(model: nn.Module, hidden: Tensor, temperature: float = 1.0) -> Tensor:
    """t^ = softmax(lm_head(hidden) / temperature) @ E for hidden [B, T, D], in slices of positions."""
    E = model.embedding.weight
    pieces = [torch.softmax(model.lm_head(hidden[:, i:i + SLICE]).float() / temperature, -1) @ E.float()
              for i in range(0, hidden.shape[1], SLICE)]
    return torch.cat(pieces, 1)


def ridge_score(xtx: Tensor, xty: Tensor, xx: float, yy: float, ridge: float = 1e-4, eps: float = 1e-6) -> float:
    """1 - ||Y - XW||_F / (||X||_F + eps), W = (X'X + ridge I)^-1 X'Y, from the sufficient statistics."""
    W = torch.linalg.solve(xtx + ridge * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device), xty)
    residual = yy - 2 * float((W * xty).sum()) + float((W * (xtx @ W)).sum())
    return 1.0 - math.sqrt(max(residual, 0.0)) / (math.sqrt(xx) + eps)


def ridge_fidelity(x: Tensor, y: Tensor, ridge: float = 1e-4) -> float:
    """ECLMF's reconstruction score of Y [N, D] from X [N, D]."""
    x, y = x.double(), y.double()
    return ridge_score(x.T @ x, x.T @ y, float((x * x).sum()), float((y * y).sum()), ridge)


class CrossLayerStats:
    """X'X and ||X||^2 per layer, X'Y and ||Y||^2 per (layer, gap), streamed over tokens."""

    def __init__(self, n_layer: int, dim: int, gaps: list[int], device):
        # each gap once: a repeated one would add its X'Y twice against X'X once
        self.pairs = [(l, g) for g in dict.fromkeys(gaps) for l in range(n_layer - g)]   # 0-based layer indices
        zeros = lambda: torch.zeros(dim, dim, dtype=torch.float64, device=device)  # noqa: E731
        self.xtx = [zeros() for _ in range(n_layer)]
        self.xx = [0.0] * n_layer
        self.xty = {pair: zeros() for pair in self.pairs}

    def add(self, layers: list[Tensor]) -> None:
        """layers[l]: the residual stream after layer l, [B, T, D]."""
        flat = [h.flatten(0, 1).double() for h in layers]
        for l, x in enumerate(flat):
            self.xtx[l] += x.T @ x
            self.xx[l] += float((x * x).sum())
        for l, g in self.pairs:
            self.xty[l, g] += flat[l].T @ flat[l + g]

    def scores(self, gap: int, ridge: float) -> list[float]:
        """ECLMF of l -> l + gap for every layer l that has a partner."""
        return [ridge_score(self.xtx[l], self.xty[l, g], self.xx[l], self.xx[l + g], ridge)
                for l, g in self.pairs if g == gap]


@torch.no_grad()
def evaluate(checkpoint, windows: Tensor, args) -> dict:
    model = checkpoint.model
    n_layer = len(model.layers)
    stats = CrossLayerStats(n_layer, model.config.d_model, args.gaps, args.device)
    chunk_outputs: list[Tensor] = []
    hooks = [layer.register_forward_hook(lambda module, inputs, output: chunk_outputs.append(output[0]))
             for layer in model.layers]
    sums = {d: [0.0, 0] for d in args.deltas}
    progress = Progress(len(windows), f"fidelity {checkpoint.name}", "window")
    try:
        for window in windows:
            ids = window[None, :args.length].to(args.device)
            state, hidden = None, []
            for start in range(0, args.length, args.chunk_len):   # the chunked forward, layer outputs hooked
                chunk_outputs.clear()
                h, state = model.hidden_states(ids[:, start:start + args.chunk_len], state)
                hidden.append(h)
                stats.add(chunk_outputs)
            t = model.embedding(ids).float()
            t_hat = expected_embedding(model, torch.cat(hidden, 1))
            for d in args.deltas:
                total, count = cosine_fidelity(t, t_hat, d)
                sums[d][0] += total
                sums[d][1] += count
            progress.update(1)
    finally:
        for hook in hooks:
            hook.remove()
        progress.close()
    eclmf_layers = {g: stats.scores(g, args.ridge) for g in args.gaps}
    return {"etmf": {str(d): s / n if n else None for d, (s, n) in sums.items()},
            "eclmf": {str(g): sum(v) / len(v) if v else None for g, v in eclmf_layers.items()},
            "eclmf_per_layer": {str(g): v for g, v in eclmf_layers.items()},
            "windows": len(windows), "tokens": len(windows) * args.length}


def prepare(checkpoints, args):
    """Check the settings and every model's windows; returns the evaluation to run."""
    if args.length < 1 or args.windows < 1 or min(args.gaps) < 1 or min(args.deltas) < 0:
        raise EvalError("--length, --windows and --gaps must be positive, --deltas non-negative")
    if not 0 <= args.ridge < math.inf:   # a negative lambda gives scores that mean nothing, not an error
        raise EvalError(f"--ridge must be zero or positive, got {args.ridge:g}")
    args.gaps, args.deltas = list(dict.fromkeys(args.gaps)), list(dict.fromkeys(args.deltas))   # one column each
    windows = {c.name: validation_windows(args.data, args.split, args.length, args.windows, c.tokenizer.checksum)
               for c in checkpoints}
    return lambda partial: run(checkpoints, windows, args, partial)


def run(checkpoints, windows: dict, args, partial: PartialResults) -> Outcome:
    results = partial.per_model(checkpoints, lambda c: evaluate(c, windows[c.name], args))
    header = ["model"] + [f"ETMF_{d}" if d else "ETMF" for d in args.deltas] + [f"ECLMF_{g}" for g in args.gaps]
    rows = [[name, *(r["etmf"][str(d)] for d in args.deltas), *(r["eclmf"][str(g)] for g in args.gaps)]
            for name, r in results.items()]
    count = next(iter(results.values()))["windows"]
    markdown = (f"Over {count} windows of {args.length} tokens of {args.split}; ETMF_d compares token i "
                f"with the expected output embedding at i + d; ECLMF_g decodes layer l + g from layer l "
                f"(ridge {args.ridge:g}); '-' marks a gap the model has too few layers for.\n\n"
                + table(header, rows))
    plot = {"title": "Token memory fidelity", "xlabel": "distance (tokens)", "ylabel": "ETMF",
            "series": {name: (args.deltas, [r["etmf"][str(d)] for d in args.deltas]) for name, r in results.items()}}
    settings = {"data": str(args.data), "split": args.split, "length": args.length, "windows": args.windows,
                "deltas": args.deltas, "gaps": args.gaps, "ridge": args.ridge, "chunk_len": args.chunk_len,
                "temperature": 1.0}
    return Outcome(settings, results, markdown, plot)
