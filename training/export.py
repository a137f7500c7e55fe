"""Trained weights out of a training checkpoint, for use without DeepSpeed.

    python -m training.export runs/200m_8k/checkpoints/step-00100000 exports/200m_8k
    python -m training.export runs/200m_8k/checkpoints exports/200m_8k        # the latest checkpoint

writes `model.safetensors` + `config.json` (the model section, plus step, tokens seen and the tokenizer's
checksum) + `tokenizer.model`, which `model.load_pretrained` loads. `load_model` takes an export folder, a
checkpoint or a folder of checkpoints, so evaluation runs on anything the training stack writes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from data_pipeline.storage import local_folder_problem, outermost_new_folder
from model import ConfigError, build_model, load_pretrained, save_pretrained
from training.checkpoint import DAMAGED_TORCH_FILE, META, CheckpointError, complete_checkpoints, read_meta


def export(checkpoint_dir: str | Path, out_folder: str | Path) -> Path:
    if not str(out_folder):   # as Path, the working folder: an unset variable in a script would export there
        raise CheckpointError("the folder to export to is an empty path")
    if (Path(checkpoint_dir) / "model.safetensors").is_file() and not (Path(checkpoint_dir) / META).is_file():
        raise CheckpointError(f"{checkpoint_dir}: already an exported model; copy the folder instead")
    path = _checkpoint(Path(checkpoint_dir))
    meta = read_meta(path)
    out = Path(out_folder)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: a file, not a folder to export to")
    # In a checkpoint, the export would go when training prunes old checkpoints; in a folder of checkpoints,
    # load_model would take it for that folder's latest checkpoint from then on.
    where = out.resolve()
    for folder in (where, *where.parents):
        if (folder / META).is_file() or complete_checkpoints(folder):
            raise CheckpointError(f"{out}: inside training checkpoints ({folder}); export to a folder of its own")
    problem = local_folder_problem(out)
    if problem:
        raise CheckpointError(f"{out}: cannot be made ({problem})")
    model = _load_checkpoint(path, meta)
    tokenizer = path / "tokenizer.model"
    made = outermost_new_folder(out)
    try:
        save_pretrained(model, out, metadata={
            "step": meta["state"]["step"],
            "tokens_seen": meta["state"]["tokens_seen"],
            "tokenizer_checksum": meta["tokenizer_checksum"],
            "checkpoint": str(path),
        }, files=(tokenizer,) if tokenizer.is_file() else ())
    except BaseException:   # Ctrl-C, a full disk: an export that does not finish leaves no folder it made
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return out


# What the readers raise on a truncated, corrupt or missing file: torch.load's, safetensors', JSON's.
DAMAGED = (*DAMAGED_TORCH_FILE, SafetensorError, json.JSONDecodeError, UnicodeDecodeError)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The fp32 model of an export folder, a checkpoint, or the latest checkpoint of a folder of them."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        try:
            return load_pretrained(path, device)
        except DAMAGED as error:
            raise _damaged(path, error) from None
    path = _checkpoint(path)
    return _load_checkpoint(path, read_meta(path)).to(device)


def trained_tokenizer_checksum(path: str | Path) -> str | None:
    """The checksum of the tokenizer that the weights at `path` (as for load_model) were trained with."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        try:
            return json.loads((path / "config.json").read_text()).get("tokenizer_checksum")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({error})") from None
    return read_meta(_checkpoint(path))["tokenizer_checksum"]


def _checkpoint(path: Path) -> Path:
    if (path / META).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        if not path.exists():
            raise CheckpointError(f"{path}: no such folder")
        if complete_checkpoints(path / "checkpoints"):   # a run's output_dir
            raise CheckpointError(f"{path}: a training run; its checkpoints are in {path / 'checkpoints'}")
        raise CheckpointError(f"{path}: neither an exported model (model.safetensors), a checkpoint ({META}) "
                              "nor a folder of checkpoints")
    return found[-1]


def _load_checkpoint(path: Path, meta: dict) -> nn.Module:
    try:
        model = build_model(meta["model"])
    except ConfigError as error:   # its message names the setting, not the file
        raise CheckpointError(f"{path / META}: {error}") from None
    try:
        if meta["zero_stage"] == 3:  # the weights exist only as the optimizer's fp32 partitions
            # (imported here: deepspeed takes seconds to import, and only ZeRO-3 checkpoints need it)
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        else:  # parameters are fp32 throughout, so the module's state is the master weights
            state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    except DAMAGED as error:
        raise _damaged(path, error) from None
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()}   # training/loss.py
    try:
        model.load_state_dict(state)
    except RuntimeError as error:   # the first line is "Error(s) in loading state_dict ...:", the next says which
        detail = str(error).splitlines()[1].strip()
        raise CheckpointError(f"{path}: weights do not match its model section ({detail})") from None
    return model


def _damaged(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: cannot load the model ({str(error).strip().splitlines()[0]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (step-*), or a folder of them (the latest is used)")
    parser.add_argument("out", help="the folder to write model.safetensors, config.json and tokenizer.model to")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
