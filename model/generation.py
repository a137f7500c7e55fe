"""Prefill and sampling shared by every language model here.

A model provides `forward(input_ids, state) -> (logits, state)`, `step(token, state) ->
(logits, state)`, `allocate_state(batch_size, device)` and `config.vocab_size`. Long prompts are
prefilled chunk by chunk, so memory does not grow with the prompt beyond one chunk (and the
model's own state).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor


class GenerationMixin:
    @torch.no_grad()
    def prefill(self, input_ids: Tensor, state=None, chunk_len: int = 4096,
                keep_logits: Callable[[int, int], slice] | None = None):
        """Run a prompt of any length through the model in chunks.

        Returns (logits of the last token [B, V], state). With `keep_logits`, a function of
        (chunk start, chunk end) giving the positions whose logits to keep, returns those
        concatenated instead of only the last.
        """
        check_token_ids(input_ids, "input_ids", 2)
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be a positive number of tokens, got {chunk_len}")
        # Out of range, the embedding fails with an index error on the CPU and a device-side assert (which ends
        # the process's use of the GPU) on CUDA. One sync per prompt is nothing here; forward, which training
        # runs, leaves this to the embedding.
        vocab_size = self.config.vocab_size
        low, high = input_ids.aminmax()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the model's vocab_size), got ids from "
                             f"{low.item()} to {high.item()}")
        if state is None:
            state = self.allocate_state(input_ids.shape[0], input_ids.device)
        kept = []
        for start in range(0, input_ids.shape[1], chunk_len):
            end = min(start + chunk_len, input_ids.shape[1])
            logits, state = self(input_ids[:, start:end], state)
            if keep_logits is not None:
                kept.append(logits[:, keep_logits(start, end)].float())
            last = logits[:, -1].float()
        return (torch.cat(kept, 1) if keep_logits is not None else last), state

    @torch.no_grad()
    def stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, greedy: bool = False, chunk_len: int = 4096,
               generator: torch.Generator | None = None, vocab_size: int | None = None) -> Iterator[Tensor]:
        """Yield the next token [B] one at a time (O(1) work per token for MemMamba).

        `vocab_size`: draw only ids below it, those of a tokenizer smaller than the model's vocabulary.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be None (the model's whole vocabulary) or positive, got {vocab_size}")
        logits, state = self.prefill(input_ids, chunk_len=chunk_len)
        for i in range(max_new_tokens):
            token = sample(logits[:, :vocab_size], temperature, top_k, greedy, generator)
            yield token
            if i + 1 < max_new_tokens:
                logits, state = self.step(token, state)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """input_ids [B, T] -> [B, T + max_new_tokens]."""
        new = list(self.stream(input_ids, max_new_tokens, **kwargs))
        return torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
           greedy: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> token ids [B]. Temperature 0 is greedy; top_k None or 0 keeps the whole vocabulary."""
    if not temperature >= 0:   # NaN too
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be None or 0 (the whole vocabulary) or a positive number of ids, got {top_k}")
    if greedy or temperature == 0:
        return logits.argmax(-1)
    # Measured from the largest, the scaled logits are <= 0: a tiny temperature gives -inf, never inf - inf = NaN.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_token_ids(ids, name: str, dims: int) -> None:
    """ids must be a tensor of token ids, [batch, tokens] (dims 2, at least one token) or [batch] (dims 1), with at
    least one sequence.

    Shape and dtype only, which needs no device sync: a model's forward runs this on every call.
    """
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.long, torch.int32):   # what nn.Embedding takes
        found = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be a tensor of token ids (torch.long or torch.int32), got {found}")
    if ids.dim() != dims:
        raise ValueError(f"{name} must have shape {'[batch, tokens]' if dims == 2 else '[batch]'}, "
                         f"got shape {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError(f"{name} holds no sequences (shape {list(ids.shape)}); a batch needs at least one")
    if dims == 2 and ids.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (shape {list(ids.shape)}); a forward needs at least one token (a "
                         "prompt may be just the end-of-sequence id, which starts a new document)")
