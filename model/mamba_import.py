"""Warm-start from public Mamba-1 checkpoints in mamba_ssm's format.

mamba_ssm's `MambaLMHeadModel` names its weights `backbone.embedding.weight`,
`backbone.layers.N.mixer.*`, `backbone.layers.N.norm.weight`, `backbone.norm_f.weight`
and `lm_head.weight`; our layers use the same names without `backbone.`. A plain Mamba
(notes off) takes every weight; a MemMamba takes the backbone and keeps its freshly
initialised note parameters.

    python -m model.mamba_import --weights pytorch_model.bin --config config.json --out exports/mamba-130m
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from typing import Any

import torch

from model.config import ConfigError, MemMambaConfig
from model.memmamba import MemMambaLM
from model.pretrained import save_pretrained


def config_from_mamba_ssm(hf_config: dict[str, Any], **overrides) -> MemMambaConfig:
    """A plain-Mamba config from mamba_ssm's config.json (e.g. state-spaces/mamba-130m).

    residual_in_fp32 and fused_add_norm are ignored: in fp32 they compute what this model computes."""
    hf_config = hf_config if isinstance(hf_config, dict) else {}
    missing = [key for key in ("d_model", "n_layer", "vocab_size") if key not in hf_config]
    if missing:   # e.g. transformers' MambaConfig (hidden_size, num_hidden_layers) of the *-hf repositories
        raise ConfigError(f"no {missing[0]!r}: not a mamba_ssm config.json")
    ssm = hf_config.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ConfigError(f"only Mamba-1 checkpoints can be imported, this one has ssm_cfg.layer={ssm['layer']!r}")
    # Options of mamba_ssm that add weights or change the equations of this stack's Mamba-1 layer.
    unsupported = {"rms_norm=false (LayerNorm)": not hf_config.get("rms_norm", True),
                   f"d_intermediate={hf_config.get('d_intermediate')} (an MLP per layer)":
                       bool(hf_config.get("d_intermediate")),
                   f"attn_layer_idx={hf_config.get('attn_layer_idx')} (attention layers)":
                       bool(hf_config.get("attn_layer_idx")),
                   "ssm_cfg.bias=true": ssm.get("bias", False),
                   "ssm_cfg.conv_bias=false": not ssm.get("conv_bias", True)}
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ConfigError(f"{found[0]}: not part of this stack's Mamba-1 layout, so it cannot be imported")
    multiple = hf_config.get("pad_vocab_size_multiple", 8)
    vocab = math.ceil(hf_config["vocab_size"] / multiple) * multiple
    values = dict(d_model=hf_config["d_model"], n_layer=hf_config["n_layer"], vocab_size=vocab,
                  d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4),
                  expand=ssm.get("expand", 2), dt_rank=ssm.get("dt_rank", "auto"),
                  tie_embeddings=hf_config.get("tie_embeddings", True), notes=False)
    values.update(overrides)
    return MemMambaConfig(**values)


def load_mamba_ssm_state_dict(model: MemMambaLM, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy a mamba_ssm state dict into `model`. Returns the names left as initialised."""
    ours = model.state_dict()
    renamed = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    if "embedding.weight" not in renamed:
        raise ConfigError("checkpoint lacks 'backbone.embedding.weight': not a mamba_ssm MambaLMHeadModel state dict")
    head = renamed.pop("lm_head.weight", None) if model.config.tie_embeddings else None
    # Tied, mamba_ssm's head is its embedding: a head of its own is an untied model's, and dropping it would
    # change every logit.
    if head is not None and not torch.equal(head, renamed["embedding.weight"]):
        raise ConfigError("lm_head.weight differs from backbone.embedding.weight: an untied checkpoint, "
                          "whose config.json needs \"tie_embeddings\": false")
    vocab = renamed["embedding.weight"].shape[0]
    if vocab != model.config.vocab_size:
        raise ConfigError(f"vocabulary mismatch: the checkpoint has {vocab} embedding rows, "
                          f"model.vocab_size is {model.config.vocab_size}")
    unexpected = sorted(set(renamed) - set(ours))
    if unexpected:
        raise ConfigError(f"checkpoint key {unexpected[0]!r} has no counterpart in this model "
                          f"(n_layer={model.config.n_layer}); is it a Mamba-1 checkpoint?")
    for name, tensor in renamed.items():
        if tensor.shape != ours[name].shape:
            raise ConfigError(f"checkpoint {name} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(ours[name].shape)}")
    missing = sorted(k for k in set(ours) - set(renamed)
                     if not (model.config.tie_embeddings and k == "lm_head.weight"))
    backbone_missing = [k for k in missing if not _is_memory_param(k)]
    if backbone_missing:
        raise ConfigError(f"checkpoint lacks {backbone_missing[0]!r}")
    model.load_state_dict(renamed, strict=False)
    return missing


def _is_memory_param(name: str) -> bool:
    return any(part in name for part in (".memory_in.", ".gate_bias", ".token_attention.", ".layer_attention.",
                                         ".fusion_weight"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.mamba_import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="mamba_ssm pytorch_model.bin")
    parser.add_argument("--config", required=True, help="mamba_ssm config.json")
    parser.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    parser.add_argument("--notes", action="store_true", help="import into a MemMamba (notes on)")
    args = parser.parse_args(argv)
    try:
        with open(args.config) as f:
            config = config_from_mamba_ssm(json.load(f), notes=args.notes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _fail(args.config, f"not a JSON file ({e})")
    except (OSError, ConfigError) as e:
        return _fail(args.config, e)
    model = MemMambaLM(config)
    try:
        state_dict = torch.load(args.weights, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError):   # what torch.load raises on other files
        state_dict = None
    except OSError as e:
        return _fail(args.weights, e)
    if not isinstance(state_dict, dict):
        return _fail(args.weights, "not a PyTorch state dict (such as mamba_ssm's pytorch_model.bin)")
    try:
        fresh = load_mamba_ssm_state_dict(model, state_dict)
    except ConfigError as e:
        return _fail(args.weights, e)
    try:
        save_pretrained(model, args.out, {"imported_from": args.weights})
    except OSError as e:
        return _fail(args.out, e)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(fresh)} newly initialised tensors)")
    return 0


def _fail(path: str, problem: Exception | str) -> int:
    if isinstance(problem, OSError) and problem.strerror:   # its str() repeats the path
        problem = problem.strerror
    print(f"error: {path}: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
