"""The mixer's kernel path on the CPU: the scan operators with a stand-in kernel in place of mamba_ssm's.

The CUDA kernels are tested against the PyTorch scan in tests/test_cuda.py, on a GPU. What is tested here needs
none: the operators' registration (the output shapes the compiler plans with, the backward), the mixer's use of
them (the final state read out with its gradient, the initial state's term, the fused gate), and a layer on the
kernel path compiling into one graph. The stand-in computes what the kernel computes, with the PyTorch scan, and
allocates its outputs as the kernel does.
"""
import dataclasses

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import model.mixer
from model import MemMambaConfig, MemMambaLM, compile_layers
from model.scan import selective_scan, selective_scan_cuda, selective_scan_gated_cuda
from model.scan_kernel import KERNEL_CHUNK
from tests.training_step import assert_same_training_step
from training.loss import lm_loss


def stand_in_forward(u, delta, A, B, C, D, z, delta_softplus):
    y, h = selective_scan(u, delta, A, B[:, 0], C[:, 0], D, dt_softplus=delta_softplus)
    out = torch.empty_like(delta).copy_(y)
    chunk_states = u.new_zeros(*u.shape[:2], -(-u.shape[-1] // KERNEL_CHUNK), 2 * A.shape[1], dtype=A.dtype)
    chunk_states[:, :, -1, 1::2] = h
    return [out, chunk_states] + ([] if z is None else [torch.empty_like(z).copy_(out * F.silu(z))])


def stand_in_backward(u, delta, A, B, C, D, z, dout, chunk_states, out, delta_softplus):
    inputs = (u, delta, A, B, C, D) + (() if z is None else (z,))
    # an operator's kernel runs beneath autograd; torch.func differentiates there too
    _, vjp = torch.func.vjp(lambda *t: stand_in_forward(*t[:6], t[6] if z is not None else None,
                                                        delta_softplus)[-1 if z is not None else 0], *inputs)
    return [torch.empty_like(t).copy_(g) for t, g in zip(inputs, vjp(dout))]


torch.library.register_kernel("memmamba::selective_scan_fwd", "cpu", stand_in_forward)
torch.library.register_kernel("memmamba::selective_scan_bwd", "cpu", stand_in_backward)


def stand_in_conv(x, weight, bias, activation):
    """causal_conv1d_fn: a causal depthwise conv of x [B, E, T] with weight [E, d_conv], then SiLU."""
    assert activation == "silu"
    return F.silu(F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight[:, None], bias, groups=weight.shape[0]))


def scan_inputs(T=37, gated=False):
    g = torch.Generator().manual_seed(0)
    b, E, N = 2, 6, 4
    x, dt = torch.randn(b, E, T, generator=g), torch.randn(b, E, T, generator=g) - 2
    A = -torch.rand(E, N, generator=g) * 3
    B, C = torch.randn(2, b, N, T, generator=g)
    D = torch.randn(E, generator=g)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D)
    if gated:
        inputs["z"] = torch.randn(b, E, T, generator=g)
    return {k: v.requires_grad_() for k, v in inputs.items()}


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_the_scan_operators_are_registered_as_the_compiler_needs(gated):
    """Output shapes, strides and dtypes from register_fake match the kernel's; the backward is registered; the
    forward traces through dynamo and AOTAutograd. u and z come in the mixer's layout (time contiguous,
    channels strided): the kernel's outputs take delta's and z's."""
    i = scan_inputs(gated=gated)
    batch_major = lambda t: t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    args = (batch_major(i["x"]), batch_major(i["dt"]), i["A"], i["B"][:, None], i["C"][:, None], i["D"],
            batch_major(i["z"]) if gated else None, True)
    torch.library.opcheck(torch.ops.memmamba.selective_scan_fwd, args)


@pytest.mark.parametrize("h0", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("T", [37, KERNEL_CHUNK + 5], ids=["one-kernel-chunk", "two-kernel-chunks"])
def test_kernel_path_gives_the_torch_scan_values_and_gradients_final_state_included(h0, T):
    i = scan_inputs(T)
    i["h0"] = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1)).requires_grad_() if h0 else None
    leaves = [t for t in i.values() if t is not None]
    results = []
    for scan in (selective_scan, selective_scan_cuda):
        y, h = scan(**i, dt_softplus=True)
        # chunked training and sequence parallelism backpropagate through the final state
        grads = torch.autograd.grad(y.square().mean() + h.sin().mean(), leaves)
        results.append((y, h, *grads))
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gated_kernel_path_gives_the_torch_scan_times_the_gate():
    i = scan_inputs(gated=True)
    z = i.pop("z")
    y = selective_scan_gated_cuda(**i, z=z)
    y_ref = selective_scan(**i, dt_softplus=True)[0] * F.silu(z)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    leaves = list(i.values()) + [z]
    for got, want in zip(torch.autograd.grad(y.square().sum(), leaves), torch.autograd.grad(y_ref.square().sum(), leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def kernel_path(monkeypatch, one_thread):
    """Every mixer on the kernel path, with the stand-in kernels, but those of backend "torch"."""
    monkeypatch.setattr(model.mixer.Mamba, "_use_cuda", lambda self, x: self.backend != "torch")
    monkeypatch.setattr(model.mixer, "causal_conv1d_fn", stand_in_conv)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CONFIG = MemMambaConfig(d_model=32, n_layer=2, vocab_size=97, d_state=4, summary_dim=8, pool_size=3, note_window=4,
                        tau1=0.55, tau2=0.45, attn_dim=16, attn_heads=2, cross_layer_every=2, cross_layer_span=2)


@pytest.mark.parametrize("chunk_len", [None, 13], ids=["whole-sequence", "chunked"])
@pytest.mark.parametrize("notes", [True, False], ids=["memmamba", "mamba"])
def test_a_layer_on_the_kernel_path_compiles_into_one_graph_and_trains_as_the_torch_path(kernel_path, chunk_len,
                                                                                        notes):
    """Whole sequences take the gated kernel, chunks the state-carrying one. fullgraph: a graph break is an error.

    The backend decomposes operations as Inductor does before running them eagerly: with "aot_eager", torch's
    fake softplus_backward predicts other strides than the real one returns, and a view in the backward fails.
    """
    models = []
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        models.append(MemMambaLM(dataclasses.replace(CONFIG, notes=notes, backend=backend)))
    reference, compiled = models
    compile_layers(compiled, backend="aot_eager_decomp_partition", fullgraph=True)
    window = torch.randint(0, 97, (2, 27), generator=torch.Generator().manual_seed(1))
    assert_same_training_step(reference, compiled, lambda m: lm_loss(m, window, chunk_len))
