"""Checkpoints: atomic, complete, resumable on the same or another number of ranks.

    <output_dir>/checkpoints/
        step-00001000/               one complete checkpoint
            mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   (DeepSpeed's engine state)
            rank-00000.pt, ...        per rank: RNG states and that rank's place in the data stream
            meta.json                 step, samples and tokens seen, world size, parameter shapes, config
            universal/                made on demand: the same state, independent of the number of ranks
        .partial-step-00002000/       a save in progress (or one a crash interrupted; removed at the next start)

Every rank writes into `.partial-<name>`; once all have finished, rank 0 writes meta.json and renames the
folder to its final name. A rename is atomic, so a checkpoint folder without the `.partial-` prefix is
always complete, and a crash during a save leaves the previous checkpoint as the latest one.

DeepSpeed keeps `client_state` from rank 0 only, so each rank's own state goes into its own rank file.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.stream import ignore_stop_signals
from training.distributed import raise_on_every_rank

FORMAT = "memmamba-checkpoint/1"
META = "meta.json"
PARTIAL = ".partial-"


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from: missing, incomplete, or of another model or tokenizer."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / META).is_file())


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: `resume` is "auto" (the latest under root, if any), "never" or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META}); "
                              f"complete ones under {root}: {[p.name for p in complete_checkpoints(root)]}")
    return path


def check_no_later(root: Path, step: int) -> None:
    """Refuse to start a run at `step` where root holds checkpoints of later steps: those of another run
    (checkpoint.resume=never), or the abandoned future of a rollback to an earlier checkpoint. The run's saves
    would overwrite some of them and be pruned in favour of others, and a later resume=auto would pick one.
    Incomplete ones count too (a copy under way, a meta.json deleted): a save cannot take the name of a folder."""
    later = sorted(p.name for p in root.glob("step-*") if p.name[5:].isdigit() and int(p.name[5:]) > step)
    if later:
        raise CheckpointError(f"{root}: holds checkpoints after step {step} ({', '.join(later)}), which this run's "
                              f"saves would mix with; move or delete them, or use another output_dir")


# What training's save_checkpoint writes into meta.json besides the format: a reader may read any of them.
META_KEYS = ("state", "world_size", "zero_stage", "global_batch_size", "model", "parameter_shapes",
             "tokenizer_checksum", "data_stream", "config")


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path / META}: not valid JSON ({error})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{path / META}: format {found!r}, expected {FORMAT!r}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:   # edited by hand
        raise CheckpointError(f"{path / META}: no {', '.join(missing)}")
    return meta


def check_files(path: Path, meta: dict) -> None:
    """Refuse a checkpoint with a file missing or truncated, on every rank before any loads (collective): a rank
    that met it alone while loading would leave the others waiting for it. Rank 0 looks at the files, named as
    DeepSpeed names them for the checkpoint's ZeRO stage."""
    problem = None
    if dist.get_rank() == 0:
        ranks, stage = range(meta["world_size"]), meta["zero_stage"]
        names = [f"rank-{rank:05d}.pt" for rank in ranks]
        if stage == 3:
            names += [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in ranks]
        else:
            names.append("mp_rank_00_model_states.pt")
        if stage > 0:
            names += [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in ranks]
        # torch.save writes a zip, whose directory is at the end; is_zipfile is False for a missing file too
        damaged = next((name for name in names if not zipfile.is_zipfile(path / name)), None)
        if damaged is not None:
            problem = _damaged(path, f"{damaged} is {'truncated' if (path / damaged).is_file() else 'missing'}")
    raise_on_every_rank(problem, CheckpointError)


def _damaged(path: Path, detail: str) -> str:
    return f"{path}: damaged ({detail}); move it out of {path.parent} to resume from the checkpoint before it"


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def check_compatible(path: Path, meta: dict, current: dict[str, list[int]], current_model: dict,
                     tokenizer_checksum: str) -> None:
    """Refuse a checkpoint of another model shape (`current`: parameter_shapes; `current_model`: the model section)
    or another tokenizer."""
    check_shapes(path, meta["parameter_shapes"], current, meta["model"], current_model)
    check_tokenizer(path, meta["tokenizer_checksum"], tokenizer_checksum)


def check_shapes(path: Path, saved: dict[str, list[int]], current: dict[str, list[int]], saved_model: dict,
                 current_model: dict) -> None:
    """Refuse weights of other shapes, naming the first parameter and the model settings that differ (or, where
    none does, the saved model section)."""
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            changed = [f"model.{key} is {saved_model.get(key)!r} there and {current_model.get(key)!r} here"
                       for key in sorted(set(saved_model) | set(current_model))
                       if saved_model.get(key) != current_model.get(key)]
            raise CheckpointError(
                f"{path}: checkpoint of a different model: parameter {name} is {saved.get(name, 'absent')} "
                f"there and {current.get(name, 'absent')} here "
                f"({', '.join(changed) or f'its model section: {json.dumps(saved_model)}'})")


def check_tokenizer(path: Path, saved: str | None, current: str) -> None:
    if saved and saved != current:
        raise CheckpointError(f"{path}: trained with tokenizer {saved[:12]}..., but data.path has {current[:12]}...")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, meta: dict, rank_state: dict, keep: int, files: dict[str, str]) -> Path:
    """Save on every rank (collective); returns the checkpoint folder. Keeps the latest `keep`.

    `files` ({name: local path or URL}) are copied in, e.g. the tokenizer, so that a checkpoint is
    self-contained."""
    name = checkpoint_name(step)
    final, partial = root / name, root / (PARTIAL + name)
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    torch.save(rank_state, partial / f"rank-{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        for filename, source in files.items():
            with fsspec.open(source, "rb") as file:
                (partial / filename).write_bytes(file.read())
        (partial / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=1) + "\n")
        os.replace(partial, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def remove_partial(root: Path) -> None:
    """Delete saves that a crash interrupted (rank 0, before the first save)."""
    for path in root.glob(PARTIAL + "*"):
        shutil.rmtree(path)


def needs_universal(path: Path, meta: dict, world_size: int, zero_stage: int) -> bool:
    """Whether resuming needs the universal format: ZeRO partitions saved by another number of ranks or stage.

    Without ZeRO (stage 0) the optimizer state is saved whole, so any number of ranks can load it. Of the stages,
    DeepSpeed moves checkpoints between 1 and 2 only: stages 0 and 3 keep the model's weights in other files.
    """
    saved = meta["zero_stage"]
    if saved != zero_stage and not {saved, zero_stage} <= {1, 2}:
        raise CheckpointError(f"{path}: written with ZeRO stage {saved}, which stage {zero_stage} cannot load; "
                              f"resume it with deepspeed.zero_optimization.stage={saved}")
    return saved != 0 and (saved != zero_stage or meta["world_size"] != world_size)


# What torch.load raises on a file truncated (its zip and pickle readers) or missing.
DAMAGED_TORCH_FILE = (RuntimeError, EOFError, pickle.UnpicklingError, FileNotFoundError)


def load(engine, path: Path, meta: dict) -> dict | None:
    """Load the engine state on every rank (collective); returns this rank's rank file, or None if the
    checkpoint was written by another number of ranks (its per-rank state does not apply then)."""
    try:
        if engine.load_universal_checkpoint():
            engine.load_checkpoint(str(path), tag=universal(path).name)
            _own_step_counts(engine.optimizer.optimizer)
        else:
            engine.load_checkpoint(str(path.parent), tag=path.name)
        if meta["world_size"] != dist.get_world_size():
            return None
        return torch.load(path / f"rank-{dist.get_rank():05d}.pt", weights_only=False)
    except (torch.OutOfMemoryError, dist.DistError):   # RuntimeErrors too, but not the checkpoint's fault
        raise
    except (*DAMAGED_TORCH_FILE, AssertionError) as error:   # DeepSpeed asserts that it finds its model states
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "its model states are missing"
        raise CheckpointError(_damaged(path, detail)) from None


def _own_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its own AdamW step count. DeepSpeed's ZeRO-3 loads one tensor into all of them from a
    universal checkpoint, and torch's AdamW advances each parameter's count in place, so a shared count would
    advance once per parameter group each step and skew the bias correction."""
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()


def universal(path: Path) -> Path:
    """The checkpoint in DeepSpeed's universal format (ZeRO partitions merged per parameter), made once by rank 0
    (collective: every rank returns, or raises, once it is there)."""
    out = path / "universal"
    failure = None
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = path / (PARTIAL + "universal")
        shutil.rmtree(tmp, ignore_errors=True)
        # A stop signal to the whole process group during setup stops the run after its first step, which needs
        # the conversion to finish.
        converted = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                    str(path), "--output_folder", str(tmp), "--inject_missing_state",
                                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                                   capture_output=True, text=True, preexec_fn=ignore_stop_signals)
        if converted.returncode:
            detail = (converted.stderr.strip().splitlines() or [f"exit status {converted.returncode}"])[-1]
            failure = f"{path}: conversion to DeepSpeed's universal format failed: {detail}"
        else:
            os.replace(tmp, out)
    raise_on_every_rank(failure, CheckpointError)
    return out
