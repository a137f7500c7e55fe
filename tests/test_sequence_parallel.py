"""Sequence parallelism across P gloo processes == one process on the whole sequence."""
import dataclasses
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import MemMambaLM, compile_layers
from model.sequence_parallel import SequenceParallel
from tests.test_model import TEST_CONFIG, random_config
from tests.training_step import assert_same_training_step
from training.loss import lm_loss

T = 48


def assert_sequence_parallel_equals_one_process(model, ids, label=""):
    """On this rank's piece of `ids`, `model` gives the logits of the whole sequence in one process, and its
    gradients summed over the ranks are that process's. Returns the names of the parameters compared."""
    length, vocab = ids.shape[1], model.config.vocab_size
    # a loss that weighs every position and logit differently, so every gradient is checked
    w = torch.linspace(-1, 1, length * vocab).view(1, length, vocab).sin()
    reference, _ = model(ids)
    (reference * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    sp = SequenceParallel()
    logits, _ = model(sp.local(ids), sp=sp)
    (logits * sp.local(w)).sum().backward()
    torch.testing.assert_close(logits, sp.local(reference), rtol=1e-5, atol=1e-5, msg=label or None)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == ref_grads.keys(), label
    for name, ref_grad in ref_grads.items():
        grad = model.get_parameter(name).grad.clone()
        dist.all_reduce(grad)            # what data-parallel averaging sums up
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * max(scale, 1), msg=f"{label}{name}")
    return ref_grads.keys()


def run_rank(rank, world, rendezvous, overrides):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        overrides = dict(overrides)
        checkpointing = overrides.pop("gradient_checkpointing", False)
        model = MemMambaLM(dataclasses.replace(TEST_CONFIG, **overrides))
        model.gradient_checkpointing = checkpointing   # recomputes the layers and, within them, the start-state term
        ids = torch.randint(0, TEST_CONFIG.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
        compared = assert_sequence_parallel_equals_one_process(model, ids)
        assert compared == {name for name, _ in model.named_parameters()}
    finally:
        dist.destroy_process_group()


CASES = [(2, dict(pool_policy="fifo")), (2, dict(pool_policy="priority", pooling="mean")),
         (2, dict(notes=False)), (4, dict(pool_policy="fifo")), (4, dict(pool_policy="priority")),
         (4, dict(note_window=16, pool_size=2)), (3, dict(pool_policy="priority")),
         (2, dict(pool_policy="priority", gradient_checkpointing=True))]


@pytest.mark.slow
@pytest.mark.parametrize("world, overrides", CASES, ids=[f"P{w}-" + "-".join(
    f"{k}={v}" if isinstance(v, bool) else str(v) for k, v in o.items()) for w, o in CASES])
def test_sequence_parallel_equals_one_process(tmp_path, world, overrides):
    mp.spawn(run_rank, args=(world, tmp_path / "rendezvous", overrides), nprocs=world)


def run_rank_random(rank, world, rendezvous, seeds):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for seed in seeds:
            rng = random.Random(seed)
            config = random_config(rng)
            length = world * rng.randint(max(config.d_conv - 1, 1), 16)
            torch.manual_seed(seed)
            model = MemMambaLM(config)
            ids = torch.randint(0, config.vocab_size, (rng.randint(1, 2), length),
                                generator=torch.Generator().manual_seed(seed))
            assert_sequence_parallel_equals_one_process(model, ids, label=f"seed {seed}: ")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sequence_parallel_equals_one_process_on_random_models(tmp_path):
    """Random models (tests/test_model.py) on three ranks whose pieces are as short as the conv allows or span
    several note windows, cutting windows anywhere."""
    mp.spawn(run_rank_random, args=(3, tmp_path / "rendezvous", range(16)), nprocs=3)


def run_rank_loss(rank, world, rendezvous):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MemMambaLM(dataclasses.replace(TEST_CONFIG, pool_policy="priority"))
        window = torch.randint(0, TEST_CONFIG.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(3))
        mask = torch.rand(2, T, generator=torch.Generator().manual_seed(4)) < 0.7
        reference = lm_loss(model, window, loss_mask=mask)
        reference.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

        loss = lm_loss(model, window, loss_mask=mask, sp=SequenceParallel())
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / world, reference.detach(), rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            grad /= world                     # DeepSpeed averages gradients over all ranks
            scale = ref_grads[name].abs().max().item()
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6 * max(scale, 1e-3), msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sequence_parallel_loss_and_averaged_gradients_equal_one_process(tmp_path):
    mp.spawn(run_rank_loss, args=(2, tmp_path / "rendezvous"), nprocs=2)


def run_rank_compiled(rank, world, rendezvous):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(MemMambaLM(dataclasses.replace(TEST_CONFIG, pool_policy="priority")))
        compile_layers(models[1], backend="aot_eager")     # graphs as in training, run without code generation
        windows = torch.randint(0, TEST_CONFIG.vocab_size, (2, 2, T + 1), generator=torch.Generator().manual_seed(3))
        for window in windows:   # the second runs the compiled graphs without compiling
            assert_same_training_step(*models, lambda model: lm_loss(model, window, sp=SequenceParallel()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients_under_sequence_parallelism(tmp_path):
    """train.compile with parallel.sequence_parallel_size > 1: the exchanges between ranks run between graphs."""
    mp.spawn(run_rank_compiled, args=(2, tmp_path / "rendezvous"), nprocs=2)


def run_rank_refusals(rank, world, rendezvous):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        sp = SequenceParallel()
        # uneven pieces would put every later rank's tokens at the wrong absolute positions
        with pytest.raises(ValueError, match="sequence length 7 is not divisible by the sequence-parallel size 2"):
            sp.local(torch.zeros(1, 7))
        # the conv halo is the previous rank's last d_conv - 1 inputs: a shorter piece has not that many
        model = MemMambaLM(TEST_CONFIG)
        with pytest.raises(ValueError, match=r"each rank's piece \(2 tokens\) must be at least d_conv - 1 = 3 tokens"):
            model(torch.zeros(1, 2, dtype=torch.long), sp=sp)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pieces_that_cannot_be_split_or_are_shorter_than_the_conv_halo_are_refused_with_the_reason(tmp_path):
    mp.spawn(run_rank_refusals, args=(2, tmp_path / "rendezvous"), nprocs=2)
