"""The chunked selective scan against a token-by-token loop: values and gradients."""
import pytest
import torch

from model.scan import initial_state_contribution, selective_scan
from tests.reference import selective_scan_sequential


def scan_inputs(batch=2, E=5, N=3, T=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, E, T, generator=g, dtype=torch.float64),
        dt=torch.rand(batch, E, T, generator=g, dtype=torch.float64) * 0.8,
        A=-torch.rand(E, N, generator=g, dtype=torch.float64) * 4,
        B=torch.randn(batch, N, T, generator=g, dtype=torch.float64),
        C=torch.randn(batch, N, T, generator=g, dtype=torch.float64),
        h0=torch.randn(batch, E, N, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 29, 64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_sequential_values_and_gradients(chunk_size, with_h0):
    inputs = scan_inputs()
    if not with_h0:
        inputs["h0"] = None

    def run(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        y, h = fn(**leaves)
        # a loss that weighs every output and the final state differently
        w_y = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        w_h = torch.linspace(1, 2, h.numel(), dtype=h.dtype).view_as(h)
        ((y * w_y).sum() + (h * w_h).sum()).backward()
        return y, h, {k: v.grad for k, v in leaves.items()}

    y, h, grads = run(lambda **kw: selective_scan(**kw, chunk_size=chunk_size))
    y_ref, h_ref, grads_ref = run(selective_scan_sequential)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-9, msg=name)


def test_skip_and_softplus_options_match_sequential():
    """D and dt_softplus, the options the mixer uses (as mamba_ssm's selective_scan_fn has them)."""
    inputs = scan_inputs()
    inputs["dt"] = inputs["dt"] * 4 - 3                 # raw step sizes, both signs
    inputs["D"] = torch.randn(inputs["x"].shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    refs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, h = selective_scan(**leaves, dt_softplus=True, chunk_size=4)
    y_ref, h_ref = selective_scan_sequential(**refs, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    (y.sum() + h.sum()).backward()
    (y_ref.sum() + h_ref.sum()).backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, refs[name].grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("dt_softplus", [False, True])
def test_scan_runs_in_fp32_for_low_precision_inputs(dt_softplus):
    """The step size too: softplus of a bf16 dt is taken in fp32, not rounded to bf16 (8 bits) first."""
    inputs = scan_inputs()
    if dt_softplus:
        inputs["dt"] = inputs["dt"] * 4 - 3                 # raw step sizes, both signs
    inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    y, h = selective_scan(**inputs, dt_softplus=dt_softplus)
    assert y.dtype == h.dtype == torch.float32
    y_ref, h_ref = selective_scan_sequential(*(inputs[k].double() for k in ("x", "dt", "A", "B", "C")),
                                             h0=inputs["h0"].double(), dt_softplus=dt_softplus)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_initial_state_contribution_is_the_difference_a_start_state_makes():
    inputs = scan_inputs()
    y0, h0_last = selective_scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C")))
    y1, h1_last = selective_scan(**inputs)
    dy, dh = initial_state_contribution(inputs["dt"], inputs["A"], inputs["C"], inputs["h0"])
    torch.testing.assert_close(y0 + dy, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h0_last + dh, h1_last, rtol=1e-10, atol=1e-10)


def test_initial_state_contribution_has_the_gradients_of_the_scan_and_keeps_only_its_inputs_for_them():
    inputs = {k: v.requires_grad_() for k, v in scan_inputs(N=16, T=64).items()}
    y0, h0_last = selective_scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C")))
    y1, h1_last = selective_scan(**inputs)
    g = torch.Generator().manual_seed(1)
    wy, wh = torch.randn(y1.shape, generator=g, dtype=y1.dtype), torch.randn(h1_last.shape, generator=g, dtype=y1.dtype)
    wrt = [inputs[k] for k in ("dt", "A", "C", "h0")]
    expected = torch.autograd.grad(((y1 - y0) * wy).sum() + ((h1_last - h0_last) * wh).sum(), wrt)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        dy, dh = initial_state_contribution(*wrt)
    for got, want in zip(torch.autograd.grad((dy * wy).sum() + (dh * wh).sum(), wrt), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the decay exp(A cumsum(dt)) is [batch, E, T, N]: recomputed in the backward, not kept for it
    assert sum(saved) <= sum(t.numel() for t in wrt)


def test_long_decays_do_not_overflow():
    inputs = scan_inputs(T=300)
    inputs["dt"] = inputs["dt"] * 50          # exp(A * cumsum dt) underflows to 0 early
    y, h = selective_scan(**inputs, chunk_size=64)
    y_ref, h_ref = selective_scan_sequential(**inputs)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9)
