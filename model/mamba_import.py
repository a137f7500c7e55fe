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
import sys
from typing import Any

import torch

from model.config import ConfigError, MemMambaConfig
from model.memmamba import MemMambaLM
from model.pretrained import save_pretrained


def config_from_mamba_ssm(hf_config: dict[str, Any], **overrides) -> MemMambaConfig:
    """A plain-Mamba config from mamba_ssm's config.json (e.g. state-spaces/mamba-130m)."""
    ssm = hf_config.get("ssm_cfg", {})
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ConfigError(f"only Mamba-1 checkpoints can be imported, this one has ssm_cfg.layer={ssm['layer']!r}")
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
    if model.config.tie_embeddings:
        renamed.pop("lm_head.weight", None)
    vocab = renamed.get("embedding.weight", torch.empty(0, 0)).shape[0]
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="mamba_ssm pytorch_model.bin")
    parser.add_argument("--config", required=True, help="mamba_ssm config.json")
    parser.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    parser.add_argument("--notes", action="store_true", help="import into a MemMamba (notes on)")
    args = parser.parse_args(argv)
    try:
        with open(args.config) as f:
            config = config_from_mamba_ssm(json.load(f), notes=args.notes)
        model = MemMambaLM(config)
        fresh = load_mamba_ssm_state_dict(model, torch.load(args.weights, map_location="cpu", weights_only=True))
    except (OSError, ConfigError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_pretrained(model, args.out, {"imported_from": args.weights})
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(fresh)} newly initialised tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
