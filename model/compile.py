"""train.compile: torch.compile each layer of a model."""
import torch
from torch import nn


def compile_layers(model: nn.Module, **options) -> None:
    """Compile every layer of `model` in place (`options` are torch.compile's). Layers of one kind share their
    graphs, so depth does not multiply the compile time."""
    # Activation checkpointing (per layer, and per chunk with train.chunk_len) recomputes a layer in the backward
    # pass, and the recomputation must run the graph its forward ran: checkpointing refuses the tensors another
    # graph saves. Dynamo tries a function's graphs most recently used first, so once a later call (a shorter
    # last chunk) has added a graph for any length, the earlier chunks would be recomputed with that one
    # (pytorch/pytorch#166926). Tried in the order they were made, each call finds the graph its forward found.
    torch._C._dynamo.eval_frame._set_lru_cache(False)
    # All layers run one forward function, and torch keeps at most `recompile_limit` graphs per function (8 by
    # default) and runs calls past that uncompiled, with a warning. Layers of one kind share graphs, but a kind
    # needs one per variant of its inputs (first or carried chunk, a shorter last chunk, training or validation: up
    # to about 10), and cross-layer attentions low in the stack read fewer pools than those above, so they are kinds
    # of their own: the paper's 24 layers, chunked and validated, need 16. No layer is more than one kind.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16 * len(model.layers))
    for layer in model.layers:
        layer.compile(**options)
