"""The training objective: sliced and chunked forms equal a plain cross-entropy."""
import pytest
import torch
import torch.nn.functional as F

import training.loss
from tests.test_model import TEST_CONFIG, make_model, tokens
from training.loss import lm_loss


def loss_and_grads(window, **kwargs):
    model = make_model(pool_policy="priority").train()
    loss = lm_loss(model, window, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(training.loss, "LOSS_SLICE", 7)   # several logit slices per chunk


def test_loss_is_plain_cross_entropy(small_slices):
    window = tokens(batch=2, T=43)
    model = make_model()
    with torch.no_grad():
        logits, _ = model(window[:, :-1])
        expected = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        assert torch.allclose(lm_loss(model, window), expected, rtol=1e-6)


@pytest.mark.parametrize("chunk_len", [4, 8, 3, 6, 10, 41], ids=lambda c: f"chunk{c}")
def test_chunked_step_equals_unchunked_step(small_slices, chunk_len):
    """Chunk lengths that divide the note window (W=4) and ones that cut windows."""
    assert TEST_CONFIG.note_window == 4
    window = tokens(batch=2, T=43)
    loss, grads = loss_and_grads(window)
    chunked_loss, chunked_grads = loss_and_grads(window, chunk_len=chunk_len)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_mask_averages_over_the_selected_targets_only():
    window = tokens(batch=2, T=21)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, -3:] = True
    model = make_model()
    with torch.no_grad():
        logits, _ = model(window[:, :-1])
        expected = F.cross_entropy(logits[:, -3:].flatten(0, 1), window[:, -3:].flatten())
        torch.testing.assert_close(lm_loss(model, window, loss_mask=mask), expected)
        torch.testing.assert_close(lm_loss(model, window, chunk_len=6, loss_mask=mask), expected)
