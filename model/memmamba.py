"""MemMamba: a Mamba language model whose layers take notes and read them back.

    u     = RMSNorm(x)
    c_tok = I_state(u) * Attn(u, pool_l(t))                if I_state(u) > tau2
    c_lay = Attn(u, pool_{l-g+1}(t) .. pool_l(t))          on every p-th layer
    xbar  = fuse(u, c_tok, c_lay)
    x     = x + Mamba(xbar)

`forward(input_ids, state)` runs a whole chunk in parallel and returns the state after it;
`step(token, state)` runs one token in O(1). With `notes=False` every layer is plain Mamba.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import MemMambaConfig
from model.generation import GenerationMixin, check_token_ids
from model.lm_head import LMHead
from model.mixer import Mamba
from model.notes import MemoryAttention, NoteBlock, PoolView
from model.state import LayerState, ModelState


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # in fp32 whatever the compute dtype, the weight included: one fused kernel each way where torch has one
        out = F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps)
        return out.to(torch.promote_types(x.dtype, self.weight.dtype))


class MemMambaLayer(nn.Module):
    def __init__(self, config: MemMambaConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba(config)
        self.has_notes = config.notes
        self.has_cross_layer = config.has_cross_layer(layer_idx)
        self.span = config.cross_layer_span
        if self.has_notes:
            D, S, A = config.d_model, config.summary_dim, config.attn_dim
            self.fusion = config.fusion
            n_gates = 4 if config.fusion == "gated" else 2
            # Everything the memory reads from u, as one product (as in_proj packs Mamba's x and z): the gate
            # logits (I_token, I_state, and the fusion gates if gated), the note vectors N^l u and the
            # attentions' queries. u is read once, and the backward pass forms one gradient for it, not five.
            self.memory_in = nn.Linear(D, n_gates + S + A * (1 + self.has_cross_layer), bias=False)
            self.gate_bias = nn.Parameter(torch.zeros(n_gates))
            self.memory_split = [n_gates, S] + [A] * (1 + self.has_cross_layer)
            self.notes = NoteBlock(config)
            self.tau2 = config.tau2
            self.token_attention = MemoryAttention(S, A, D, config.attn_heads)
            if self.has_cross_layer:
                self.layer_attention = MemoryAttention(S, A, D, config.attn_heads)
            if config.fusion == "weighted":
                # Learned scalars, small but non-zero so every branch learns from step one.
                self.fusion_weight = nn.Parameter(torch.full((2,), 0.1))

    def forward(self, x: Tensor, state: LayerState | None, position: int, views: tuple[PoolView, ...],
                sp=None, final_state: bool = True) -> tuple[Tensor, LayerState | None, PoolView | None]:
        """x [B, T, D]; `state` None starts from the empty state; `views` are the earlier layers' pool
        views for these tokens. Without `final_state` no state is returned."""
        u = self.norm(x)
        view, notes = None, None
        if self.has_notes:
            gates, note, *queries = self._memory_inputs(u)
            view, notes = self.notes(gates[..., 0], note, None if state is None else state.notes, position, sp,
                                     final_state)
            u = self._read_memory(u, gates, queries, view, views)
        out, mixer = self.mixer(u, None if state is None else state.mixer, sp, final_state)
        return x + out, LayerState(mixer, notes) if final_state else None, view

    def step(self, x: Tensor, state: LayerState, position: int, views: tuple[PoolView, ...]
             ) -> tuple[Tensor, LayerState, PoolView | None]:
        """One token, x [B, D]."""
        u = self.norm(x)
        view, notes = None, None
        if self.has_notes:
            gates, note, *queries = self._memory_inputs(u[:, None])
            view, notes = self.notes.step(gates[:, 0, 0], note[:, 0], state.notes, position)
            u = self._read_memory(u[:, None], gates, queries, view, views)[:, 0]
        out, mixer = self.mixer.step(u, state.mixer)
        return x + out, LayerState(mixer, notes), view

    def _memory_inputs(self, u: Tensor) -> list[Tensor]:
        """u [B, T, D] -> [gates [B, T, n_gates] (sigmoids), notes [B, T, S], queries [B, T, A] per attention]."""
        gates, *rest = self.memory_in(u).split(self.memory_split, -1)
        return [torch.sigmoid(gates + self.gate_bias), *rest]

    def _read_memory(self, u: Tensor, gates: Tensor, queries: list[Tensor], view: PoolView,
                     views: tuple[PoolView, ...]) -> Tensor:
        """xbar = u + a_tok * c_tok + a_lay * c_lay, each weight applied inside its attention."""
        state_gate = gates[..., 1:2]                                      # I_state
        active = state_gate.detach() > self.tau2
        if self.fusion == "weighted":
            a_tok, a_lay = self.fusion_weight[0], self.fusion_weight[1]
        elif self.fusion == "gated":
            a_tok, a_lay = gates[..., 2:3], gates[..., 3:4]
        else:
            a_tok, a_lay = 1.0, None
        # `scale` by keyword: module hooks such as FlopCounterMode's see positional tensors, and a parameter's
        # element taken under no_grad (a_lay) is a tensor that requires grad yet has no grad_fn, which they reject.
        xbar = self.token_attention(queries[0], [view], u, scale=a_tok * state_gate * active)
        if self.has_cross_layer:
            xbar = self.layer_attention(queries[1], [*views, view][-self.span:], xbar, scale=a_lay)
        return xbar

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> LayerState:
        mixer = self.mixer.allocate_state(batch_size, device, dtype)
        if not self.has_notes:
            return LayerState(mixer, None)
        return LayerState(mixer, self.notes.allocate_state(batch_size, mixer.conv.device, mixer.conv.dtype))


class MemMambaLM(GenerationMixin, nn.Module):
    def __init__(self, config: MemMambaConfig):
        super().__init__()
        config.check()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MemMambaLayer(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        # As mamba_ssm: zero biases (except dt's), N(0, 0.02) embeddings, and output
        # projections scaled by 1/sqrt(n_layer) so the residual stream keeps its scale.
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, Mamba):
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                module.out_proj.weight /= math.sqrt(self.config.n_layer)

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        return ModelState([layer.allocate_state(batch_size, device, dtype) for layer in self.layers], 0)

    def forward(self, input_ids: Tensor, state: ModelState | None = None, *, sp=None
                ) -> tuple[Tensor, ModelState]:
        """input_ids [B, T] -> (logits [B, T, V], state after the last token)."""
        hidden, state = self.hidden_states(input_ids, state, sp=sp)
        return self.lm_head(hidden), state

    def hidden_states(self, input_ids: Tensor, state: ModelState | None = None, *, sp=None, final_state: bool = True
                      ) -> tuple[Tensor, ModelState | None]:
        """The final normed hidden states [B, T, D] (what the LM head reads) and, if `final_state`, the state.

        Without the state (a training forward over whole sequences) the kernels fuse more. `sp` and `final_state` by
        keyword, as the Transformer baseline takes `final_state`.
        """
        check_token_ids(input_ids, "input_ids", 2)
        if state is not None and sp is None:
            self._check_state(state, input_ids.shape[0])
        if sp is not None:
            position = sp.start_position(input_ids.shape[1])
        else:
            position = 0 if state is None else state.position
        # At position 0 the state is the empty one: no state at all spares the kernels its term and the
        # notes their merge with it. With `sp` the state comes from the earlier ranks instead.
        carried = state.layers if state is not None and position > 0 and sp is None else [None] * len(self.layers)
        x = self.embedding(input_ids)
        views: tuple[PoolView, ...] = ()   # immutable: checkpointing recomputes with what it was given
        layer_states = []
        for layer, layer_state in zip(self.layers, carried):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, new_state, view = checkpoint(layer, x, layer_state, position, views, sp, final_state,
                                                use_reentrant=False)
            else:
                x, new_state, view = layer(x, layer_state, position, views, sp, final_state)
            layer_states.append(new_state)
            views = self._recent_views(views, view)
        return self.norm_f(x), ModelState(layer_states, position + input_ids.shape[1]) if final_state else None

    def step(self, token: Tensor, state: ModelState | None) -> tuple[Tensor, ModelState]:
        """token [B] -> (logits [B, V], state). Constant time and memory per token; `state` None starts a sequence."""
        check_token_ids(token, "token", 1)
        if state is None:
            state = self.allocate_state(token.shape[0], token.device)
        self._check_state(state, token.shape[0])
        x = self.embedding(token)
        views: tuple[PoolView, ...] = ()
        layer_states = []
        for layer, layer_state in zip(self.layers, state.layers):
            x, new_state, view = layer.step(x, layer_state, state.position, views)
            layer_states.append(new_state)
            views = self._recent_views(views, view)
        return self.lm_head(self.norm_f(x)), ModelState(layer_states, state.position + 1)

    def _check_state(self, state: ModelState, batch_size: int) -> None:
        """Refuse, with the reason, a state that another model, config or batch made: it would fail deep inside a
        layer, or not at all (given a state of fewer layers, the model would run only that many of its own). Shapes
        only, which needs no device sync, and of the first layer only: every layer's state has the same shapes."""
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be the ModelState a MemMambaLM returns (or its allocate_state makes), "
                            f"got {type(state).__name__}")
        if len(state.layers) != len(self.layers):
            raise ValueError(f"the state has {len(state.layers)} layers and the model {len(self.layers)}: it comes "
                             f"from another model")
        first, c = state.layers[0], self.config
        rows = first.mixer.ssm.shape[0]
        if rows != batch_size:
            raise ValueError(f"the state holds {rows} sequences and the input {batch_size} (state.select picks "
                             f"some of a state's sequences)")
        if (first.notes is not None) != c.notes:
            raise ValueError(f"the state is that of a model with notes {'off' if first.notes is None else 'on'} "
                             f"and this model has them {'on' if c.notes else 'off'}")
        shapes = {"conv [B, d_inner, d_conv - 1]": (first.mixer.conv.shape, (rows, c.d_inner, c.d_conv - 1)),
                  "ssm [B, d_inner, d_state]": (first.mixer.ssm.shape, (rows, c.d_inner, c.d_state))}
        if c.notes:
            shapes["notes [B, pool_size, summary_dim]"] = (first.notes.notes.shape, (rows, c.pool_size, c.summary_dim))
        for name, (shape, want) in shapes.items():
            if tuple(shape) != want:
                raise ValueError(f"the state has {name} of shape {list(shape)} where this model's config makes "
                                 f"{list(want)}: it comes from a model with another config")
        # a whole state cast to a float dtype (state.map(lambda t: t.to(torch.bfloat16))) rounds the window
        # indices, which would then evict or keep the wrong notes without an error
        if c.notes and first.notes.window.dtype != torch.long:
            raise ValueError(f"the state's note window indices are {first.notes.window.dtype}, not torch.long: cast "
                             f"only its floating-point tensors")

    def _recent_views(self, views: tuple[PoolView, ...], view: PoolView | None) -> tuple[PoolView, ...]:
        """The pool views a later layer may read: the last cross_layer_span - 1 (it adds its own).

        Keeping no more also gives a compiled layer one length of tuple to specialise on, not one per depth.
        """
        if view is None:
            return views
        keep = self.config.cross_layer_span - 1
        return (*views, view)[-keep:] if keep else ()
