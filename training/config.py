"""The run config: one JSON file holds the model, data, optimiser, training, DeepSpeed and bookkeeping sections.

    cfg = load_config("configs/200m_8k.json", ["train.micro_batch_size=2", "deepspeed.zero_optimization.stage=2"])

Every section is a dataclass; an unknown key, a missing required key or a bad value raises one `ConfigError`
(the same exception type as `model/`) whose message names the key, e.g.
`train.micro_batch_size must be a positive integer, got 0`. The `model` section is validated by
`model.model_config_from_dict`, and the `deepspeed` section is passed to DeepSpeed as it is, except for the
keys this stack sets itself from the other sections.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_type_hints

from model import ConfigError, model_config_from_dict
from model.config import describe_type, matches_type
from training.tasks import MAX_KEY_DIGITS


@dataclass
class PasskeyConfig:
    """Options of the passkey training set (data.source="passkey", training.tasks.PasskeyWindows)."""
    key_digits: int = 5

    def __post_init__(self):
        if not 1 <= self.key_digits <= MAX_KEY_DIGITS:
            raise ConfigError(f"data.passkey.key_digits must be between 1 and {MAX_KEY_DIGITS}, "
                              f"got {self.key_digits}")


@dataclass
class DataConfig:
    path: str                           # the --output of `python -m data_pipeline prepare` (passkey: its filler)
    source: Literal["shards", "passkey"] = "shards"
    seq_len: int = 2048                 # tokens per training window (each item holds seq_len + 1)
    train_split: str = "train"
    num_workers: int = 2                # DataLoader processes per rank
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)   # for data.source="passkey"

    def __post_init__(self):
        if not self.path.strip():   # --set data.path=$DATA with DATA unset
            raise ConfigError("data.path is empty: name the --output of launch/preprocess.sh, e.g. data/pg19")
        _positive("data", self, "seq_len")
        _non_negative("data", self, "num_workers")


@dataclass
class OptimizerConfig:
    """AdamW on a constant learning rate, after an optional linear warm-up."""
    lr: float = 1e-4
    weight_decay: float = 0.1           # not on norms, biases, A_log, D, dt bias (see training/optim.py)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        _non_negative("optimizer", self, "weight_decay")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps must be positive, got {self.eps}")
        _non_negative("optimizer", self, "warmup_steps")


@dataclass
class TrainConfig:
    max_steps: int                      # optimizer steps of the whole run (a resumed run stops there too)
    micro_batch_size: int = 1           # sequences per rank per forward/backward
    grad_accum: Optional[int] = None    # micro-batches per optimizer step; or give global_batch_size
    global_batch_size: Optional[int] = None   # sequences per optimizer step over all ranks
    grad_clip: float = 1.0              # max global gradient norm; 0 turns clipping off
    seed: int = 123
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on the CPU
    activation_checkpointing: bool = False   # recompute each layer in the backward pass
    compile: bool = False               # torch.compile each layer (the SSM scan stays as it is); docs/training.md
    chunk_len: Optional[int] = None     # run each sequence in chunks of this many tokens, carrying the state
    init_from: Optional[str] = None     # start from these weights (an export, a checkpoint or a folder of them)
    max_skipped_steps: int = 10         # abort after this many non-finite steps in a row

    def __post_init__(self):
        for key in ("max_steps", "micro_batch_size", "max_skipped_steps"):
            _positive("train", self, key)
        for key in ("grad_accum", "global_batch_size", "chunk_len"):
            if getattr(self, key) is not None:
                _positive("train", self, key)
        if not self.grad_clip >= 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if self.init_from is not None:
            _local_path("train.init_from", self.init_from, "an export, a checkpoint or a folder of them; or null")


@dataclass
class ValidationConfig:
    every: int = 1000                   # optimizer steps between validations (and one at the end)
    split: str = "validation"
    windows: int = 32                   # fixed windows of data.seq_len tokens, spread over the split

    def __post_init__(self):
        _positive("validation", self, "every")
        _positive("validation", self, "windows")


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = 1     # ranks that split one sequence between them

    def __post_init__(self):
        _positive("parallel", self, "sequence_parallel_size")


@dataclass
class LoggingConfig:
    every: int = 10                     # optimizer steps between console/TensorBoard lines
    progress_bar: bool = True           # on rank 0, when stderr is a terminal
    peak_tflops: Optional[float] = None  # per device, for MFU; default: training/flops.py's table, else measured

    def __post_init__(self):
        _positive("logging", self, "every")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"logging.peak_tflops must be positive, got {self.peak_tflops}")


@dataclass
class CheckpointConfig:
    every: int = 1000                   # optimizer steps between checkpoints (and one at the end)
    keep: int = 3                       # the latest `keep` complete checkpoints are kept
    resume: str = "auto"                # "auto": the latest complete checkpoint if any; "never"; or a path

    def __post_init__(self):
        _positive("checkpoint", self, "every")
        _positive("checkpoint", self, "keep")
        _local_path("checkpoint.resume", self.resume, "auto, never or a checkpoint's path")


# Keys of the deepspeed section that this stack sets from its own sections: one obvious place for each.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "the optimizer section",
    "scheduler": "optimizer.warmup_steps",
    "bf16": "train.precision (parameters stay fp32; bf16 is autocast)",
    "fp16": "train.precision",
    "torch_autocast": "train.precision",
    "seed": "train.seed",
    "steps_per_print": "logging.every",
}


@dataclass
class RunConfig:
    output_dir: str                     # the run's checkpoints/ and tensorboard/ go here
    model: dict                         # see model/config.py; `model_config` is the validated dataclass
    data: DataConfig
    train: TrainConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: dict = field(default_factory=dict)   # passed to DeepSpeed (ZeRO stage, communication, ...)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _local_path("output_dir", self.output_dir, "the run's folder on a local or shared file system, e.g. "
                    "runs/200m_8k")
        self.model_config = model_config_from_dict(self.model)
        for key, instead in OWNED_DEEPSPEED_KEYS.items():
            if key in self.deepspeed:
                raise ConfigError(f"deepspeed.{key} is set from {instead}; remove it from the deepspeed section")
        if not isinstance(self.deepspeed.get("zero_optimization", {}), dict):
            raise ConfigError("deepspeed.zero_optimization must be a JSON object such as {\"stage\": 1}")
        if not isinstance(self.deepspeed.get("checkpoint", {}), dict):   # the trainer adds a key to it
            raise ConfigError("deepspeed.checkpoint must be a JSON object such as {\"tag_validation\": \"warn\"}")
        if type(self.zero_stage) is not int or self.zero_stage not in (0, 1, 2, 3):   # (True == 1 in Python)
            raise ConfigError(f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        P = self.parallel.sequence_parallel_size
        if self.data.seq_len % P:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) must be divisible by "
                              f"parallel.sequence_parallel_size ({P})")
        if P > 1 and self.model_config.arch != "memmamba":
            raise ConfigError(f"parallel.sequence_parallel_size={P} needs a MemMamba or Mamba model; "
                              f"model.arch {self.model_config.arch!r} has no state to exchange")
        # Each rank's conv reads the last d_conv - 1 inputs of the previous rank's piece (model/sequence_parallel.py).
        halo = self.model_config.d_conv - 1 if P > 1 else 0
        if self.data.seq_len // P < halo:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) over parallel.sequence_parallel_size ({P}) gives "
                              f"pieces of {self.data.seq_len // P} tokens, fewer than the conv's model.d_conv - 1 = "
                              f"{halo}: raise data.seq_len or lower parallel.sequence_parallel_size")
        if self.train.compile and self.zero_stage == 3:
            raise ConfigError("train.compile cannot be combined with ZeRO stage 3, whose parameter hooks run inside "
                              "every compiled layer (slower than eager when tried): use stage 0, 1 or 2, or set "
                              "train.compile to false")
        if P > 1 and self.train.chunk_len is not None:
            raise ConfigError("train.chunk_len and parallel.sequence_parallel_size > 1 cannot be combined: "
                              "chunking trades time for memory on one device, sequence parallelism spreads "
                              "the sequence over devices; pick one")

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.output_dir) / "tensorboard"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a JSON config, apply `section.key=value` overrides (values are JSON, else strings), validate."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):   # the overrides set keys in it
        raise ConfigError(f"{path}: not a JSON object of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def apply_override(raw: dict, override: str) -> None:
    """`train.micro_batch_size=2` sets raw["train"]["micro_batch_size"] = 2, making sections as needed."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare string: --set data.path=/data/pg19
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[:i + 1])} is not a section")
    node[leaf] = value


def config_from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw, "")


def _build(cls, values, where: str):
    """cls(**values) with every key checked against the dataclass's fields and type hints."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a JSON object, got {values!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed: {', '.join(fields)}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise ConfigError(f"missing key {where}{name}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        elif not matches_type(value, hint):
            raise ConfigError(f"{where}{name} must be {describe_type(hint)}, got {value!r}")
        elif isinstance(value, float) and math.isinf(value):   # JSON's Infinity (NaN fails each key's own check)
            raise ConfigError(f"{where}{name} must be finite, got {value}")
        else:
            kwargs[name] = copy.deepcopy(value)
    return cls(**kwargs)


def _positive(section: str, obj, key: str) -> None:
    if not getattr(obj, key) > 0:
        raise ConfigError(f"{section}.{key} must be a positive integer, got {getattr(obj, key)}")


def _local_path(key: str, value: str, what: str) -> None:
    """Refuse an empty value (--set KEY=$X with X unset) and a URL: as a Path, file:///runs/x would be the folder
    file:/runs/x under the working one."""
    if not value.strip():
        raise ConfigError(f"{key} is empty: {what}")
    if "://" in value:
        raise ConfigError(f"{key} must be a local path ({what}), got the URL {value}")


def _non_negative(section: str, obj, key: str) -> None:
    if not getattr(obj, key) >= 0:
        raise ConfigError(f"{section}.{key} must be >= 0, got {getattr(obj, key)}")


@dataclass
class BatchLayout:
    """How one optimizer step's sequences are spread over ranks and micro-batches."""
    micro_batch_size: int
    grad_accum: int
    dp_world: int                       # data-parallel ranks (world size / sequence_parallel_size)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_world


def batch_layout(train: TrainConfig, world_size: int, sequence_parallel_size: int = 1) -> BatchLayout:
    """global_batch_size = micro_batch_size x grad_accum x (world_size / sequence_parallel_size).

    Give grad_accum (the global batch then grows with the world size) or global_batch_size (grad_accum is
    derived, so the run keeps its batch, and its data order, on any number of ranks), or both if they agree.
    """
    if world_size % sequence_parallel_size:
        raise ConfigError(f"the world size ({world_size}) must be divisible by "
                          f"parallel.sequence_parallel_size ({sequence_parallel_size})")
    dp_world = world_size // sequence_parallel_size
    per_accum = train.micro_batch_size * dp_world
    if train.global_batch_size is None:
        return BatchLayout(train.micro_batch_size, train.grad_accum or 1, dp_world)
    if train.global_batch_size % per_accum:
        raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size x data-parallel ranks ({train.micro_batch_size} x {dp_world})")
    layout = BatchLayout(train.micro_batch_size, train.global_batch_size // per_accum, dp_world)
    if train.grad_accum is not None and train.grad_accum != layout.grad_accum:
        raise ConfigError(f"train.grad_accum ({train.grad_accum}) disagrees with train.global_batch_size "
                          f"({train.global_batch_size} = {train.micro_batch_size} x {layout.grad_accum} x "
                          f"{dp_world} ranks); give one of them")
    return layout
