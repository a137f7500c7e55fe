"""Model configurations: plain dataclasses, loaded from the `model` section of a JSON config.

A section may name a preset size (`"size": "200m"`) and override any field of it.
Unknown keys and out-of-range values raise `ConfigError` with a message that names the
key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range."""


@dataclass
class MemMambaConfig:
    # backbone (Mamba-1 layout)
    d_model: int = 64
    n_layer: int = 4
    vocab_size: int = 1024
    d_state: int = 8
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | Literal["auto"] = "auto"   # "auto" = ceil(d_model / 16), as mamba_ssm
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    backend: Literal["auto", "torch", "cuda"] = "auto"
    # memory (see ../shared/docs/memmamba-design.md); notes=False gives plain Mamba
    notes: bool = True
    summary_dim: int = 64          # S
    pool_size: int = 50            # K
    note_window: int = 64          # W, tokens per note
    tau1: float = 0.5              # a token enters its window's note if I_token > tau1
    tau2: float = 0.5              # cross-token attention fires if I_state > tau2
    pool_policy: Literal["fifo", "priority"] = "fifo"
    pooling: Literal["max", "mean"] = "max"
    cross_layer_every: int = 4     # p: layers l with l % p == 0 (1-based) attend across layers
    cross_layer_span: int = 4      # g: over the pools of the last g layers
    fusion: Literal["weighted", "gated", "residual"] = "weighted"
    attn_dim: int = 256            # inner width of the note attentions
    attn_heads: int = 4

    arch = "memmamba"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ConfigError for the first bad field. Runs when the config is made and again when a model is built
        from it: the fields of a config may have been set since."""
        _check_types(self)
        positive = ["d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                    "summary_dim", "pool_size", "note_window", "cross_layer_every",
                    "cross_layer_span", "attn_dim", "attn_heads"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        _check_positive_numbers(self, ["norm_eps"])
        if self.dt_rank != "auto" and self.dt_rank <= 0:
            raise ConfigError(f"model.dt_rank must be 'auto' or a positive integer, got {self.dt_rank}")
        for key in ("tau1", "tau2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} is a threshold on a sigmoid and must lie in [0, 1), "
                                  f"got {getattr(self, key)}")
        if self.attn_dim % self.attn_heads:
            raise ConfigError(f"model.attn_dim ({self.attn_dim}) must be divisible by "
                              f"model.attn_heads ({self.attn_heads})")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    def has_cross_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (0-based) attends across layers: l % p == 0 with 1-based l."""
        return self.notes and (layer_idx + 1) % self.cross_layer_every == 0


@dataclass
class TransformerConfig:
    """GPT-style baseline: pre-norm blocks, rotary positions, tied embeddings."""
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    vocab_size: int = 1024
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    arch = "transformer"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """As MemMambaConfig.check."""
        _check_types(self)
        for key in ("d_model", "n_layer", "n_head", "vocab_size", "mlp_ratio"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        _check_positive_numbers(self, ["rope_base", "norm_eps"])
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ConfigError(f"model.d_model ({self.d_model}) must split into model.n_head "
                              f"({self.n_head}) heads of even width")


# Named sizes. "130m" is the layout of state-spaces/mamba-130m (plain Mamba, so that its
# weights import as they are); "200m" is the paper's MemMamba.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "memmamba": {
        "tiny": dict(d_model=64, n_layer=4, d_state=8, vocab_size=1024, summary_dim=32,
                     pool_size=8, note_window=16, attn_dim=64, attn_heads=2,
                     cross_layer_every=2, cross_layer_span=2),
        "130m": dict(d_model=768, n_layer=24, d_state=16, vocab_size=50280, notes=False),
        "200m": dict(d_model=1024, n_layer=24, d_state=16, vocab_size=32000),
    },
    "transformer": {
        "tiny": dict(d_model=64, n_layer=4, n_head=4, vocab_size=1024),
        "130m": dict(d_model=768, n_layer=12, n_head=12, vocab_size=50280),
        "200m": dict(d_model=1024, n_layer=14, n_head=16, vocab_size=32000),
    },
}
ARCHS = {"memmamba": MemMambaConfig, "transformer": TransformerConfig}


def model_config_from_dict(section: dict[str, Any]) -> MemMambaConfig | TransformerConfig:
    """Build a config from a JSON `model` section: {"arch": ..., "size": ..., **overrides}."""
    if not isinstance(section, dict):
        raise ConfigError(f"the model section must be a JSON object, got {section!r}")
    section = dict(section)
    arch = section.pop("arch", "memmamba")
    if not isinstance(arch, str) or arch not in ARCHS:   # (a list would not even hash)
        raise ConfigError(f"model.arch must be one of {sorted(ARCHS)}, got {arch!r}")
    cls = ARCHS[arch]
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if "size" in section:
        size = section.pop("size")
        if not isinstance(size, str) or size not in SIZES[arch]:
            raise ConfigError(f"model.size must be one of {sorted(SIZES[arch])} for arch "
                              f"{arch!r}, got {size!r}")
        values.update(SIZES[arch][size])
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"unknown key model.{unknown[0]} for arch {arch!r}; "
                          f"allowed: arch, size, {', '.join(sorted(fields))}")
    values.update(section)
    return cls(**values)


def model_config_to_dict(config: MemMambaConfig | TransformerConfig) -> dict[str, Any]:
    return {"arch": config.arch, **dataclasses.asdict(config)}


def _check_positive_numbers(config, keys: list[str]) -> None:
    for key in keys:
        value = getattr(config, key)
        # NaN fails the comparison too. At 0 or below, norm_eps (under a square root) and rope_base (raised to a
        # negative power) give inf or NaN outputs, not an error; at inf, a norm of zeros and rotations by 0.
        if not 0 < value < math.inf:
            raise ConfigError(f"model.{key} must be a finite positive number, got {value}")


def _check_types(config) -> None:
    hints = get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not matches_type(value, hints[field.name]):
            raise ConfigError(f"model.{field.name} must be {describe_type(hints[field.name])}, got {value!r}")


def matches_type(value, hint) -> bool:
    """Whether a JSON value fits a type hint (Literal, unions, list[...], None, int, float, ...)."""
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, UnionType):
        return any(matches_type(value, arg) for arg in get_args(hint))
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(matches_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint) -> str:
    """A type hint in words, for error messages."""
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, UnionType):
        return " or ".join(describe_type(a) for a in get_args(hint))
    if origin is list:
        return f"a list of {describe_type(get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return {dict: "a JSON object", str: "a string", bool: "true or false", int: "an integer",
            float: "a number"}[hint]
