"""Building models from configs, and saving/loading trained weights without DeepSpeed.

An exported model is a folder with `model.safetensors` and `config.json` (the `model`
section of the training config, plus whatever metadata the exporter adds, e.g. the
tokenizer's checksum). `load_pretrained(folder)` gives back the model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import (ConfigError, MemMambaConfig, TransformerConfig, model_config_from_dict,
                          model_config_to_dict)
from model.memmamba import MemMambaLM
from model.transformer import TransformerLM


def build_model(config: MemMambaConfig | TransformerConfig | dict[str, Any]) -> nn.Module:
    if isinstance(config, dict):
        config = model_config_from_dict(config)
    if not isinstance(config, (MemMambaConfig, TransformerConfig)):
        raise TypeError("build_model takes a MemMambaConfig, a TransformerConfig or a dict such as "
                        f"{{'arch': 'memmamba', 'size': 'tiny'}}, got {config!r}")
    return MemMambaLM(config) if isinstance(config, MemMambaConfig) else TransformerLM(config)


def save_pretrained(model: nn.Module, folder: str | Path, metadata: dict[str, Any] | None = None,
                    files: tuple[str | Path, ...] = ()) -> None:
    """Write `model.safetensors` and `config.json` (plus copies of `files`) into `folder`.

    Each file is written beside the folder's others and then moved in whole: an interrupted save leaves no
    half-written file, and the files a save replaces stay readable until then."""
    model = getattr(model, "_orig_mod", model)   # torch.compile(model)'s weights are the model's, under a prefix
    if "model" in (metadata or {}):
        raise ValueError("metadata cannot hold \"model\": config.json's \"model\" section is the model's config")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        # Tied weights are stored once; safetensors refuses shared storage.
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if not (model.config.tie_embeddings and k == "lm_head.weight")}
        save_file(tensors, str(staging / "model.safetensors"))
        # safetensors writes its file owner-only (0600); an export is for others to load too, so it gets what any
        # new file gets under the umask, as config.json does.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging / "model.safetensors", 0o666 & ~umask)
        info = {"model": model_config_to_dict(model.config), **(metadata or {})}
        (staging / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        for file in files:
            shutil.copy(file, staging / Path(file).name)
        for file in sorted(staging.iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; an exported model folder holds "
                                    "config.json and model.safetensors")
    info = json.loads((folder / "config.json").read_text())
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise ValueError(f"{folder / 'config.json'}: no \"model\" section (the model's settings)")
    try:
        model = build_model(info["model"])
    except ConfigError as error:   # its message names the setting, not the file
        raise ConfigError(f"{folder / 'config.json'}: {error}") from None
    tensors = load_file(str(folder / "model.safetensors"), device=str(device))
    # Named here: load_state_dict's own error says only which tensors, not that config.json disagrees.
    ours = model.state_dict()
    for name, tensor in tensors.items():
        if name in ours and tensor.shape != ours[name].shape:
            raise ValueError(f"{folder / 'model.safetensors'}: {name} has shape {list(tensor.shape)}, its "
                             f"config.json makes {list(ours[name].shape)}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder / 'model.safetensors'}: does not match its config.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)
