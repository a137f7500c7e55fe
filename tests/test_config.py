"""Bad model configs raise one clear ConfigError that names the key."""
import dataclasses
from typing import get_type_hints

import pytest

from model import ConfigError, MemMambaConfig, MemMambaLM, TransformerLM, build_model, model_config_from_dict
from model.config import ARCHS


@pytest.mark.parametrize("section, message", [
    ({"d_modle": 64}, "unknown key model.d_modle"),
    ({"summary_dim": 0}, "model.summary_dim must be a positive integer, got 0"),
    ({"summary_dim": -3}, "model.summary_dim must be a positive integer, got -3"),
    ({"pool_size": 0}, "model.pool_size must be a positive integer, got 0"),
    ({"pool_policy": "lru"}, "model.pool_policy must be one of 'fifo', 'priority', got 'lru'"),
    ({"fusion": "sum"}, "model.fusion must be one of 'weighted', 'gated', 'residual'"),
    ({"pooling": "avg"}, "model.pooling must be one of 'max', 'mean'"),
    ({"tau1": 1.5}, "model.tau1 is a threshold on a sigmoid"),
    # a sigmoid never reaches 1 (no token would pass) and is never below 0 (every token would)
    ({"tau2": 1.0}, "model.tau2 is a threshold on a sigmoid and must lie in [0, 1), got 1.0"),
    ({"tau1": -0.1}, "model.tau1 is a threshold on a sigmoid and must lie in [0, 1), got -0.1"),
    ({"dt_rank": 0}, "model.dt_rank must be 'auto' or a positive integer, got 0"),
    # JSON true is not 1: bool is a subclass of int in Python
    ({"d_model": True}, "model.d_model must be an integer, got True"),
    ({"tau1": True}, "model.tau1 must be a number, got True"),
    ({"arch": "transformer", "d_model": 12, "n_head": 4},
     "model.d_model (12) must split into model.n_head (4) heads of even width"),
    ({"notes": "yes"}, "model.notes must be true or false, got 'yes'"),
    ({"d_model": 64.5}, "model.d_model must be an integer, got 64.5"),
    ({"dt_rank": "big"}, "model.dt_rank must be an integer or one of 'auto', got 'big'"),
    ({"attn_dim": 30, "attn_heads": 4}, "model.attn_dim (30) must be divisible by model.attn_heads (4)"),
    ({"size": "7b"}, "model.size must be one of ['130m', '200m', 'tiny']"),
    ({"arch": "rwkv"}, "model.arch must be one of ['memmamba', 'transformer']"),
    ({"arch": "transformer", "pool_size": 4}, "unknown key model.pool_size for arch 'transformer'"),
    ({"size": ["tiny"]}, "model.size must be one of ['130m', '200m', 'tiny'] for arch 'memmamba', got ['tiny']"),
    ({"arch": ["memmamba"]}, "model.arch must be one of ['memmamba', 'transformer'], got ['memmamba']"),
    ({"norm_eps": 0}, "model.norm_eps must be a finite positive number, got 0"),
    ({"norm_eps": float("nan")}, "model.norm_eps must be a finite positive number, got nan"),
    ({"arch": "transformer", "norm_eps": -1e-5}, "model.norm_eps must be a finite positive number, got -1e-05"),
    ({"arch": "transformer", "rope_base": 0}, "model.rope_base must be a finite positive number, got 0"),
    # every logit 0, and rotary positions that move only one pair of channels
    ({"norm_eps": float("inf")}, "model.norm_eps must be a finite positive number, got inf"),
    ({"arch": "transformer", "rope_base": float("inf")}, "model.rope_base must be a finite positive number, got inf"),
])
def test_bad_model_config(section, message):
    with pytest.raises(ConfigError) as error:
        model_config_from_dict(section)
    assert message in str(error.value)


@pytest.mark.parametrize("arch, key", [(arch, f.name) for arch, cls in ARCHS.items() for f in dataclasses.fields(cls)
                                       if get_type_hints(cls)[f.name] is int])
def test_every_integer_size_must_be_positive(arch, key):
    with pytest.raises(ConfigError, match=f"model.{key} must be a positive integer, got 0"):
        model_config_from_dict({"arch": arch, key: 0})


def test_defaults_are_the_designs():
    """The design's defaults: notes on, max pooling, a FIFO pool, weighted fusion (the paper's best)."""
    config = MemMambaConfig()
    assert (config.notes, config.pooling, config.pool_policy, config.fusion) == (True, "max", "fifo", "weighted")


def test_size_preset_with_overrides():
    config = model_config_from_dict({"size": "200m", "pool_policy": "priority", "note_window": 32})
    assert (config.d_model, config.n_layer, config.summary_dim, config.pool_size) == (1024, 24, 64, 50)
    assert config.pool_policy == "priority" and config.note_window == 32
    assert isinstance(config, MemMambaConfig)


def test_cross_layer_every_p_layers_counted_from_one():
    config = MemMambaConfig(n_layer=8, cross_layer_every=4)
    assert [i for i in range(8) if config.has_cross_layer(i)] == [3, 7]
    plain = MemMambaConfig(n_layer=8, cross_layer_every=4, notes=False)     # plain Mamba reads no notes
    assert not any(plain.has_cross_layer(i) for i in range(8))


@pytest.mark.parametrize("arch, key, value, message", [
    # each used to build a model without an error: 'sum' pooling summed the notes, 'lifo' kept the newest
    ("memmamba", "pooling", "sum", "model.pooling must be one of 'max', 'mean', got 'sum'"),
    ("memmamba", "pool_policy", "lifo", "model.pool_policy must be one of 'fifo', 'priority', got 'lifo'"),
    ("memmamba", "pool_size", 0, "model.pool_size must be a positive integer, got 0"),
    ("memmamba", "attn_heads", 3, r"model.attn_dim \(256\) must be divisible by model.attn_heads \(3\)"),
    ("transformer", "n_head", 3, r"model.d_model \(64\) must split into model.n_head \(3\) heads"),
])
def test_a_config_changed_after_it_was_made_is_checked_when_a_model_is_built(arch, key, value, message):
    config = model_config_from_dict({"arch": arch})
    setattr(config, key, value)
    for build in (build_model, {"memmamba": MemMambaLM, "transformer": TransformerLM}[arch]):
        with pytest.raises(ConfigError, match=message):
            build(config)


@pytest.mark.parametrize("config", ["tiny", None, MemMambaConfig])
def test_build_model_names_what_it_takes(config):
    with pytest.raises(TypeError, match="build_model takes a MemMambaConfig, a TransformerConfig or a dict"):
        build_model(config)


def test_a_model_section_that_is_not_an_object_is_refused():
    with pytest.raises(ConfigError, match="the model section must be a JSON object, got 'tiny'"):
        model_config_from_dict("tiny")
