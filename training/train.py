"""The training loop: setup -> fit -> (validate, save_checkpoint) on every rank.

    deepspeed launch/train.sh configs/200m_8k.json --set train.micro_batch_size=2
    python -m training.train configs/tiny_cpu.json            # one process, no launcher

`setup` checks everything that can be wrong with the input (config, data, tokenizer, checkpoint) before the
model reaches an accelerator, builds the DeepSpeed engine and resumes. `fit` runs optimizer steps: each is
grad_accum micro-batches of forward/backward, then DeepSpeed's step (gradient averaging over all ranks,
clipping, AdamW). Parameters stay fp32; on CUDA the forward runs under bf16 autocast, and the SSM state and
scan stay fp32 inside the model.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed
import pydantic
import torch
import torch.distributed as dist
from deepspeed.runtime.config import DeepSpeedConfigError

from data_pipeline import DataError
from data_pipeline.storage import join, local_folder_problem, output_lock
from data_pipeline.tokenizer import Tokenizer
from model import build_model, compile_layers
from model.config import model_config_to_dict
from model.sequence_parallel import SequenceParallel
from training import checkpoint, data, export
from training.config import BatchLayout, ConfigError, RunConfig, batch_layout, load_config
from training.distributed import (Placement, init_distributed, process_rank, raise_on_every_rank,
                                  sequence_parallel_group)
from training.flops import measure_peak_flops, peak_flops, train_flops_per_token
from training.loss import LanguageModelObjective
from training.metrics import Metrics
from training.optim import apply_settings, build_optimizer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)   # Slurm pre-emption and time limits, the launcher's kill
REPORT_WAIT_S = 30.0   # how far behind the others the first process may be when a rank meets an error


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss keeps being non-finite)."""


class RunComplete(Exception):
    """The checkpoint to resume from is at train.max_steps already."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's meta.json."""
    step: int = 0                      # optimizer steps done
    consumed_samples: int = 0          # global samples (windows) consumed: the data stream's position
    tokens_seen: int = 0
    skipped_steps: int = 0             # steps skipped for a non-finite loss or gradient
    skipped_in_a_row: int = 0          # of those, how many came last: a resume goes on counting them


@dataclass
class Run:
    cfg: RunConfig
    place: Placement
    dp_rank: int                       # ranks of one sequence-parallel group share it
    layout: BatchLayout
    engine: deepspeed.DeepSpeedEngine
    state: TrainState
    dataset: torch.utils.data.Dataset
    batches: object                    # iterator of this rank's micro-batches
    val_batches: list
    sp: SequenceParallel | None        # this rank's sequence-parallel group (parallel.sequence_parallel_size > 1)
    parameter_shapes: dict             # of the whole model (ZeRO-3 partitions the module's own parameters)
    tokenizer: Tokenizer
    metrics: Metrics
    stop_signal: list                  # the names of the stop signals received (appended by the handler)

    def close(self) -> None:
        self.metrics.close()
        # Shuts the DataLoader workers down now: they ignore stop signals (data_pipeline/stream.py).
        self.batches = None


def setup(config_path: str, overrides: list[str], stop_signal: list[str], held: contextlib.ExitStack) -> Run:
    """stop_signal: the list that `_catch_stop_signals` fills; fit stops after its step once it holds a signal.
    held: takes rank 0's hold on output_dir, which the caller releases when the run ends."""
    cfg = load_config(config_path, overrides)
    _check_output_dir(cfg)
    place = init_distributed()
    _hold_output_dir(cfg, held)
    layout = batch_layout(cfg.train, place.world_size, cfg.parallel.sequence_parallel_size)
    dp_rank = place.rank // cfg.parallel.sequence_parallel_size

    tokenizer = _tokenizer(cfg)
    checksum = tokenizer.checksum
    dataset = data.train_dataset(cfg, checksum)
    val_batches = data.validation_batches(cfg, checksum, dp_rank, layout.dp_world)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model_config)
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        compile_layers(model)
    parameter_shapes = checkpoint.parameter_shapes(model)

    state, meta, universal = TrainState(), None, False
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir)
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        checkpoint.check_files(resume_from, meta)
        checkpoint.check_compatible(resume_from, meta, parameter_shapes, model_config_to_dict(cfg.model_config),
                                    checksum)
        if place.rank == 0:
            _note_changes(meta, cfg)
        data.check_stream_state(dataset, meta["data_stream"], resume_from)
        universal = checkpoint.needs_universal(resume_from, meta, place.world_size, cfg.zero_stage)
        state = TrainState(**meta["state"])
        if state.step > cfg.train.max_steps:
            raise ConfigError(f"{resume_from} is at step {state.step}, past train.max_steps={cfg.train.max_steps}: "
                              f"raise train.max_steps to train on")
        if state.step == cfg.train.max_steps:
            raise RunComplete(f"{resume_from} is at train.max_steps={state.step}: nothing to train "
                              f"(raise train.max_steps to train on)")
    elif cfg.train.init_from is not None:
        _initialise_from(model, cfg.train.init_from, parameter_shapes, checksum)
    checkpoint.check_no_later(cfg.checkpoint_dir, state.step)
    # The conversion comes after every check (it can take minutes, and writes into the checkpoint) and before the
    # model reaches the accelerator (it runs on the CPU).
    if universal:
        checkpoint.universal(resume_from)

    ds_config = _deepspeed_config(cfg, layout, universal, place.device)
    _check_deepspeed_config(ds_config)

    # Everything is checked: from here on the accelerator is used.
    model.to(place.device)  # before the optimizer, which is fused
    # Without ZeRO our optimizer clips (training/optim.py); under ZeRO, DeepSpeed's.
    optimizer, schedule = build_optimizer(model, cfg.optimizer, cfg.train.grad_clip if cfg.zero_stage == 0 else 0.0)
    engine, *_ = deepspeed.initialize(model=LanguageModelObjective(model, cfg.train.chunk_len),
                                      optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if cfg.zero_stage == 0 and place.world_size == 1:
        # Nothing to average: spare the backward pass DeepSpeed's copy of every gradient into a flat buffer and back.
        engine.enable_backward_allreduce = False
    if place.rank == 0:
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(cfg.checkpoint_dir)
    rank_state = None
    if resume_from is not None:
        rank_state = checkpoint.load(engine, resume_from, meta)
        apply_settings(optimizer, schedule, cfg.optimizer)
        if cfg.zero_stage > 0:   # ZeRO's optimizer loads the clipping it was saved with, too
            engine.optimizer.clip_grad = cfg.train.grad_clip
    if rank_state is not None:
        checkpoint.set_rng_state(rank_state["rng"])
    else:
        checkpoint.seed_everything(cfg.train.seed + place.rank + state.step)

    metrics = Metrics(place.rank == 0, cfg.tensorboard_dir, every=cfg.logging.every,
                      progress_bar=cfg.logging.progress_bar, start_step=state.step, max_steps=cfg.train.max_steps,
                      tokens_per_step=layout.global_batch_size * cfg.data.seq_len, world_size=place.world_size,
                      flops_per_token=train_flops_per_token(cfg.model_config, cfg.data.seq_len),
                      peak_flops=mfu_peak_flops(cfg, place.device), device=place.device)
    batches = iter(data.train_batches(dataset, cfg, dp_rank, layout.dp_world, state.consumed_samples,
                                      pin_memory=place.device.type == "cuda"))
    run = Run(cfg, place, dp_rank, layout, engine, state, dataset, batches, val_batches,
              _sequence_parallel(cfg.parallel.sequence_parallel_size), parameter_shapes, tokenizer, metrics,
              stop_signal)
    _announce(run, resume_from, meta)
    return run


def fit(run: Run) -> None:
    cfg, state, metrics = run.cfg, run.state, run.metrics
    while state.step < cfg.train.max_steps:
        started = time.perf_counter()
        lr = run.engine.get_lr()[0]   # this step's: the schedule moves on in the step
        loss, grad_norm, applied, data_wait, stop = train_step(run)
        seconds = time.perf_counter() - started
        state.step += 1
        state.consumed_samples += run.layout.global_batch_size
        state.tokens_seen += run.layout.global_batch_size * cfg.data.seq_len
        state.skipped_in_a_row = 0 if applied else state.skipped_in_a_row + 1
        state.skipped_steps += not applied
        metrics.step(loss, data_wait, seconds)
        if not applied:
            metrics.print(f"step {state.step}: skipped (loss {loss:.4g}, grad_norm {grad_norm:.4g})")
        if state.skipped_in_a_row >= cfg.train.max_skipped_steps:
            raise TrainingError(f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                f"(step {state.step}, loss {loss:.4g}); lower optimizer.lr, check the data, or "
                                f"resume from an earlier checkpoint "
                                f"(train.max_skipped_steps={cfg.train.max_skipped_steps})")
        last = state.step == cfg.train.max_steps
        if state.step % cfg.logging.every == 0 or last or stop:
            metrics.log(state.step, cfg.train.max_steps, lr, grad_norm, state.skipped_steps,
                        state.tokens_seen)
        if state.step % cfg.validation.every == 0 or last:
            metrics.validation(state.step, validate(run))
        if state.step % cfg.checkpoint.every == 0 or last or stop:
            path = save_checkpoint(run)
            metrics.print(f"step {state.step} | checkpoint {path}")
        if stop:
            metrics.print(f"stopped by {run.stop_signal[0] if run.stop_signal else 'a signal to another rank'} "
                          f"at step {state.step}; resume with checkpoint.resume=auto")
            return


def train_step(run: Run) -> tuple[float, float, bool, float, bool]:
    """One optimizer step. Returns (mean loss over all ranks, gradient norm, whether the update was applied,
    seconds spent waiting for data, whether any rank was asked to stop)."""
    engine, device = run.engine, run.place.device
    losses, data_wait = [], 0.0
    for _ in range(run.layout.grad_accum):
        started = time.perf_counter()
        window, loss_mask = next(run.batches)
        data_wait += time.perf_counter() - started
        batch = (window.to(device, non_blocking=True),
                 None if loss_mask is None else loss_mask.to(device, non_blocking=True))
        loss = engine(*batch, run.sp)   # the loss is the engine's output (training/loss.py)
        engine.backward(loss)
        losses.append(loss.detach())
        engine.step()
    # The norm before clipping: DeepSpeed's optimizer knows it under ZeRO, ours without (training/optim.py).
    grad_norm = engine.optimizer.grad_norm if run.cfg.zero_stage == 0 else engine.get_global_grad_norm()
    applied = engine.was_step_applied()  # the update is skipped if the gradient norm is not finite
    # One all-reduce per step: the mean loss for logging, and whether any rank got a stop signal, so that all
    # ranks stop after the same step (the launcher signals its ranks one after the other).
    stop = torch.tensor(float(bool(run.stop_signal)), device=device)
    stats = torch.stack([torch.stack(losses).mean().float(), stop])
    dist.all_reduce(stats)
    return stats[0].item() / run.place.world_size, float(grad_norm), applied, data_wait, stats[1].item() > 0


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean loss per scored token of the fixed validation windows, shared out between the data-parallel ranks."""
    device = run.place.device
    run.engine.eval()
    totals = torch.zeros(2, device=device)
    for window, loss_mask in run.val_batches:
        loss_mask = loss_mask.to(device)
        scored = loss_mask.sum()
        totals[0] += run.engine(window.to(device), loss_mask, run.sp).float() * scored
        totals[1] += scored
    run.engine.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def save_checkpoint(run: Run) -> Path:
    cfg, state = run.cfg, run.state
    stream = data.stream_state(run.dataset, state.consumed_samples)
    return checkpoint.save(run.engine, cfg.checkpoint_dir, state.step, meta={
        "state": asdict(state),
        "world_size": run.place.world_size,
        "zero_stage": cfg.zero_stage,
        "global_batch_size": run.layout.global_batch_size,
        "model": model_config_to_dict(cfg.model_config),
        "parameter_shapes": run.parameter_shapes,
        "tokenizer_checksum": run.tokenizer.checksum,
        "data_stream": stream,
        "config": cfg.to_dict(),
    }, rank_state={
        "rng": checkpoint.rng_state(),
        "data_stream": {**stream, "dp_rank": run.dp_rank, "dp_world": run.layout.dp_world},
    }, keep=cfg.checkpoint.keep, files={"tokenizer.model": _tokenizer_path(cfg)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/train.sh", description="Train MemMamba with DeepSpeed.")
    parser.add_argument("config", nargs="?", help="a JSON run config, e.g. configs/200m_8k.json")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set train.micro_batch_size=2 data.path=/data/pg19")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (launcher options such as --num_gpus go before "
                     f"launch/train.sh, or in DEEPSPEED_ARGS for bash launch/train.sh)")
    # --set takes every word after it, the config too when it comes last: the config is the word without '='.
    configs = [word for word in [args.config, *args.overrides] if word and "=" not in word]
    if not configs:
        parser.error("the following arguments are required: config")
    if len(configs) > 1:
        parser.error(f"expected one config file and KEY=VALUE overrides, got {' '.join(configs)}")
    overrides = [word for word in args.overrides if "=" in word]
    stop_signal = _catch_stop_signals()
    run = None
    try:
        with contextlib.ExitStack() as held:
            run = setup(configs[0], overrides, stop_signal, held)
            fit(run)
            # Ranks leave together: a rank that tears gloo down while another still uses it can abort at exit.
            dist.barrier()
    except (ConfigError, DataError, checkpoint.CheckpointError, TrainingError) as error:
        _report(error, stop_signal)
        return 1
    except RunComplete as complete:
        if process_rank() == 0:
            print(complete)
        return 0
    except KeyboardInterrupt:   # a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if run is not None:
            run.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _initialise_from(model: torch.nn.Module, path: str, shapes: dict, tokenizer_checksum: str) -> None:
    """Fine-tuning: start from trained weights of the same model and tokenizer (not a resume: the step, the
    optimizer and the data stream start afresh)."""
    source = export.load_model(path)
    checkpoint.check_shapes(Path(path), checkpoint.parameter_shapes(source), shapes,
                            model_config_to_dict(source.config), model_config_to_dict(model.config))
    checkpoint.check_tokenizer(Path(path), export.trained_tokenizer_checksum(path), tokenizer_checksum)
    model.load_state_dict(source.state_dict())


def _note_changes(meta: dict, cfg: RunConfig) -> None:
    """Settings that can change on a resume: the model's that leave the parameters' shapes alone (thresholds, pool
    policy, window), the optimizer's and the clipping. Say so, since the run so far was trained under the old ones."""
    def settings(model: dict, config: dict) -> dict:
        return {**{f"model.{key}": value for key, value in model.items()},
                **{f"optimizer.{key}": value for key, value in config["optimizer"].items()},
                "train.grad_clip": config["train"]["grad_clip"]}

    saved = settings(meta["model"], meta["config"])
    current = settings(model_config_to_dict(cfg.model_config), cfg.to_dict())
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            print(f"note: {key} is {current.get(key)!r} here, {saved.get(key)!r} in the checkpoint")


def _catch_stop_signals() -> list[str]:
    """The names of the stop signals received from now on. Caught from before setup (which can take minutes:
    a checkpoint's conversion, compiling); `bash launch/train.sh` starts the ranks with these signals ignored and
    notes one that came before in MEMMAMBA_STOP_FILE. Fit stops after the step in progress, the first one for a
    signal during setup. A first Ctrl-C stops the run the same way, a second one at once."""
    received = []

    def caught(signum, frame):
        received.append(signal.Signals(signum).name)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, caught)
    stop_file = Path(os.environ.get("MEMMAMBA_STOP_FILE", ""))
    if stop_file.name and stop_file.is_file():
        received.append(stop_file.read_text().strip())
    return received


def _report(error: Exception, stop_signal: list[str]) -> None:
    """Prints an error that stops the run, once. Every rank usually meets it, and the first process prints it.
    The others wait until the launcher stops them, as it stops every rank once one exits with an error: exiting
    first would stop the first process too, perhaps before it got as far as the error (a process still importing
    dies of the launcher's SIGTERM). A rank that nothing stops within REPORT_WAIT_S met an error that the first
    process did not, and prints it itself, with its rank."""
    rank = process_rank()
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
        return
    deadline = time.monotonic() + REPORT_WAIT_S
    while not stop_signal and time.monotonic() < deadline:
        time.sleep(0.1)
    if not stop_signal:
        print(f"error: rank {rank}: {error}", file=sys.stderr)


def _sequence_parallel(size: int) -> SequenceParallel | None:
    group = sequence_parallel_group(size)
    return None if group is None else SequenceParallel(group)


def _tokenizer_path(cfg: RunConfig) -> str:
    return join(cfg.data.path, "tokenizer.model")


def _tokenizer(cfg: RunConfig) -> Tokenizer:
    tokenizer = Tokenizer(_tokenizer_path(cfg))
    vocab = cfg.model_config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, {tokenizer.name}); set model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def _bf16(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast (train.precision; "auto" is bf16 on CUDA only)."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def _deepspeed_config(cfg: RunConfig, layout: BatchLayout, universal: bool, device: torch.device) -> dict:
    return {
        **cfg.deepspeed,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.train.grad_clip if cfg.zero_stage > 0 else 0.0,   # stage 0: see setup
        "steps_per_print": 2 ** 62,   # this loop reports progress itself
        "zero_allow_untested_optimizer": True,   # ZeRO checks the optimizer's exact type; ours is torch's AdamW
        "checkpoint": {**cfg.deepspeed.get("checkpoint", {}), "load_universal": universal},
        # The engine runs its module's forward under its own autocast setting, whatever surrounds the call.
        # Gradients stay fp32 in communication too (no lower-precision modules).
        "torch_autocast": {"enabled": _bf16(cfg, device), "dtype": "bfloat16", "lower_precision_safe_modules": []},
    }


def _check_deepspeed_config(ds_config: dict) -> None:
    """DeepSpeed's own parsing of its config, before the model reaches the accelerator, as one ConfigError.

    DeepSpeed's sections reject keys they do not know, but a top-level key it never reads (a misspelt
    "zero_optimisation") it ignores: the run would go on without it.
    """
    read = []

    class Recording(dict):
        def get(self, key, default=None):
            read.append(key)
            return super().get(key, default)

        def __contains__(self, key):
            read.append(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    try:
        deepspeed.DeepSpeedConfig(Recording(ds_config))
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(map(str, problem["loc"]))
        section = next((name for name, value in ds_config.items() if isinstance(value, dict)
                        and problem["loc"][0] in value), None)
        where = f"deepspeed.{section}.{key}" if section else f"deepspeed section ({error.title}): {key}"
        raise ConfigError(f"{where}: {problem['msg']}, got {problem.get('input')!r}") from None
    except (ValueError, AssertionError, DeepSpeedConfigError) as error:
        raise ConfigError(f"deepspeed section: {str(error).strip().splitlines()[0]}") from None
    except (TypeError, AttributeError) as error:   # a section of the wrong type, used as soon as it is read
        key = next((key for key in reversed(read) if key in ds_config), None)
        where = f"deepspeed.{key}" if key else "deepspeed section"
        raise ConfigError(f"{where}: a value of the wrong type ({error})") from None
    unread = sorted(set(ds_config) - set(read))
    if unread:
        raise ConfigError(f"unknown key deepspeed.{unread[0]}: DeepSpeed does not read it")


def _check_output_dir(cfg: RunConfig) -> None:
    """That the run's folders can be made and written, without making them: a failed check leaves nothing behind."""
    for folder in (Path(cfg.output_dir), cfg.checkpoint_dir, cfg.tensorboard_dir):
        problem = local_folder_problem(folder)
        if problem:
            raise ConfigError(f"output_dir {folder}: {problem}")


def _hold_output_dir(cfg: RunConfig, held: contextlib.ExitStack) -> None:
    """Rank 0 locks output_dir: two runs in one would delete and overwrite each other's checkpoints. Every rank stops
    if another run holds it, rather than wait for a rank 0 that has left."""
    taken = None
    if dist.get_rank() == 0:
        try:
            held.enter_context(output_lock(cfg.output_dir))
        except DataError as error:
            taken = str(error)
    raise_on_every_rank(taken, DataError)


def mfu_peak_flops(cfg: RunConfig, device: torch.device) -> float:
    """The peak that MFU is taken against: that of the matmuls the run does, bf16 under autocast, else fp32."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if _bf16(cfg, device):
        return peak_flops(device) or measure_peak_flops(device, torch.bfloat16)
    return measure_peak_flops(device, torch.float32)


def _announce(run: Run, resume_from: Path | None, meta: dict | None) -> None:
    cfg, layout = run.cfg, run.layout
    params = sum(math.prod(shape) for shape in run.parameter_shapes.values())
    if resume_from:
        where = f"resumed from {resume_from} at step {run.state.step}"
        if meta["global_batch_size"] != layout.global_batch_size:   # the data goes on from the same sample
            where += f" with global batch {layout.global_batch_size} (was {meta['global_batch_size']})"
    else:
        where = f"initialised from {cfg.train.init_from}" if cfg.train.init_from else "from scratch"
    ranks = f"{run.place.world_size} rank" + ("s" if run.place.world_size > 1 else "")
    precision = "bf16 autocast" if _bf16(cfg, run.place.device) else "fp32"
    compiled = ", layers compiled" if cfg.train.compile else ""
    P = cfg.parallel.sequence_parallel_size
    split = f", each split over {P} ranks" if P > 1 else ""
    run.metrics.print(
        f"{cfg.model_config.arch} with {params / 1e6:.2f}M parameters, {where}\n"
        f"{ranks} on {run.place.device.type} in {precision}{compiled}, ZeRO stage {cfg.zero_stage}; global batch "
        f"{layout.global_batch_size} = micro-batch {layout.micro_batch_size} x accumulation {layout.grad_accum} "
        f"x {layout.dp_world} data-parallel ranks, of {cfg.data.seq_len} tokens{split}\n"
        f"TensorBoard: {cfg.tensorboard_dir}   checkpoints: {cfg.checkpoint_dir}")


if __name__ == "__main__":
    sys.exit(main())
