"""CUDA fast paths against the PyTorch reference. Skipped without a GPU and mamba_ssm."""
import pytest
import torch

from model.scan import selective_scan, selective_scan_cuda
from model.scan_kernel import cuda_scan_available
from tests.training_step import assert_same_training_step
from training.loss import lm_loss

# the kernels sum in another order than the PyTorch path, and over a whole model's gradients that shows
KERNEL_TOL = dict(loss_tol=(1e-4, 1e-4), grad_tol=(2e-3, 2e-4))

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_scan_available(), reason="needs a CUDA GPU and mamba_ssm")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """cuDNN convolutions default to TF32, which would hide a wrong kernel under rounding noise."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("mixer_options", [False, True], ids=["plain", "softplus_and_D"])
def test_mamba_ssm_kernel_equals_torch_scan(with_h0, mixer_options):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, E, N, T = 2, 64, 16, 1000
    x = torch.randn(b, E, T, device="cuda", generator=g)
    dt = torch.rand(b, E, T, device="cuda", generator=g) * 0.1
    A = -torch.rand(E, N, device="cuda", generator=g) * 4
    B, C = torch.randn(2, b, N, T, device="cuda", generator=g)
    h0 = torch.randn(b, E, N, device="cuda", generator=g) if with_h0 else None
    options = {}
    if mixer_options:
        dt = torch.randn(b, E, T, device="cuda", generator=g) - 3     # softplus(dt) around 0.05
        options = dict(D=torch.randn(E, device="cuda", generator=g), dt_softplus=True)
    leaves = [t.requires_grad_() for t in (x, dt, B, C, *options.values()) if isinstance(t, torch.Tensor)]
    outs, grads = [], []
    for fn in (selective_scan, selective_scan_cuda):
        y, h = fn(x, dt, A, B, C, h0=h0, **options)
        # the final state's gradient matters: chunked training and SP backpropagate through it
        (y.square().mean() + h.square().mean()).backward()
        outs.append((y, h))
        grads.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    torch.testing.assert_close(outs[1][0].float(), outs[0][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-3, atol=1e-3)
    for g_cuda, g_torch in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_cuda, g_torch, rtol=1e-3, atol=1e-3)


def _backend_pair(notes: bool):
    from model import MemMambaConfig, MemMambaLM
    models = []
    for backend in ("torch", "cuda"):
        torch.manual_seed(0)
        models.append(MemMambaLM(MemMambaConfig(backend=backend, notes=notes)).cuda())
    return models


@pytest.mark.parametrize("notes", [True, False])
def test_model_backends_agree(notes):
    ids = torch.randint(0, 1024, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    logits = []
    for model in _backend_pair(notes):
        state = None
        for chunk in ids.split(100, 1):   # chunked: the kernels run with an initial state
            out, state = model(chunk, state)
        logits.append(out)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("notes", [True, False])
@pytest.mark.parametrize("chunk_len", [None, 128])
def test_training_gradients_agree(notes, chunk_len):
    """Whole sequences (the kernel fuses the gate, no state out) and chunks (gradients flow back through
    the state carried between them): the kernel path's loss and gradients are the PyTorch path's."""
    window = torch.randint(0, 1024, (2, 513), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    assert_same_training_step(*_backend_pair(notes), lambda m: lm_loss(m, window, chunk_len=chunk_len), **KERNEL_TOL)


def test_bf16_autocast_backends_agree():
    window = torch.randint(0, 1024, (2, 1025), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    losses = []
    for model in _backend_pair(notes=True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(lm_loss(model, window, chunk_len=256))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("gated", [False, True])
def test_scan_operator_output_layouts_and_backward_are_registered_as_the_kernel_has_them(gated):
    g = torch.Generator(device="cuda").manual_seed(4)
    b, E, N, T = 2, 64, 16, 2100     # two of the kernel's chunks
    # x, dt and z in the mixer's layout: time contiguous, channels strided
    x, dt, z = torch.randn(3, E, b, T, device="cuda", generator=g).transpose(1, 2)
    A = -torch.rand(E, N, device="cuda", generator=g)
    B, C = torch.randn(2, b, 1, N, T, device="cuda", generator=g)
    D = torch.randn(E, device="cuda", generator=g)
    args = [t.requires_grad_() for t in (x, dt - 3, A, B, C, D)] + [z.requires_grad_() if gated else None, True]
    torch.library.opcheck(torch.ops.memmamba.selective_scan_fwd, args)


@pytest.mark.parametrize("chunk_len", [None, 128])
def test_compiled_layers_agree_on_the_kernel_path(chunk_len):
    """train.compile as it runs on a GPU: each layer one graph (a graph break fails), Triton kernels generated
    around the scan and conv kernels."""
    import torch._dynamo
    from model import MemMambaConfig, MemMambaLM, compile_layers
    torch._dynamo.reset()
    window = torch.randint(0, 1024, (2, 513), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(MemMambaLM(MemMambaConfig(backend="cuda")).cuda())
    compile_layers(models[1], fullgraph=True)
    assert_same_training_step(*models, lambda m: lm_loss(m, window, chunk_len=chunk_len), **KERNEL_TOL)
