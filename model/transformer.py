"""GPT-style Transformer baseline of matched size: the model the paper's speed claim is against.

Pre-norm blocks, rotary positions (so evaluation can run past the training length),
scaled_dot_product_attention (flash-attn when installed and on a GPU), a KV cache for
chunked prefill and generation. Same interface as MemMambaLM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import TransformerConfig
from model.generation import GenerationMixin, check_token_ids
from model.lm_head import LMHead
from model.memmamba import RMSNorm
from model.state import batch_rows

try:  # optional fast path, CUDA only
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class KVCache:
    layers: list[tuple[Tensor, Tensor]]   # per layer (k, v), each [B, T_so_far, H, head_dim]
    position: int

    def map(self, fn) -> "KVCache":
        return KVCache([(fn(k), fn(v)) for k, v in self.layers], self.position)

    def select(self, batch_index) -> "KVCache":
        """As ModelState.select: row indices, or a bool mask over the batch."""
        index = batch_rows(batch_index, self.layers[0][0].device)
        return self.map(lambda t: t.index_select(0, index))


def rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate pairs of channels of x [B, T, H, d] by angle position * base^(-2i/d)."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = positions.float()[:, None] * freqs                        # [T, d/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)


# Scores (batch x head x query x key) that masked attention off CUDA holds at once: 256 MiB in fp32. There the
# mask and the scores are materialised, so a chunk of 4,096 queries over a 400k-token cache with 16 heads would
# take 100 GiB; the queries are taken in blocks instead, which leaves the arithmetic as it is.
ATTENTION_SCORES = 2 ** 26


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last q.shape[1] positions over all k.shape[1]; [B, T, H, d]."""
    B, Tq, H = q.shape[:3]
    Tk = k.shape[1]
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)   # aligns the causal mask bottom-right
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    rows = Tq if q.is_cuda else max(1, ATTENTION_SCORES // (B * H * Tk))   # CUDA's kernels do not materialise
    out = []
    for start in range(0, Tq, rows):
        end = min(start + rows, Tq)
        positions = torch.arange(Tk - Tq + start, Tk - Tq + end, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= positions[:, None]
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k, v, attn_mask=mask))
    return torch.cat(out, 2).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        D = config.d_model
        self.n_head, self.rope_base = config.n_head, config.rope_base
        self.norm1 = RMSNorm(D, config.norm_eps)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.norm2 = RMSNorm(D, config.norm_eps)
        self.fc = nn.Linear(D, config.mlp_ratio * D, bias=False)
        self.fc_out = nn.Linear(config.mlp_ratio * D, D, bias=False)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None, positions: Tensor
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, -1).unbind(2)
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        if cache is not None:   # (in this layer's dtype: a cache may come from the model before a .to(dtype))
            k, v = torch.cat([cache[0].to(k.dtype), k], 1), torch.cat([cache[1].to(v.dtype), v], 1)
        x = x + self.proj(attention(q, k, v).reshape(B, T, D))
        x = x + self.fc_out(F.gelu(self.fc(self.norm2(x))))
        return x, (k, v)


class TransformerLM(GenerationMixin, nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        config.check()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, std=std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        return KVCache([], 0)

    def forward(self, input_ids: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        hidden, state = self.hidden_states(input_ids, state)
        return self.lm_head(hidden), state

    def hidden_states(self, input_ids: Tensor, state: KVCache | None = None, *, final_state: bool = True
                      ) -> tuple[Tensor, KVCache | None]:
        """The final normed hidden states and, if `final_state`, the KV cache after them."""
        check_token_ids(input_ids, "input_ids", 2)
        state = state or KVCache([], 0)
        self._check_cache(state, input_ids.shape[0])
        positions = torch.arange(state.position, state.position + input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids)
        caches = []
        for i, block in enumerate(self.layers):
            cache = state.layers[i] if state.layers else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, cache, positions, use_reentrant=False)
            else:
                x, kv = block(x, cache, positions)
            caches.append(kv)
        return self.norm_f(x), KVCache(caches, state.position + input_ids.shape[1]) if final_state else None

    def step(self, token: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """token [B] -> (logits [B, V], cache); `state` None starts a sequence."""
        check_token_ids(token, "token", 1)
        logits, state = self(token[:, None], state)
        return logits[:, 0], state

    def _check_cache(self, cache: KVCache, batch_size: int) -> None:
        """Refuse, with the reason, a cache that another model, config or batch made: a longer one would be read in
        part, as if it were this model's. Shapes only (no device sync), of the first layer: all have the same."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"state must be the KVCache a TransformerLM returns (or its allocate_state makes), "
                            f"got {type(cache).__name__}")
        if not cache.layers:   # allocate_state's: nothing cached yet
            return
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"the state has {len(cache.layers)} layers and the model {len(self.layers)}: it comes "
                             f"from another model")
        k = cache.layers[0][0]
        if k.shape[0] != batch_size:
            raise ValueError(f"the state holds {k.shape[0]} sequences and the input {batch_size} (state.select picks "
                             f"some of a state's sequences)")
        heads = (self.config.n_head, self.config.d_model // self.config.n_head)
        if tuple(k.shape[2:]) != heads:
            raise ValueError(f"the state caches keys of {k.shape[2]} heads of width {k.shape[3]} where this model's "
                             f"config makes {heads[0]} of width {heads[1]}: it comes from a model with another config")
