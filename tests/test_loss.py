"""The training objective: sliced and chunked forms equal a plain cross-entropy."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

import model.lm_head
from model import MemMambaLM
from model.lm_head import IGNORE, LMHead
from tests.test_model import TEST_CONFIG, make_model, random_config, tokens
from tests.training_step import assert_same_training_step
from training.loss import LanguageModelObjective, lm_loss


def loss_and_grads(window, **kwargs):
    model = make_model(pool_policy="priority").train()
    loss = lm_loss(model, window, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(model.lm_head, "LOSS_SLICE", 7)   # several logit slices per chunk


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lm_head_loss_and_gradients_equal_autograd_cross_entropy(small_slices, autocast):
    """The gradient the head computes in its forward pass is the one autograd finds through the logits."""
    torch.manual_seed(0)
    head = LMHead(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, 2:5] = IGNORE                     # masked targets count for nothing
    upstream = 0.37                              # the backward pass scales by what comes from above

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = head(hidden, targets)
        (loss * upstream).backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(hidden).float()
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    (expected * upstream).backward()

    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), **tolerance)
    torch.testing.assert_close(grads[0], hidden.grad, **tolerance)
    torch.testing.assert_close(grads[1], head.weight.grad, **tolerance)


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


@pytest.mark.parametrize("seed", range(20))
def test_random_models_train_alike_whole_and_in_chunks(seed):
    """Random models (tests/test_model.py) cut into chunks of a random length, with activation checkpointing on or
    off and some targets masked or not: the loss and gradients of the whole sequence."""
    rng = random.Random(seed)
    config = random_config(rng)
    T = rng.randint(3, 40)                     # the window: T - 1 inputs, cut into at least two chunks
    torch.manual_seed(seed)
    whole = MemMambaLM(config).train()
    chunked = copy.deepcopy(whole)
    chunked.gradient_checkpointing = rng.random() < 0.5
    chunk_len = rng.randint(1, T - 2)
    window = tokens(rng.randint(1, 3), T, seed, vocab=config.vocab_size)
    mask = None
    if rng.random() < 0.3:      # only some targets count, as in passkey fine-tuning
        mask = torch.rand(window.shape[0], T - 1, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert_same_training_step(whole, chunked, lambda m: lm_loss(m, window, chunk_len if m is chunked else None, mask))


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


def test_a_window_without_scored_targets_adds_nothing():
    """Validation pads a rank's share with windows it does not score (an all-False mask): their loss, weighed by
    their count of scored targets, must be 0 and their gradients too, not NaN."""
    window = tokens(batch=2, T=21)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    for chunk_len in (None, 6):
        model = make_model()
        loss = lm_loss(model, window, chunk_len=chunk_len, loss_mask=mask)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_the_objective_runs_the_window_chunk_by_chunk_with_train_chunk_len(monkeypatch):
    # what bounds its memory: the model never sees more than chunk_len tokens at once
    window = tokens(batch=2, T=43)
    model = make_model()
    lengths = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda inputs, *args, **kwargs: (
        lengths.append(inputs.shape[1]) or hidden_states(inputs, *args, **kwargs)))
    with torch.no_grad():
        loss = LanguageModelObjective(model, chunk_len=8)(window)
        assert lengths == [8, 8, 8, 8, 8, 2]
        torch.testing.assert_close(loss, lm_loss(model, window), rtol=1e-6, atol=1e-6)


def test_chunks_and_sequence_parallelism_are_refused_together():
    with pytest.raises(ValueError, match="^chunked training and sequence parallelism cannot be combined: set "
                                         "train.chunk_len to null or parallel.sequence_parallel_size to 1$"):
        lm_loss(make_model(), tokens(batch=1, T=9), chunk_len=4, sp=object())   # refused before the model runs
