"""What one training step asks of a GPU, per layer: kernels launched and bytes written, MemMamba against Mamba.

    python bench/op_count.py                                   # the 200m config at 8,000 tokens
    python bench/op_count.py --config configs/tiny_cpu.json --seq-len 128 --set model.n_layer=2

At micro-batch 1 a GPU step is bound by the host launching kernels one by one, and the small elementwise
kernels are bound by memory traffic; neither shows in FLOP counts. This counts both without a GPU: the model
runs on PyTorch's meta device (shapes only, no arithmetic) under a dispatch mode that sees every ATen
operation of the forward, the activation-checkpointing recompute and the backward. Operations that launch
nothing (views, allocations, Python numbers wrapped as scalars) are not counted. The selective scan and the
causal conv count as one operation each way, as mamba_ssm's and causal_conv1d's kernels do on the CUDA path
(plus the copies their wrappers make of inputs in a layout the kernels do not read), and so does the note
attention, as a fused attention kernel; everything else is the model's own code. Bytes are those of the
operations' outputs, in fp32 (on a GPU the matmuls' outputs are bf16 under autocast).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model.mixer  # noqa: E402
from model.config import MemMambaConfig  # noqa: E402
from model.memmamba import MemMambaLM  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402

# Operations that launch nothing on a GPU: views, allocations, a dtype query, Python numbers wrapped as CPU scalars.
NOT_LAUNCHED = {"scalar_tensor", "view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "split",
                "split_with_sizes", "chunk", "unbind", "slice", "select", "as_strided", "detach", "t", "alias",
                "unsqueeze", "squeeze", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
                "_reshape_alias", "promote_types"}


class Kernel(torch.autograd.Function):
    """One operation forward and one backward (writing every input's gradient), shaped like the kernel it stands for."""

    @staticmethod
    def forward(ctx, out_like: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [t.shape for t in (out_like, *inputs)]
        return torch.empty_like(out_like).add_(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = grad.new_empty(sum(shape.numel() for shape in ctx.shapes)).add_(0)
        return tuple(g.view(shape) for g, shape in zip(grads.split([s.numel() for s in ctx.shapes]), ctx.shapes))


def stand_in_kernels() -> None:
    """The CUDA path's kernels as single operations (what a GPU launches for them), after the copies their
    wrappers make of inputs in a layout the kernels do not read: the scan's of every input whose time axis is not
    contiguous, the conv's of an input contiguous along neither channels nor time."""
    time_contiguous = lambda t: t if t.stride(-1) == 1 else t.contiguous()
    model.mixer.Mamba._use_cuda = lambda self, x: True
    model.mixer.selective_scan_gated_cuda = lambda x, dt, A, B, C, D, z: Kernel.apply(
        *map(time_contiguous, (x, dt, B, C)), D, time_contiguous(z))
    model.mixer.causal_conv1d_fn = lambda x, weight, bias, activation: Kernel.apply(
        x if 1 in x.stride()[1:] else x.contiguous(), weight, bias)
    # fused attention, as on a GPU (on the meta device it would run as its decomposition into matmuls)
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, attn_mask: Kernel.apply(q, k, v)


class OperationCount(TorchDispatchMode):
    """Operations launched, bytes they write and host reads of tensors, per `phase` (set by the caller)."""

    def __init__(self):
        super().__init__()
        self.count, self.bytes, self.syncs = collections.Counter(), collections.Counter(), collections.Counter()
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":   # a tensor read by the host: on a GPU, a wait for it
            self.syncs[self.phase] += 1
        elif name not in NOT_LAUNCHED:
            # what an operation writes: the arguments it updates in place (an optimizer's states), or its outputs
            mutated = [value for arg, value in zip(func._schema.arguments, args)
                       if arg.alias_info is not None and arg.alias_info.is_write]
            self.count[self.phase] += 1
            self.bytes[self.phase] += sum(t.numel() * t.element_size() for t in tree_leaves(mutated or out)
                                          if isinstance(t, torch.Tensor))
        return out


def count(config: MemMambaConfig, seq_len: int, checkpointing: bool) -> OperationCount:
    with torch.device("meta"):
        lm = MemMambaLM(config)
    lm.gradient_checkpointing = checkpointing
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with OperationCount() as ops:
        hidden, _ = lm.hidden_states(ids, final_state=False)
        loss = hidden.sum()
        ops.phase = "backward"        # with checkpointing, includes the recomputed forward
        loss.backward()
    return ops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "200m_8k.json"))
    parser.add_argument("--seq-len", type=int, help="default: the config's data.seq_len")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:   # a missing config, a mistyped --set
        parser.error(str(error))
    model_config = config.model_config
    seq_len = args.seq_len or config.data.seq_len
    checkpointing = config.train.activation_checkpointing
    stand_in_kernels()

    print(f"{Path(args.config).name}: {model_config.n_layer} layers, D={model_config.d_model}, {seq_len} tokens, "
          f"activation checkpointing {'on' if checkpointing else 'off'}; per layer, forward / backward:")
    print("| variant | operations | MB written | operations vs Mamba | bytes vs Mamba |")
    print("| --- | ---: | ---: | ---: | ---: |")
    results = {}
    for name, notes in (("MemMamba", True), ("Mamba", False)):
        variant = MemMambaConfig(**{**vars(model_config), "notes": notes})
        results[name] = count(variant, seq_len, checkpointing)
    n = model_config.n_layer
    for name, ops in results.items():
        total_ops, total_bytes = sum(ops.count.values()), sum(ops.bytes.values())
        base = results["Mamba"]
        print(f"| {name} | {ops.count['forward'] / n:.0f} / {ops.count['backward'] / n:.0f} "
              f"| {ops.bytes['forward'] / n / 2**20:.0f} / {ops.bytes['backward'] / n / 2**20:.0f} "
              f"| {total_ops / sum(base.count.values()):.2f}x | {total_bytes / sum(base.bytes.values()):.2f}x |")


if __name__ == "__main__":
    main()
