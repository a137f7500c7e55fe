"""train.compile: compiled layers train exactly what eager layers train, and depth adds no compiles.

The graphs are captured by dynamo and AOTAutograd as in training, then run without code generation
(backend "aot_eager"): what this code can get wrong under the compiler (tracing, guards, recompiles,
checkpointing) shows, and no C++ kernels are built for them, which takes minutes on 2 cores.
"""
import dataclasses

import pytest
import torch
import torch._dynamo

from model import MemMambaConfig, MemMambaLM, compile_layers
from tests.training_step import assert_same_training_step
from training.loss import lm_loss

BACKEND = "aot_eager"
# Notes on every layer, cross-layer attention on every second one over the last three pools, a pool small
# enough to evict, and windows short enough that chunks start in the middle of one.
CONFIG = MemMambaConfig(d_model=32, n_layer=4, vocab_size=97, d_state=4, summary_dim=8, pool_size=3,
                        note_window=4, tau1=0.55, tau2=0.45, attn_dim=16, attn_heads=2,
                        cross_layer_every=2, cross_layer_span=3)


def model_pair(**overrides) -> tuple[MemMambaLM, MemMambaLM]:
    """The same weights twice: eager, and with every layer compiled (as train.compile does)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(MemMambaLM(dataclasses.replace(CONFIG, **overrides)))
    compile_layers(models[1], backend=BACKEND)
    return models[0], models[1]


@pytest.fixture(autouse=True)
def fresh_compiler(one_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("chunk_len, checkpointing, overrides", [(None, False, {}), (None, False, {"notes": False}),
                                                               (13, True, {})],
                         ids=["whole-sequence", "whole-sequence-plain-mamba", "chunked-checkpointed"])
def test_compiled_layers_give_the_eager_loss_and_gradients(chunk_len, checkpointing, overrides):
    eager, compiled = model_pair(**overrides)
    eager.gradient_checkpointing = compiled.gradient_checkpointing = checkpointing
    windows = torch.randint(0, 97, (2, 2, 27), generator=torch.Generator().manual_seed(1))
    for window in windows:   # the second step runs the compiled graphs without compiling
        assert_same_training_step(eager, compiled, lambda model: lm_loss(model, window, chunk_len))


def test_a_shorter_last_chunk_leaves_the_chunks_before_it_recomputed_by_their_own_graphs():
    """Chunks of 10, 10, 10 and 6 tokens. The last one's length makes the compiler add a graph for any length; the
    backward pass must still recompute the others with the graphs their forward ran (model/compile.py)."""
    eager, compiled = model_pair(n_layer=1, note_window=8)
    window = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(0))
    assert_same_training_step(eager, compiled, lambda model: lm_loss(model, window, chunk_len=10))


def test_compiling_a_deeper_model_compiles_no_more_graphs():
    """Layers of one kind share graphs: the pool views a layer gets are bounded by the span, not by its depth.
    Past the limit torch would silently run the remaining layers uncompiled; here that is an error."""
    _, compiled = model_pair(n_layer=12)
    window = torch.randint(0, 97, (1, 41), generator=torch.Generator().manual_seed(2))
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        lm_loss(compiled, window).backward()


def test_layers_of_more_kinds_than_torchs_graph_limit_all_stay_compiled():
    """Cross-layer attention on every layer over the last five pools: the five layers read 1 to 5 pools, five
    kinds that need ten graphs with validation, past torch's default of eight per function. compile_layers makes
    room for them; past the limit torch would run the remaining layers uncompiled, which here is an error."""
    _, compiled = model_pair(n_layer=5, cross_layer_every=1, cross_layer_span=5)
    window = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        lm_loss(compiled, window).backward()
        with torch.no_grad():
            lm_loss(compiled, window)
