"""The training stack: configs, FLOP counts, and real runs through the DeepSpeed launcher on the CPU (gloo).

The end-to-end tests share one straight two-rank run (`straight_run`) of the tiny model on pg19-mini shards,
and compare other runs with it: stopped by a signal and resumed, started by other launchers or on two simulated
nodes (tests/cluster), resumed on one rank, with other ZeRO stages.
"""
import fcntl
import json
import math
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline import DataError
from model import ConfigError, build_model, load_pretrained, save_pretrained
from training import checkpoint, data, flops
from training import train as train_module
from training.checkpoint import (FORMAT, META_KEYS, CheckpointError, check_no_later, check_shapes,
                                 check_tokenizer, complete_checkpoints, needs_universal, read_meta, remove_partial,
                                 resolve_resume)
from training.config import OptimizerConfig, apply_override, batch_layout, config_from_dict, load_config
from training.distributed import free_port
from training.export import load_model
from training.flops import forward_flops_per_token, train_flops_per_token
from training.loss import lm_loss
from training.metrics import Metrics
from training.optim import AdamW, apply_settings, build_optimizer, param_groups
from training.train import _check_deepspeed_config, _check_output_dir, _report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STEPS = 16  # of the straight run; checkpoints every 4 steps, the latest 3 kept
# The tiny config, made smaller still: 8 windows of 64 tokens per step, reported every step. Its gradients are
# clipped (their norm starts near 0.9), and an eps near their elements' size makes AdamW's update depend on their
# scale, so clipping shows in the losses.
CLIP = 0.3
TINY = ["data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=8", "optimizer.warmup_steps=0",
        f"train.grad_clip={CLIP}", "optimizer.eps=1e-4", "optimizer.lr=3e-3",
        "logging.every=1", "validation.every=8", "validation.windows=3", "checkpoint.every=4", "checkpoint.keep=3"]
CLUSTER_DEEPSPEED = "deepspeed=" + json.dumps(json.loads((CONFIGS / "200m_8k_h800.json").read_text())["deepspeed"])
ZERO3 = "deepspeed.zero_optimization.stage=3"


# --- configs -------------------------------------------------------------------------------------------------

def tiny_config(**sections):
    raw = json.loads((CONFIGS / "tiny_cpu.json").read_text())
    for key, value in sections.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


@pytest.mark.parametrize("change, message", [
    ({"train.micro_batch_size": 0}, "train.micro_batch_size must be a positive integer, got 0"),
    ({"train.micro_batch_size": "2"}, "train.micro_batch_size must be an integer, got '2'"),
    ({"train.grad_accum": 2.5}, "train.grad_accum must be an integer or null, got 2.5"),
    ({"train.max_stpes": 10}, "unknown key train.max_stpes"),
    ({"optimiser": {"lr": 1e-4}}, "unknown key optimiser"),
    ({"train": 5}, "train must be a JSON object, got 5"),
    ({"data.passkey": []}, "data.passkey must be a JSON object, got []"),
    ({"optimizer.lr": -1}, "optimizer.lr must be positive, got -1"),
    ({"optimizer.betas": [0.9]}, "optimizer.betas must be two numbers in [0, 1), got [0.9]"),
    ({"optimizer.weight_decay": float("nan")}, "optimizer.weight_decay must be >= 0, got nan"),
    ({"train.grad_clip": float("nan")}, "train.grad_clip must be >= 0 (0 turns clipping off), got nan"),
    ({"data.passkey": {"key_digit": 5}}, "unknown key data.passkey.key_digit; allowed: key_digits"),
    ({"data.passkey": {"key_digits": 0}}, "data.passkey.key_digits must be between 1 and 18, got 0"),
    ({"data.passkey": {"key_digits": 19}}, "data.passkey.key_digits must be between 1 and 18, got 19"),
    ({"train.precision": "fp16"}, "train.precision must be one of 'auto', 'bf16', 'fp32', got 'fp16'"),
    ({"data.source": "web"}, "data.source must be one of 'shards', 'passkey', got 'web'"),
    ({"data.path": None}, "data.path must be a string, got None"),
    ({"model.d_model": 0}, "model.d_model must be a positive integer, got 0"),
    ({"deepspeed.zero_optimization.stage": 4}, "deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ({"deepspeed.gradient_clipping": 0.5}, "deepspeed.gradient_clipping is set from train.grad_clip"),
    ({"deepspeed.bf16": {"enabled": True}}, "deepspeed.bf16 is set from train.precision"),
    ({"deepspeed.torch_autocast": {"enabled": True}}, "deepspeed.torch_autocast is set from train.precision"),
    ({"deepspeed.steps_per_print": 100}, "deepspeed.steps_per_print is set from logging.every"),
    ({"parallel.sequence_parallel_size": 3}, "data.seq_len (256) must be divisible by "
                                             "parallel.sequence_parallel_size (3)"),
    ({"parallel.sequence_parallel_size": 2, "model": {"arch": "transformer", "size": "tiny"}},
     "parallel.sequence_parallel_size=2 needs a MemMamba or Mamba model"),
    ({"parallel.sequence_parallel_size": 4, "data.seq_len": 8},
     "data.seq_len (8) over parallel.sequence_parallel_size (4) gives pieces of 2 tokens, fewer than the conv's "
     "model.d_conv - 1 = 3"),
    ({"parallel.sequence_parallel_size": 2, "train.chunk_len": 64},
     "train.chunk_len and parallel.sequence_parallel_size > 1 cannot be combined"),
    ({"train.compile": True, "deepspeed.zero_optimization.stage": 3},
     "train.compile cannot be combined with ZeRO stage 3"),
    ({"deepspeed.zero_optimization.stage": True}, "deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got True"),
    ({"optimizer.lr": float("inf")}, "optimizer.lr must be finite, got inf"),
    ({"output_dir": ""}, "output_dir is empty"),
    ({"output_dir": "file:///runs/x"}, "output_dir must be a local path (the run's folder on a local or shared file "
                                       "system, e.g. runs/200m_8k), got the URL file:///runs/x"),
    ({"data.path": " "}, "data.path is empty"),
    ({"checkpoint.resume": ""}, "checkpoint.resume is empty: auto, never or a checkpoint's path"),
    ({"train.init_from": ""}, "train.init_from is empty"),
    ({"train.init_from": "gs://b/runs/x"}, "train.init_from must be a local path (an export, a checkpoint or a "
                                           "folder of them; or null), got the URL gs://b/runs/x"),
    ({"checkpoint.resume": "file:///runs/x/checkpoints"}, "checkpoint.resume must be a local path (auto, never or a "
                                                          "checkpoint's path), got the URL file:///runs/x/checkpoints"),
    ({"data.num_workers": -1}, "data.num_workers must be >= 0, got -1"),
    ({"optimizer.eps": 0}, "optimizer.eps must be positive, got 0"),
    ({"optimizer.warmup_steps": -1}, "optimizer.warmup_steps must be >= 0, got -1"),
    ({"train.max_skipped_steps": 0}, "train.max_skipped_steps must be a positive integer, got 0"),
    ({"validation.windows": 0}, "validation.windows must be a positive integer, got 0"),
    ({"checkpoint.keep": 0}, "checkpoint.keep must be a positive integer, got 0"),
    ({"logging.peak_tflops": 0}, "logging.peak_tflops must be positive, got 0"),
    ({"deepspeed.seed": 1}, "deepspeed.seed is set from train.seed"),
    ({"deepspeed.checkpoint": 5}, "deepspeed.checkpoint must be a JSON object"),
])
def test_bad_values_raise_one_error_naming_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict(tiny_config(**change))
    assert message in str(error.value)


def test_missing_sections_and_keys_are_named():
    raw = tiny_config()
    del raw["train"]["max_steps"]
    with pytest.raises(ConfigError, match="missing key train.max_steps"):
        config_from_dict(raw)
    del raw["output_dir"]
    with pytest.raises(ConfigError, match="missing key output_dir"):
        config_from_dict(raw)


@pytest.mark.parametrize("section, message", [
    ({"flops_profiler": 5}, "deepspeed.flops_profiler: a value of the wrong type ("),
    ({"communication_data_type": 5}, "deepspeed.communication_data_type: a value of the wrong type ("),
    ({"checkpoint": {"tag_validation": "often"}}, "deepspeed section: Checkpoint config contains invalid "
                                                  "tag_validation value of OFTEN"),
])
def test_deepspeeds_own_errors_in_its_section_are_one_config_error(section, message):
    with pytest.raises(ConfigError) as error:
        _check_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, **section})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("taken", ["checkpoints", "tensorboard"])
def test_a_file_where_the_run_puts_a_folder_is_named(tmp_path, taken):
    (tmp_path / taken).write_text("")
    with pytest.raises(ConfigError) as error:
        _check_output_dir(config_from_dict(tiny_config(output_dir=str(tmp_path))))
    assert str(error.value) == f"output_dir {tmp_path / taken}: {tmp_path / taken} is a file"


def test_a_config_file_that_cannot_be_read_is_named(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe{}")
    (tmp_path / "broken.json").write_text('{\n  "train": {"max_steps": 1,}\n}')
    (tmp_path / "list.json").write_text("[]")
    for path, message in [(tmp_path / "absent.json", "no such config file"), (tmp_path, "a folder, not a config file"),
                          (tmp_path / "latin1.json", "not valid JSON ('utf-8' codec can't decode byte 0xff"),
                          (tmp_path / "broken.json", "not valid JSON (Expecting property name enclosed in double "
                                                     "quotes: line 2 column 28"),
                          (tmp_path / "list.json", "not a JSON object of sections, got list")]:
        with pytest.raises(ConfigError) as error:
            load_config(path, ["output_dir=runs/x"])
        assert str(error.value).startswith(f"{path}: {message}")


def test_overrides_reach_nested_keys_and_parse_json():
    cfg = load_config(CONFIGS / "tiny_cpu.json", ["train.micro_batch_size=2", "data.path=/data/pg19",
                                                   "deepspeed.zero_optimization.stage=2", "train.chunk_len=null",
                                                   "optimizer.betas=[0.9,0.99]"])
    assert cfg.train.micro_batch_size == 2 and cfg.data.path == "/data/pg19" and cfg.zero_stage == 2
    assert cfg.train.chunk_len is None and cfg.optimizer.betas == [0.9, 0.99]
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(CONFIGS / "tiny_cpu.json", ["train.micro_batch_size"])
    with pytest.raises(ConfigError, match="^override '=2' must look like section.key=value$"):
        load_config(CONFIGS / "tiny_cpu.json", ["=2"])
    # the key ends at the first "=": a value may hold more of them (paths, URLs with a query)
    assert load_config(CONFIGS / "tiny_cpu.json", ["data.path=/data/run=2/pg19"]).data.path == "/data/run=2/pg19"
    with pytest.raises(ConfigError, match="train.seed is not a section"):
        load_config(CONFIGS / "tiny_cpu.json", ["train.seed.x=1"])


def test_global_batch_is_micro_batch_times_accumulation_times_data_parallel_ranks():
    train = config_from_dict(tiny_config(**{"train.micro_batch_size": 2, "train.global_batch_size": 32})).train
    assert [batch_layout(train, world).grad_accum for world in (1, 2, 4, 16)] == [16, 8, 4, 1]
    assert batch_layout(train, 4, sequence_parallel_size=2).grad_accum == 8   # 2 data-parallel ranks
    with pytest.raises(ConfigError, match=r"global_batch_size \(32\) must be a multiple of .* \(2 x 32\)"):
        batch_layout(train, 32)
    with pytest.raises(ConfigError, match=r"world size \(3\) must be divisible by .*sequence_parallel_size \(2\)"):
        batch_layout(train, 3, sequence_parallel_size=2)
    fixed = config_from_dict(tiny_config(**{"train.global_batch_size": None, "train.grad_accum": 4})).train
    assert [batch_layout(fixed, world).global_batch_size for world in (1, 8)] == [16, 128]
    # ranks that split one sequence take the same samples: 8 ranks in pairs are 4 data-parallel ranks
    layout = batch_layout(fixed, 8, sequence_parallel_size=2)
    assert (layout.dp_world, layout.global_batch_size) == (4, 64)
    both = config_from_dict(tiny_config(**{"train.grad_accum": 4})).train   # 4 x 4 x 1 != 8
    with pytest.raises(ConfigError, match=r"train.grad_accum \(4\) disagrees with train.global_batch_size \(8"):
        batch_layout(both, 1)


def test_the_papers_run_and_its_variants():
    paper = load_config(CONFIGS / "200m_8k.json")
    m = paper.model_config
    assert (m.arch, m.n_layer, m.d_model, m.summary_dim, m.pool_size, m.notes) == ("memmamba", 24, 1024, 64, 50, True)
    assert (paper.data.seq_len, paper.train.grad_accum, paper.train.grad_clip, paper.train.seed) == (8000, 4, 1.0, 123)
    assert (paper.optimizer.lr, paper.optimizer.weight_decay, paper.train.max_steps) == (1e-4, 0.1, 100_000)
    assert paper.train.activation_checkpointing and paper.train.micro_batch_size == 1
    cluster = load_config(CONFIGS / "200m_8k_h800.json")
    assert cluster.optimizer == paper.optimizer and cluster.train.global_batch_size == 32
    assert cluster.model_config == m and cluster.zero_stage == 2
    assert load_config(CONFIGS / "mamba_200m_8k.json").model_config.notes is False
    assert load_config(CONFIGS / "transformer_200m_8k.json").model_config.arch == "transformer"
    for path in CONFIGS.glob("*.json"):
        load_config(path)


def test_the_documented_slurm_commands_start_runs_of_the_h800_global_batch():
    """Every `sbatch --nodes=N launch/slurm_h800.sbatch [--set ...]` of the docs, on N 8-GPU nodes, lays out the
    config's global batch of 32 (a layout that does not divide stops every rank at start-up)."""
    commands = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "training.md", ROOT / "launch" / "slurm_h800.sbatch"):
        text = doc.read_text().replace("\n", " ")
        commands += re.findall(r"sbatch --nodes=(\d+) launch/slurm_h800\.sbatch((?: --set \S+=[^\s`]+)?)", text)
    assert len(commands) >= 3, commands
    for nodes, overrides in commands:
        cfg = load_config(CONFIGS / "200m_8k_h800.json", overrides.split()[1:])
        assert batch_layout(cfg.train, int(nodes) * 8).global_batch_size == 32, (nodes, overrides)


def test_a_resume_on_another_zero_stage_or_world_size_takes_the_universal_format():
    def needs(saved_stage, saved_ranks, stage, ranks):
        return needs_universal(Path("ckpt"), {"zero_stage": saved_stage, "world_size": saved_ranks}, ranks, stage)

    assert not needs(0, 2, 0, 1) and not needs(1, 2, 1, 2) and not needs(3, 2, 3, 2)
    assert needs(1, 2, 1, 1) and needs(3, 1, 3, 2) and needs(2, 2, 1, 2) and needs(1, 1, 2, 2)
    for saved, stage in [(0, 1), (2, 0), (3, 1), (2, 3)]:
        with pytest.raises(CheckpointError, match=f"ckpt: written with ZeRO stage {saved}, which stage {stage} "
                                                  f"cannot load; resume it with deepspeed.zero_optimization.stage"):
            needs(saved, 2, stage, 2)


class _SingleProcess:
    """torch.distributed as a run of one rank sees it."""
    @staticmethod
    def get_rank():
        return 0

    @staticmethod
    def barrier():
        pass


class _Engine:
    """Writes a checkpoint as DeepSpeed does: into <save_dir>/<tag>/, which need not exist yet."""
    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if self.fail:
            raise OSError("disk full")


def test_saves_appear_complete_under_their_final_name_and_only_the_latest_keep_remain(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "dist", _SingleProcess)
    root = tmp_path / "checkpoints"
    (tmp_path / "tokenizer.model").write_bytes(b"pieces")
    for step in (4, 8, 12, 16):   # steps of different digit counts: the latest must still sort last
        meta = {**dict.fromkeys(META_KEYS), "state": {"step": step}}
        path = checkpoint.save(_Engine(), root, step, meta, {"rng": step}, keep=3,
                               files={"tokenizer.model": str(tmp_path / "tokenizer.model")})
        assert resolve_resume("auto", root) == path
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000008", "step-00000012", "step-00000016"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000012", "step-00000016"]
    assert read_meta(path) == {"format": FORMAT, **meta}
    assert torch.load(path / "rank-00000.pt") == {"rng": 16} and (path / "tokenizer.model").read_bytes() == b"pieces"

    # a save that fails half-way leaves the last complete checkpoint the one to resume from, and is cleared away
    with pytest.raises(OSError):
        checkpoint.save(_Engine(fail=True), root, 20, {}, {}, keep=3, files={})
    assert resolve_resume("auto", root) == path and (root / ".partial-step-00000020").is_dir()
    remove_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000012", "step-00000016"]


def test_resume_takes_the_latest_complete_checkpoint_or_a_named_complete_one(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None   # a new run: nothing there yet
    for name in ("step-00000004", "step-00000012", ".partial-step-00000020"):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text("{}")
    (root / "step-00000016").mkdir()   # no meta.json: not complete, e.g. still being copied in
    assert resolve_resume("auto", root) == root / "step-00000012"
    assert resolve_resume("never", root) is None
    assert resolve_resume(str(root / "step-00000004"), root) == root / "step-00000004"
    with pytest.raises(CheckpointError) as error:
        resolve_resume(str(root / "step-00000016"), root)
    assert str(error.value) == (f"{root}/step-00000016: not a complete checkpoint (no meta.json); complete ones "
                                f"under {root}: ['step-00000004', 'step-00000012']")
    # a run may start at the step of the latest checkpoint folder, complete or not, and not before it
    check_no_later(root, 16)
    with pytest.raises(CheckpointError, match=f"^{root}: holds checkpoints after step 12 \\(step-00000016\\), "):
        check_no_later(root, 12)
    with pytest.raises(CheckpointError, match=f"^{root}: holds checkpoints after step 4 "
                                              "\\(step-00000012, step-00000016\\), "):
        check_no_later(root, 4)


def test_a_checkpoint_of_another_format_model_or_tokenizer_is_refused_by_name(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": "memmamba-checkpoint/0"}))
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/meta.json: format 'memmamba-checkpoint/0', expected "
                                              f"'{FORMAT}'$"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/meta.json: format None, expected '{FORMAT}'$"):
        read_meta(tmp_path)
    edited = {**dict.fromkeys(META_KEYS), "format": FORMAT}
    del edited["data_stream"], edited["config"]
    (tmp_path / "meta.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/meta.json: no data_stream, config$"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/meta.json: not valid JSON"):
        read_meta(tmp_path)

    saved, saved_model = {"embedding.weight": [1024, 64], "layers.0.w": [64, 64]}, {"n_layer": 1, "d_model": 64}
    check_shapes(tmp_path, saved, dict(saved), saved_model, dict(saved_model))
    more = {**saved, "layers.1.w": [64, 64]}   # a parameter the checkpoint does not have
    with pytest.raises(CheckpointError) as error:
        check_shapes(tmp_path, saved, more, saved_model, {**saved_model, "n_layer": 2})
    assert str(error.value) == (f"{tmp_path}: checkpoint of a different model: parameter layers.1.w is absent there "
                                "and [64, 64] here (model.n_layer is 1 there and 2 here)")
    with pytest.raises(CheckpointError, match="parameter layers.1.w is \\[64, 64\\] there and absent here"):
        check_shapes(tmp_path, more, saved, saved_model, saved_model)
    # a setting the checkpoint's model section predates is named too
    with pytest.raises(CheckpointError, match="\\(model.n_layer is 1 there and 2 here, model.notes is None there "
                                              "and True here\\)$"):
        check_shapes(tmp_path, saved, more, saved_model, {**saved_model, "n_layer": 2, "notes": True})

    check_tokenizer(tmp_path, "a" * 64, "a" * 64)
    check_tokenizer(tmp_path, None, "a" * 64)   # weights that do not say which tokenizer: taken as they are
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: trained with tokenizer bbbbbbbbbbbb..., but data.path "
                                              "has aaaaaaaaaaaa...$"):
        check_tokenizer(tmp_path, "b" * 64, "a" * 64)


def test_the_random_state_of_a_rank_round_trips_and_any_seed_is_accepted():
    import random

    import numpy as np

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    before = checkpoint.rng_state()   # given back to the tests that follow
    checkpoint.seed_everything(2 ** 40 + 3)   # train.seed + rank + step: any size
    state = checkpoint.rng_state()
    first = draws()
    checkpoint.seed_everything(1)
    checkpoint.set_rng_state(state)
    assert draws() == first   # python, numpy and torch each take up where the checkpoint was
    checkpoint.set_rng_state(before)


def test_no_weight_decay_on_norms_biases_and_ssm_dynamics():
    model = build_model({"arch": "memmamba", "size": "tiny"})
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in names.values():
        exempt = (name.endswith(("A_log", ".D", "dt_proj.bias", "norm.weight", "norm_f.weight", ".bias"))
                  or name.endswith(("fusion_weight", "gate_bias")))
        assert (name not in decayed) == exempt, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _optimizer_pair(max_grad_norm):
    torch.manual_seed(0)
    ours = build_model({"arch": "memmamba", "size": "tiny"})
    reference = build_model({"arch": "memmamba", "size": "tiny"})
    reference.load_state_dict(ours.state_dict())
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    return (ours, AdamW(param_groups(ours, 0.1), max_grad_norm, **settings),
            reference, torch.optim.AdamW(param_groups(reference, 0.1), foreach=False, **settings))


def _backward(model, ids, scale=1.0):
    (scale * lm_loss(model, ids)).backward()


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])   # 0: no clipping (under ZeRO, DeepSpeed's clips)
def test_optimizer_clips_like_torch_and_steps_like_adamw(max_grad_norm):
    """The fused, foreach-clipping AdamW against torch's per-tensor AdamW after torch's clip_grad_norm_."""
    ours, optimizer, reference, reference_optimizer = _optimizer_pair(max_grad_norm=max_grad_norm)
    for step in range(3):
        ids = torch.randint(0, 1024, (2, 33))
        for model, opt in ((ours, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            _backward(model, ids)
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm or math.inf)
        assert norm > 0.5 and optimizer.step() is None and reference_optimizer.step() is None
        assert optimizer.grad_norm.item() == pytest.approx(norm.item(), rel=1e-5) and not optimizer.overflow
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)   # an update moves them by ~1e-2


def test_the_learning_rate_warms_up_linearly_and_a_resume_takes_the_configs_settings():
    def run(config, steps, state=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)   # a decayed weight, an undecayed bias
        optimizer, schedule = build_optimizer(model, config, max_grad_norm=1.0)
        if state is not None:   # a resume: the checkpoint brings back its own settings with the moments
            optimizer.load_state_dict(state[0])
            schedule.load_state_dict(state[1])
            apply_settings(optimizer, schedule, config)
        lrs = []
        for _ in range(steps):
            lrs += [group["lr"] for group in optimizer.param_groups]
            optimizer.zero_grad()
            model(torch.ones(2, 4)).square().sum().backward()
            optimizer.step()
            schedule.step()
        return optimizer, (optimizer.state_dict(), schedule.state_dict()), lrs

    first = OptimizerConfig(lr=1e-3, weight_decay=0.2, betas=[0.8, 0.9], eps=1e-6, warmup_steps=3)
    optimizer, state, lrs = run(first, 6)
    # from lr / (warmup_steps + 1) up in equal steps, reaching lr at step warmup_steps
    assert lrs == pytest.approx([1e-3 * (s + 1) / 4 for s in range(3) for _ in "12"] + [1e-3] * 6)
    settings = [(g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups]
    assert settings == [(0.2, (0.8, 0.9), 1e-6), (0.0, (0.8, 0.9), 1e-6)]

    changed = OptimizerConfig(lr=2e-3, weight_decay=0.05, betas=[0.9, 0.99], eps=1e-7, warmup_steps=9)
    optimizer, _, lrs = run(changed, 2, state)   # resumed after 6 steps, still warming up to the new lr
    assert lrs == pytest.approx([2e-3 * 7 / 10] * 2 + [2e-3 * 8 / 10] * 2)
    settings = [(g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups]
    assert settings == [(0.05, (0.9, 0.99), 1e-7), (0.0, (0.9, 0.99), 1e-7)]


def test_optimizer_leaves_weights_and_moments_alone_on_a_non_finite_gradient():
    ours, optimizer, *_ = _optimizer_pair(max_grad_norm=1.0)
    ids = torch.randint(0, 1024, (2, 33))
    _backward(ours, ids)
    optimizer.step()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in ours.parameters()]
    optimizer.zero_grad()
    _backward(ours, ids, scale=float("inf"))
    optimizer.step()
    assert optimizer.overflow and not torch.isfinite(optimizer.grad_norm)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, ours.parameters()))
    assert all(optimizer.state[p]["step"].item() == 1 for p in ours.parameters())   # the skipped step not counted


@pytest.mark.parametrize("section", [{"arch": "memmamba", "size": "tiny", "notes": False},
                                     {"arch": "transformer", "size": "tiny"}])
def test_dense_flops_equal_a_flop_counter(section):
    """Every weight matmul and convolution the model runs, counted exactly (the counter skips attention)."""
    model = build_model(section)
    T = 128
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 1024, (2, T)))
    assert counter.get_total_flops() / (2 * T) == forward_flops_per_token(model.config, T)["dense"]


def test_scan_and_causal_attention_flops_cover_every_layer_and_training_is_three_forward_passes():
    mamba = build_model({"arch": "memmamba", "size": "tiny", "notes": False})
    T = 32
    counts = forward_flops_per_token(mamba.config, T)
    cells = sum(p.numel() for name, p in mamba.named_parameters() if name.endswith("A_log"))   # (channel, state)
    assert counts["scan"] == flops.SCAN_FLOPS * cells and counts["attention"] == 0
    assert train_flops_per_token(mamba.config, T) == 3 * sum(counts.values())   # the backward pass is two forwards

    transformer = build_model({"arch": "transformer", "size": "tiny"}).config
    keys = sum(t + 1 for t in range(T)) / T   # the keys a token sees, over the sequence: itself and those before
    attention = transformer.n_layer * 2 * (2 * transformer.d_model * keys)   # q.k and p.v, a multiply-add each
    assert forward_flops_per_token(transformer, T)["attention"] == pytest.approx(attention)


def test_the_datasheet_peak_is_that_of_the_longest_name_in_the_devices(monkeypatch):
    for name, expected in [("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 80GB HBM3", "H100"),
                           ("NVIDIA H800 PCIe", "H800 PCIe"), ("NVIDIA H800", "H800"),
                           ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA A100-SXM4-80GB", "A100"),
                           ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA GH200 480GB", "H200"), ("Tesla T4", None),
                           ("NVIDIA RTX A1000 6GB Laptop GPU", None)]:   # not an A100: measured instead
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert flops.peak_flops(torch.device("cuda")) == flops.PEAK_BF16_FLOPS.get(expected), name
    assert flops.peak_flops(torch.device("cpu")) is None   # measured instead (measure_peak_flops)


def test_mfu_is_taken_against_the_peak_of_the_runs_own_precision(monkeypatch):
    """A bf16 run on a GPU missing from the table against a bf16 matmul, not an fp32 one (several times slower on
    tensor cores); an fp32 run against fp32, not the datasheet's bf16 peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    measured = {torch.bfloat16: 3e14, torch.float32: 9e13}
    monkeypatch.setattr(train_module, "measure_peak_flops", lambda device, dtype=torch.float32: measured[dtype])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for precision, device, expected in [("auto", cuda, 3e14), ("fp32", cuda, 9e13), ("auto", cpu, 9e13),
                                        ("bf16", cpu, 3e14)]:
        cfg = config_from_dict(tiny_config(**{"train.precision": precision}))
        assert train_module.mfu_peak_flops(cfg, device) == expected, (precision, device)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert train_module.mfu_peak_flops(config_from_dict(tiny_config()), cuda) == 989e12
    assert train_module.mfu_peak_flops(config_from_dict(tiny_config(**{"train.precision": "fp32"})), cuda) == 9e13
    given = tiny_config(**{"train.precision": "fp32", "logging.peak_tflops": 50})
    assert train_module.mfu_peak_flops(config_from_dict(given), cuda) == 50e12


def test_memmamba_dense_flops_within_one_percent_of_a_flop_counter():
    model = build_model({"arch": "memmamba", "size": "tiny"})
    T = 256
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 1024, (2, T)))
    ours = forward_flops_per_token(model.config, T)["dense"]
    assert abs(counter.get_total_flops() / (2 * T) / ours - 1) < 0.01


def test_passkey_source_gives_masked_batches_and_a_masked_loss(pg19_shards):
    from training.loss import LanguageModelObjective

    cfg = config_from_dict(tiny_config(**{"data.source": "passkey", "data.path": str(pg19_shards.root),
                                          "data.seq_len": 128, "train.micro_batch_size": 2}))
    dataset = data.train_dataset(cfg, pg19_shards.checksum)
    window, mask = next(iter(data.train_batches(dataset, cfg, dp_rank=0, dp_world=1, consumed_samples=0,
                                                pin_memory=False)))
    assert window.shape == (2, 129) and mask.shape == (2, 128) and mask.dtype == torch.bool
    assert 0 < mask.sum() < mask.numel() and mask[:, -1].all()   # the answer ends the window
    model = build_model(cfg.model_config)
    masked = LanguageModelObjective(model)(window, mask)
    with torch.no_grad():
        logits, _ = model(window[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none")
    assert masked.item() == pytest.approx(nll[mask].mean().item(), rel=1e-5)


@pytest.mark.parametrize("key", ["data.train_split", "validation.split"])
def test_a_split_the_data_lacks_is_named_with_the_key_that_chose_it(pg19_shards, key):
    # as a corpus prepared with `prepare --splits train` lacks its validation split
    cfg = config_from_dict(tiny_config(**{"data.path": str(pg19_shards.root), key: "dev"}))
    with pytest.raises(DataError) as error:
        data.train_dataset(cfg, pg19_shards.checksum)
        data.validation_batches(cfg, pg19_shards.checksum, dp_rank=0, dp_world=1)
    assert str(error.value) == (f"{pg19_shards.root}/dev: no such directory (prepared splits there: test, train, "
                                f"validation); set by {key}='dev'")


def test_train_batches_are_the_ranks_samples_of_the_seeds_order_as_windows_without_a_mask(pg19_shards):
    def config(**changes):
        return config_from_dict(tiny_config(**{"data.path": str(pg19_shards.root), "data.seq_len": 64,
                                               "train.micro_batch_size": 2, **changes}))

    cfg = config()
    dataset = data.train_dataset(cfg, pg19_shards.checksum)
    batches = iter(data.train_batches(dataset, cfg, dp_rank=1, dp_world=2, consumed_samples=8, pin_memory=False))
    for k in (10, 14, 18):   # rank 1's samples of global batches of 4, after 8 samples
        window, mask = next(batches)
        assert mask is None and torch.equal(window, torch.stack([dataset[k], dataset[k + 1]]))
    reseeded = data.train_dataset(config(**{"train.seed": cfg.train.seed + 1}), pg19_shards.checksum)
    assert reseeded.state_dict(0)["seed"] == cfg.train.seed + 1 and not torch.equal(reseeded[0], dataset[0])
    for window, mask in data.validation_batches(cfg, pg19_shards.checksum, dp_rank=0, dp_world=1):
        assert mask.shape == (len(window), 64) and window.shape == (len(window), 65)   # a mask per target
    with pytest.raises(DataError, match=f"^{pg19_shards.root}/train/manifest.json: shards were made with tokenizer"):
        data.train_dataset(cfg, "0" * 64)


def test_a_checkpoints_stream_state_of_another_seed_or_source_names_the_difference_and_the_way_on(pg19_shards,
                                                                                                 tmp_path):
    def dataset(**changes):
        cfg = config_from_dict(tiny_config(**{"data.path": str(pg19_shards.root), "data.seq_len": 128, **changes}))
        return data.train_dataset(cfg, pg19_shards.checksum)

    shards = dataset()
    state = data.stream_state(shards, 16)
    data.check_stream_state(shards, state, tmp_path)
    new_run = f"; to train its weights on with this data, start a new run with train.init_from={tmp_path}"
    with pytest.raises(DataError) as error:
        data.check_stream_state(dataset(**{"train.seed": 7}), state, tmp_path)
    assert str(error.value) == f"{tmp_path}: train.seed is 7 here, {state['seed']} in the checkpoint, which would " \
                               f"change the order of the data{new_run}"
    with pytest.raises(DataError) as error:
        data.check_stream_state(shards, {**state, "books": "0" * 16}, tmp_path)
    assert str(error.value) == f"{pg19_shards.root}/train: checkpoint's data stream does not match this dataset " \
                               f"(other books than the checkpoint's, or in another order){new_run}"
    with pytest.raises(DataError, match=f"does not match this dataset \\(key_digits None != 5\\){new_run}$"):
        data.check_stream_state(dataset(**{"data.source": "passkey"}), state, tmp_path)


def test_passkey_validation_windows_do_not_depend_on_the_training_seed(pg19_shards):
    # validation losses of runs with other seeds are comparable only on the same windows
    def batches(seed):
        cfg = config_from_dict(tiny_config(**{"data.source": "passkey", "data.path": str(pg19_shards.root),
                                              "data.seq_len": 128, "validation.windows": 2, "train.seed": seed}))
        return data.validation_batches(cfg, pg19_shards.checksum, dp_rank=0, dp_world=1)

    (first, first_mask), = batches(1)
    (second, second_mask), = batches(2)
    assert torch.equal(first, second) and torch.equal(first_mask, second_mask)


@pytest.mark.parametrize("dp_world", [1, 2, 3, 4])
def test_the_ranks_score_every_validation_window_once_in_the_same_number_of_passes(pg19_shards, dp_world):
    cfg = config_from_dict(tiny_config(**{"data.path": str(pg19_shards.root), "data.seq_len": 64,
                                          "validation.windows": 3, "train.micro_batch_size": 2}))
    everything = data.validation_batches(cfg, pg19_shards.checksum, dp_rank=0, dp_world=1)
    assert [len(window) for window, _ in everything] == [2, 1]
    windows = torch.cat([window for window, _ in everything])
    assert all(mask.all() for _, mask in everything)

    shares = [data.validation_batches(cfg, pg19_shards.checksum, rank, dp_world) for rank in range(dp_world)]
    assert len({len(share) for share in shares}) == 1            # as many forward passes on every rank
    scored = [window for share in shares for batch, mask in share for window, row in zip(batch, mask) if row.any()]
    assert torch.equal(torch.stack(scored), windows)
    masks = torch.cat([mask for share in shares for _, mask in share])
    assert all(row.all() or not row.any() for row in masks)


# --- runs through the launcher -------------------------------------------------------------------------------

def train_command(ranks, shards, output_dir, *overrides, config="configs/tiny_cpu.json"):
    if ranks == 1:  # a process on its own is rank 0 of 1
        launcher = [sys.executable]
    else:
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
                    "--master_port", str(free_port())]
    return [*launcher, "launch/train.sh", str(config), "--set", *TINY, f"data.path={shards}",
            f"output_dir={output_dir}", *overrides]


def as_bash_script(command):
    """A `train_command` of the DeepSpeed launcher as `bash launch/train.sh` runs it (the launcher's options in
    DEEPSPEED_ARGS): the command and its environment."""
    return ["bash", *command[5:]], {**_env(), "PYTHON": sys.executable, "DEEPSPEED_ARGS": " ".join(command[1:5])}


def train(ranks, shards, output_dir, *overrides, check=True, config="configs/tiny_cpu.json"):
    result = subprocess.run(train_command(ranks, shards, output_dir, *overrides, config=config), cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def output_stopped_at(process, step, stop):
    """All that a training process prints, `stop()` called (to signal it) once it has logged `step`."""
    output = ""
    for line in process.stdout:
        output += line
        if line.startswith(f"step {step}/"):
            stop()
            break
    return output + process.communicate(timeout=300)[0]


def scalars(output_dir, tag):
    events = EventAccumulator(str(Path(output_dir) / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_tokens_per_second_count_only_the_steps_own_time(tmp_path):
    """A validation or a checkpoint save between two logged steps does not show up as a drop in tokens/s."""
    metrics = Metrics(True, tmp_path / "tensorboard", every=2, progress_bar=False, start_step=0, max_steps=2,
                      tokens_per_step=1000, world_size=2, flops_per_token=6.0, peak_flops=None,
                      device=torch.device("cpu"))
    metrics.step(3.0, data_wait=0.0, seconds=0.25)
    time.sleep(0.2)                          # what a validation between the steps would take
    metrics.step(3.0, data_wait=0.0, seconds=0.75)
    metrics.log(2, 2, lr=1e-3, grad_norm=1.0, skipped=0, tokens_seen=2000)
    metrics.close()
    assert scalars(tmp_path, "perf/tps_total") == {2: 2000.0} and scalars(tmp_path, "perf/tps") == {2: 1000.0}


def test_each_line_reports_the_steps_since_the_last_and_a_resume_replaces_what_was_logged_after_it(tmp_path,
                                                                                                     capsys):
    def metrics(start_step):
        return Metrics(True, tmp_path / "tensorboard", every=2, progress_bar=False, start_step=start_step,
                       max_steps=4, tokens_per_step=1000, world_size=2, flops_per_token=6e9, peak_flops=1e13,
                       device=torch.device("cpu"))

    run = metrics(0)
    run.step(2.0, data_wait=0.1, seconds=0.5)
    run.step(4.0, data_wait=0.3, seconds=0.5)
    run.log(2, 4, lr=1e-3, grad_norm=0.5, skipped=0, tokens_seen=2000)
    run.step(1.0, data_wait=0.0, seconds=1.0)
    run.step(1.0, data_wait=0.0, seconds=1.0)
    run.log(4, 4, lr=1e-3, grad_norm=math.inf, skipped=1, tokens_seen=4000)
    run.close()
    tps = 2000 / 1.0 / 2   # per device: 2 steps of 1000 tokens in 1 s, over 2 devices
    expected = {"train/loss": {2: 3.0, 4: 1.0}, "train/ppl": {2: math.exp(3.0), 4: math.exp(1.0)},
                "perf/tps": {2: tps, 4: tps / 2}, "perf/tflops": {2: tps * 6e9 / 1e12, 4: tps / 2 * 6e9 / 1e12},
                "perf/mfu": {2: 100 * tps * 6e9 / 1e13, 4: 100 * tps / 2 * 6e9 / 1e13},
                "perf/data_wait_s": {2: 0.2, 4: 0.0}, "train/skipped_steps": {2: 0, 4: 1}}
    for tag, values in expected.items():
        assert scalars(tmp_path, tag) == pytest.approx(values), tag
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"step 2/4 | loss 3.0000 | ppl {math.exp(3):.2f} | lr 1.00e-03 | grad_norm 0.500 | "
                               f"tps 1,000 (2,000 total) | tflops 6.00 | mfu 60.0% | mem ")
    assert lines[0].endswith(" GiB | data_wait 0.200 s | skipped 0") and lines[1].endswith("skipped 1")

    resumed = metrics(2)   # from the checkpoint of step 2: step 4 of the first run is history that did not happen
    resumed.step(5.0, data_wait=0.0, seconds=1.0)
    resumed.log(3, 4, lr=1e-3, grad_norm=0.5, skipped=0, tokens_seen=3000)
    resumed.validation(3, 1000.0)   # a diverged run: its perplexity is logged, not an OverflowError
    resumed.close()
    assert scalars(tmp_path, "train/loss") == {2: 3.0, 3: 5.0}
    assert scalars(tmp_path, "val/ppl")[3] == math.inf


@pytest.mark.parametrize("loss, ppl", [(60.0, math.exp(60.0)), (math.inf, math.inf), (1000.0, math.inf)])
def test_the_perplexity_of_a_diverging_run_is_its_loss_exponentiated(tmp_path, capsys, loss, ppl):
    """Not held at exp(50) above a loss of 50, nor NaN for a loss of inf."""
    metrics = Metrics(True, tmp_path / "tensorboard", every=1, progress_bar=False, start_step=0, max_steps=1,
                      tokens_per_step=1000, world_size=1, flops_per_token=6.0, peak_flops=None,
                      device=torch.device("cpu"))
    metrics.step(loss, data_wait=0.0, seconds=1.0)
    metrics.log(1, 1, lr=1e-3, grad_norm=math.inf, skipped=1, tokens_seen=1000)
    metrics.close()
    assert scalars(tmp_path, "train/ppl") == {1: pytest.approx(ppl, rel=1e-6)}   # (stored as float32)
    assert f"| ppl {ppl:.2f} |" in capsys.readouterr().out


@pytest.mark.parametrize("rows, columns", [(24, 0), (0, 0)], ids=["no width", "no size"])
def test_a_terminal_that_reports_no_size_shows_the_progress_bar(rows, columns, tmp_path, monkeypatch):
    """`script` without a terminal of its own reports 0 x 0; tqdm drew nothing there."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    with open(terminal, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        metrics = Metrics(True, tmp_path / "tensorboard", every=1, progress_bar=True, start_step=1, max_steps=3,
                          tokens_per_step=1000, world_size=1, flops_per_token=6.0, peak_flops=None,
                          device=torch.device("cpu"))
        metrics.step(2.5, data_wait=0.0, seconds=0.5)
        metrics.close()
    text = os.read(controller, 1 << 16).decode(errors="replace")
    os.close(controller)
    assert re.search(r"\b2/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.?]+(step/s|s/step), loss=2\.5000\]", text), text


@pytest.mark.slow
@pytest.mark.parametrize("columns", [120, 0], ids=["120 columns", "no width"])
def test_a_terminal_shows_a_progress_bar_with_the_time_left(columns, pg19_shards, tmp_path):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(train_command(1, pg19_shards.root, tmp_path, "train.max_steps=3"), cwd=ROOT,
                               env=_env(), stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    screen, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        if not select.select([controller], [], [], 1.0)[0]:
            continue
        try:
            screen += os.read(controller, 4096)
        except OSError:   # the terminal is gone: the run has exited
            break
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = screen.decode(errors="replace")
    # tqdm: "2/3 [00:01<00:00,  1.52step/s, loss=6.8777]", the time left after "<"
    assert re.search(r"\b\d/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step), loss=\d\.\d{4}\]", text), text[-2000:]
    assert "step 3/3 | loss" in text


def checkpoints(output_dir):
    return sorted(p.name for p in (Path(output_dir) / "checkpoints").glob("step-*"))


def module_state(checkpoint):
    return torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def assert_resumes_bit_for_bit(run, output_dir, ranks, shards, *overrides):
    """A 3-step run with a checkpoint at step 2, resumed from it in output_dir: step 3's loss and weights are the
    run's, bit for bit. Returns the resumed run's result."""
    shutil.copytree(run / "checkpoints" / "step-00000002", output_dir / "checkpoints" / "step-00000002")
    resumed = train(ranks, shards, output_dir, "train.max_steps=3", *overrides)
    assert scalars(output_dir, "train/loss") == {3: scalars(run, "train/loss")[3]}
    final = load_model(output_dir / "checkpoints" / "step-00000003").state_dict()
    straight = load_model(run / "checkpoints" / "step-00000003").state_dict()
    assert all(torch.equal(final[name], straight[name]) for name in straight)   # step 3's update too
    return resumed


@pytest.fixture(scope="module")
def straight_run(pg19_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    train(2, pg19_shards.root, output, f"train.max_steps={STEPS}")
    return output


@pytest.mark.slow
def test_two_ranks_learn_log_and_checkpoint(straight_run):
    losses = scalars(straight_run, "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < first - 0.3, losses
    for tag in ("train/ppl", "train/lr", "train/grad_norm", "train/skipped_steps", "train/tokens_seen", "perf/tps",
                "perf/tps_total", "perf/tflops", "perf/mfu", "perf/memory_gib", "perf/data_wait_s"):
        assert sorted(scalars(straight_run, tag)) == list(range(1, STEPS + 1)), tag
    assert scalars(straight_run, "train/tokens_seen")[STEPS] == STEPS * 8 * 64
    assert sorted(scalars(straight_run, "val/loss")) == [8, 16]
    assert checkpoints(straight_run) == ["step-00000008", "step-00000012", "step-00000016"]  # the latest 3
    latest = straight_run / "checkpoints" / "step-00000016"
    assert {"meta.json", "rank-00000.pt", "rank-00001.pt", "tokenizer.model"} <= {p.name for p in latest.iterdir()}
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["state"] == {"step": STEPS, "consumed_samples": STEPS * 8, "tokens_seen": STEPS * 8 * 64,
                             "skipped_steps": 0, "skipped_in_a_row": 0}
    assert meta.keys() == {"format", *META_KEYS} and meta["world_size"] == 2 and meta["zero_stage"] == 1


@pytest.mark.slow
def test_bf16_precision_reaches_the_engines_forward(pg19_shards, straight_run, tmp_path):
    """train.precision=bf16 on the CPU: DeepSpeed runs its module under its own autocast setting, so only a
    forward under the engine's bf16 autocast gives a first gradient near, but not at, the fp32 run's (whose
    first loss and gradient one rank reproduces to the last bits)."""
    result = train(1, pg19_shards.root, tmp_path, "train.max_steps=1", "train.precision=bf16")
    assert "1 rank on cpu in bf16 autocast" in result.stdout
    bf16, fp32 = scalars(tmp_path, "train/grad_norm")[1], scalars(straight_run, "train/grad_norm")[1]
    assert 1e-5 < abs(bf16 / fp32 - 1) < 0.02, (bf16, fp32)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun", "deepspeed --no_python", "deepspeed --hostfile"])
def test_other_launchers_start_the_same_two_ranks(launcher, pg19_shards, straight_run, tmp_path):
    script_and_args = train_command(1, pg19_shards.root, tmp_path, "train.max_steps=2")[1:]
    env, port = {**_env(), "PYTHON": sys.executable}, str(free_port())
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed --hostfile":
        # The example's two nodes, one GPU each, over ssh and pdsh: the stand-ins in tests/cluster start both nodes'
        # launchers on this machine, in the bare environment of an ssh login, which gets OMP_NUM_THREADS only
        # from the DeepSpeed environment file.
        (tmp_path / "deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
        env.update(PATH=os.pathsep.join([str(ROOT / "tests" / "cluster"), os.environ["PATH"]]),
                   DS_ENV_FILE=str(tmp_path / "deepspeed_env"))
        tasks = [(env, [str(bin_dir / "deepspeed"), "--hostfile", "launch/hostfile.example", "--num_gpus", "1",
                        "--master_port", port, *script_and_args])]
    elif launcher == "srun":   # what srun sets in each of 2 tasks on one node, running the script as a program
        tasks = [({**env, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                   "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port}, ["bash", *script_and_args]) for rank in range(2)]
    elif launcher == "torchrun":
        tasks = [(env, [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
                        *script_and_args])]
    else:
        tasks = [(env, [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--no_python",
                        *script_and_args])]
    processes = [subprocess.Popen(command, cwd=ROOT, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for task_env, command in tasks]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    assert "2 ranks on cpu" in outputs[0][0]
    assert scalars(tmp_path, "train/loss") == {step: scalars(straight_run, "train/loss")[step] for step in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("started_by", ["deepspeed", "bash launch/train.sh"])
def test_stopped_by_sigterm_and_resumed_equals_the_straight_run(started_by, pg19_shards, straight_run, tmp_path):
    # Data loading in a worker process too: it must outlive the signal.
    command = train_command(2, pg19_shards.root, tmp_path, f"train.max_steps={STEPS}", "data.num_workers=1")
    env = _env()
    if started_by == "bash launch/train.sh":   # which starts the launcher itself
        command, env = as_bash_script(command)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    if started_by == "deepspeed":   # whose launcher passes no signal on: to every process, as Slurm does
        output = output_stopped_at(process, 4, lambda: os.killpg(process.pid, signal.SIGTERM))
    else:                           # to the script alone, as `kill PID` or a container's stop does
        output = output_stopped_at(process, 4, lambda: process.send_signal(signal.SIGTERM))
    if started_by == "deepspeed":
        assert "stopped by SIGTERM" in output, output[-3000:]
    else:   # the script outlived the signal, passed it on as SIGUSR1, and waited for the ranks
        assert process.returncode == 0 and "stopped by SIGUSR1" in output, output[-3000:]
        # DeepSpeed's per-node launcher, had it got the SIGTERM, would have killed the ranks 30 s later
        assert "Killing subprocess" not in output, output[-3000:]
    stopped_at = checkpoints(tmp_path)[-1]
    step = int(stopped_at.split("-")[1])
    assert 4 < step < STEPS

    resumed = train(2, pg19_shards.root, tmp_path, f"train.max_steps={STEPS}", "data.num_workers=1")
    assert f"resumed from {tmp_path / 'checkpoints' / stopped_at} at step {step}" in resumed.stdout
    assert scalars(tmp_path, "train/loss") == scalars(straight_run, "train/loss")   # every step, bit for bit
    final, straight = module_state(tmp_path / "checkpoints" / "step-00000016"), module_state(
        straight_run / "checkpoints" / "step-00000016")
    assert all(torch.equal(final[name], straight[name]) for name in straight)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["during setup", "before the ranks catch it"])
def test_a_signal_during_start_up_stops_the_run_after_its_first_step(pg19_shards, tmp_path, when):
    """`bash launch/train.sh` starts the ranks with the stop signals ignored. They catch them from before setup,
    and read a signal that came before that from the script's stop file: either would otherwise be lost, and the
    run would go on to the end."""
    command, env = as_bash_script(train_command(2, pg19_shards.root, tmp_path, "train.max_steps=40"))
    if when == "before the ranks catch it":
        env["PYTHONPATH"] = late_start(tmp_path / "late_start", "'RANK' in os.environ")
    script = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    usr1 = 1 << (signal.SIGUSR1 - 1)
    while True:
        ranks = [int(re.search(r"SigCgt:\s*(\w+)", process.read_text()).group(1), 16) & usr1
                 for process in _rank_statuses(script.pid)]
        if when == "during setup" and any(ranks) or when == "before the ranks catch it" and len(ranks) == 2:
            break
        assert script.poll() is None, script.stdout.read()[-3000:]
        time.sleep(0.05)
    assert when == "during setup" or not any(ranks)
    script.send_signal(signal.SIGTERM)
    output = script.communicate(timeout=300)[0]
    assert script.returncode == 0, output[-3000:]
    assert output.index("launch/train.sh: SIGTERM") < output.index("TensorBoard:"), output[-3000:]
    # rank 0 says "stopped by SIGUSR1" (caught) or "by SIGTERM" (the stop file), or "by a signal to another
    # rank" if the other rank caught it first
    assert "at step 1; resume with" in output and checkpoints(tmp_path) == ["step-00000001"], output[-3000:]


@pytest.mark.slow
def test_the_script_passes_a_signal_on_where_it_cannot_write_its_stop_file(pg19_shards, tmp_path):
    command, env = as_bash_script(train_command(2, pg19_shards.root, tmp_path, "train.max_steps=40"))
    env["TMPDIR"] = str(tmp_path / "absent")
    script = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    output = output_stopped_at(script, 2, lambda: script.send_signal(signal.SIGTERM))
    assert script.returncode == 0 and "stopped by SIGUSR1" in output, output[-3000:]
    assert int(checkpoints(tmp_path)[-1].split("-")[1]) < 40


@pytest.mark.slow
def test_ctrl_c_on_a_run_without_a_launcher_checkpoints_and_stops(pg19_shards, tmp_path):
    process = subprocess.Popen(train_command(1, pg19_shards.root, tmp_path, "train.max_steps=40",
                                             "optimizer.warmup_steps=4"),
                               cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = output_stopped_at(process, 2, lambda: process.send_signal(signal.SIGINT))
    assert process.returncode == 0 and "Traceback" not in output, output[-3000:]
    step = int(re.search(r"stopped by SIGINT at step (\d+)", output).group(1))
    assert checkpoints(tmp_path) == [f"step-{step:08d}"] and step < 40
    # the learning rate logged is the step's own: 1/5, 2/5, ... of optimizer.lr over the warm-up
    assert scalars(tmp_path, "train/lr")[2] == pytest.approx(3e-3 * 2 / 5)


@pytest.mark.slow
def test_a_run_resumed_at_or_past_max_steps_trains_nothing(pg19_shards, straight_run, tmp_path):
    shutil.copytree(straight_run / "checkpoints" / "step-00000008", tmp_path / "checkpoints" / "step-00000008")
    done = train(1, pg19_shards.root, tmp_path, "train.max_steps=8")
    assert done.stdout.strip().splitlines()[-1] == (f"{tmp_path / 'checkpoints' / 'step-00000008'} is at "
                                                   "train.max_steps=8: nothing to train (raise train.max_steps "
                                                   "to train on)")
    past = train(1, pg19_shards.root, tmp_path, "train.max_steps=5", check=False)
    assert past.returncode == 1 and past.stderr.strip().splitlines()[-1].endswith(
        "is at step 8, past train.max_steps=5: raise train.max_steps to train on")
    assert checkpoints(tmp_path) == ["step-00000008"] and not (tmp_path / "tensorboard").exists()
    # a checkpoint of two ranks, not converted for one: nothing was to be loaded
    assert not (tmp_path / "checkpoints" / "step-00000008" / "universal").exists()


def test_the_config_may_come_after_the_overrides(tmp_path):
    result = subprocess.run([sys.executable, "launch/train.sh", "--set", "train.max_steps=2",
                             str(tmp_path / "absent.json")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == f"error: {tmp_path / 'absent.json'}: no such config file\n"
    result = subprocess.run([sys.executable, "launch/train.sh", "configs/tiny_cpu.json", "--set", "x=1", "y"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.endswith(
        "error: expected one config file and KEY=VALUE overrides, got configs/tiny_cpu.json y\n")


def test_a_launcher_option_after_the_script_is_refused_saying_where_it_goes():
    result = subprocess.run([sys.executable, "launch/train.sh", "configs/tiny_cpu.json", "--num_gpus", "2"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.endswith(
        "error: unrecognized arguments: --num_gpus 2 (launcher options such as --num_gpus go before "
        "launch/train.sh, or in DEEPSPEED_ARGS for bash launch/train.sh)\n"), result.stderr


def late_start(folder, condition):
    """A PYTHONPATH on which the processes that meet `condition` (a Python expression on os.environ) start 5 s
    late: a sitecustomize.py, which Python runs before anything else."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(f"import os, time\nif {condition}:\n    time.sleep(5)\n")
    return str(folder)


def _rank_statuses(script_pid):
    """/proc/<pid>/status of the training ranks under the script (started with a --local_rank argument)."""
    statuses = []
    for child in psutil.Process(script_pid).children(recursive=True):
        try:
            if any(arg.startswith("--local_rank=") for arg in child.cmdline()):
                statuses.append(Path(f"/proc/{child.pid}/status"))
        except psutil.NoSuchProcess:   # a short-lived helper process of the launcher
            pass
    return statuses


def test_a_slurm_job_submitted_from_outside_the_repository_stops_with_one_line(tmp_path):
    env = {**os.environ, "PATH": os.pathsep.join([str(ROOT / "tests" / "cluster"), os.environ["PATH"]]),
           "FAKE_SLURM_DIR": str(tmp_path), "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm_h800.sbatch")], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr == (f"launch/slurm_h800.sbatch: submit it from the repository "
                                                        f"root: {tmp_path} has no launch/train.sh\n")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["time limit", "pre-emption"])
def test_slurm_job_checkpoints_when_stopped_and_resumes(stop, pg19_shards, straight_run, tmp_path):
    """launch/slurm_h800.sbatch on two nodes of one rank each, under the stand-in Slurm of tests/cluster, which runs
    every node's task on this machine: each task is the DeepSpeed launcher with --no_ssh --node_rank. Before the
    time limit Slurm sends SIGUSR1 to the batch script alone, which requeues the job; on pre-emption it sends
    SIGTERM to every process of the job, and requeues the job itself (or not, as the cluster is set up)."""
    job_id = f"test{os.getpid()}"
    env = {**_env(), "PATH": os.pathsep.join([str(ROOT / "tests" / "cluster"), str(Path(sys.executable).parent),
                                              os.environ["PATH"]]),
           "FAKE_SLURM_DIR": str(tmp_path), "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
           "SLURM_SUBMIT_DIR": str(ROOT), "CONFIG": "configs/tiny_cpu.json", "SLURM_GPUS_ON_NODE": "1",
           "MASTER_PORT": str(free_port())}
    expected_requeues = f"{job_id}\n" if stop == "time limit" else ""   # a pre-empted job: Slurm's to requeue

    def requeues():
        return (tmp_path / "requeued").read_text() if (tmp_path / "requeued").exists() else ""

    def slurm_stops(job):
        if stop == "time limit":   # --signal=B:USR1@300
            job.send_signal(signal.SIGUSR1)
        else:
            job.send_signal(signal.SIGTERM)
            subprocess.run(["scancel", "--signal=TERM", f"{job_id}.0"], env=env, check=True)

    output = tmp_path / "run"
    command = ["bash", "launch/slurm_h800.sbatch", "--set", *TINY, f"data.path={pg19_shards.root}",
               f"output_dir={output}", f"train.max_steps={STEPS}"]
    try:
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        log = output_stopped_at(job, 4, lambda: slurm_stops(job))
        if stop == "time limit":
            assert job.returncode == 0 and "stopped by SIGUSR1" in log, log[-3000:]
        else:   # the script outlived SIGTERM and waited for the ranks
            assert job.returncode not in (-signal.SIGTERM, 128 + signal.SIGTERM), log[-3000:]
            assert "pre-empted: waiting" in log and "stopped by SIGTERM" in log, log[-3000:]
        assert "2 ranks on cpu" in log and requeues() == expected_requeues
        stopped_at = checkpoints(output)[-1]
        assert 4 < int(stopped_at.split("-")[1]) < STEPS

        resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"resumed from {output / 'checkpoints' / stopped_at}" in resumed.stdout
        assert requeues() == expected_requeues   # a job that finishes is not requeued
        assert scalars(output, "train/loss") == scalars(straight_run, "train/loss")
    finally:
        (ROOT / "runs" / f"hostfile-{job_id}").unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("run, zero", [("straight_run", []), ("zero2_run", [CLUSTER_DEEPSPEED]),
                                       ("zero3_run", [ZERO3])], ids=["zero1", "zero2", "zero3"])
def test_resume_on_one_rank_and_back_on_two_continues_the_data_order(run, zero, request, pg19_shards, straight_run,
                                                                     tmp_path):
    """A checkpoint of two ranks resumed on one, and that one's on two again, with ZeRO stage 1, 2 or 3: the same
    samples in the same steps and the whole optimizer state, so they follow the two-rank run; only the order of the
    gradient sums differs."""
    saved = request.getfixturevalue(run)
    first = checkpoints(saved)[0]
    shutil.copytree(saved / "checkpoints" / first, tmp_path / "checkpoints" / first)
    result = train(1, pg19_shards.root, tmp_path, "train.max_steps=10", *zero)
    assert "resumed from" in result.stdout and "accumulation 4 x 1 data-parallel ranks" in result.stdout
    result = train(2, pg19_shards.root, tmp_path, "train.max_steps=12", *zero)
    assert "step-00000010" in result.stdout and "accumulation 2 x 2 data-parallel ranks" in result.stdout
    rescaled, two_ranks = scalars(tmp_path, "train/loss"), scalars(straight_run, "train/loss")
    assert sorted(rescaled) == list(range(int(first.split("-")[1]) + 1, 13))
    for step in rescaled:
        assert rescaled[step] == pytest.approx(two_ranks[step], rel=1e-4)
    resumed = load_model(tmp_path / "checkpoints" / "step-00000012").state_dict()
    straight = load_model(straight_run / "checkpoints" / "step-00000012").state_dict()
    for name in straight:   # two steps with a wrong AdamW step count move weights by 1e-4
        assert torch.allclose(resumed[name], straight[name], rtol=0, atol=2e-6), name
    meta = json.loads((tmp_path / "checkpoints" / "step-00000012" / "meta.json").read_text())
    assert meta["state"]["consumed_samples"] == 12 * 8 and meta["world_size"] == 2


@pytest.mark.slow
def test_a_stop_signal_during_the_conversion_of_a_checkpoint_stops_the_run_after_its_first_step(pg19_shards,
                                                                                             straight_run, tmp_path):
    """Slurm and `kill -- -PGID` signal every process, the conversion to the universal format too: it must finish."""
    shutil.copytree(straight_run / "checkpoints" / "step-00000008", tmp_path / "checkpoints" / "step-00000008")
    process = subprocess.Popen(train_command(1, pg19_shards.root, tmp_path, f"train.max_steps={STEPS}"), cwd=ROOT,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    while not _runs_a_child(process.pid, "deepspeed.checkpoint.ds_to_universal"):
        assert process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0 and "stopped by SIGTERM at step 9;" in output, output[-3000:]
    assert checkpoints(tmp_path) == ["step-00000008", "step-00000009"]
    assert scalars(tmp_path, "train/loss") == {9: pytest.approx(scalars(straight_run, "train/loss")[9], rel=1e-4)}


@pytest.mark.slow
def test_the_transformer_baseline_trains_exports_and_resumes_bit_for_bit(pg19_shards, tmp_path):
    """The paper's comparison model through the same loop (configs/transformer_200m_8k.json, at the tiny size)."""
    from training import export

    baseline = 'model={"arch": "transformer", "size": "tiny"}'
    straight = tmp_path / "straight"
    result = train(1, pg19_shards.root, straight, "train.max_steps=3", "checkpoint.every=2", baseline)
    assert "transformer with 0.26M parameters" in result.stdout
    assert_resumes_bit_for_bit(straight, tmp_path / "resumed", 1, pg19_shards.root, baseline)
    export.export(straight / "checkpoints", tmp_path / "export")
    assert type(load_pretrained(tmp_path / "export")).__name__ == "TransformerLM"


@pytest.mark.slow
@pytest.mark.parametrize("run, zero", [("zero2_run", [CLUSTER_DEEPSPEED]), ("zero3_run", [ZERO3])],
                         ids=["zero2", "zero3"])
def test_zero_stages_2_and_3_resume_bit_for_bit(run, zero, request, pg19_shards, tmp_path):
    """As the straight run's stage 1 does (stopped by SIGTERM), with more of the state partitioned."""
    assert_resumes_bit_for_bit(request.getfixturevalue(run), tmp_path, 2, pg19_shards.root, *zero)


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_run_and_resumes_bit_for_bit(pg19_shards, straight_run, tmp_path):
    """train.compile through the whole loop on two ranks: training, validation and a checkpoint with compiled
    layers give the eager run's losses (to the compiler's rounding), and a resumed compiled run continues exactly."""
    compiled = tmp_path / "compiled"
    result = train(2, pg19_shards.root, compiled, "train.compile=true", "train.max_steps=3", "checkpoint.every=2",
                   "validation.every=2")
    assert "2 ranks on cpu in fp32, layers compiled, ZeRO stage 1" in result.stdout
    losses, eager = scalars(compiled, "train/loss"), scalars(straight_run, "train/loss")
    assert losses == pytest.approx({step: eager[step] for step in (1, 2, 3)}, rel=1e-4)
    assert math.isfinite(scalars(compiled, "val/loss")[2])

    resumed = assert_resumes_bit_for_bit(compiled, tmp_path, 2, pg19_shards.root, "train.compile=true")
    assert "resumed from" in resumed.stdout


@pytest.fixture(scope="module")
def zero2_run(pg19_shards, tmp_path_factory):
    """Two ranks with the cluster config's ZeRO stage 2 and communication settings."""
    output = tmp_path_factory.mktemp("zero2")
    train(2, pg19_shards.root, output, "train.max_steps=3", "checkpoint.every=2", CLUSTER_DEEPSPEED)
    return output


@pytest.fixture(scope="module")
def zero3_run(pg19_shards, tmp_path_factory):
    """Two ranks with ZeRO stage 3 (parameters partitioned), otherwise the straight run."""
    output = tmp_path_factory.mktemp("zero3")
    train(2, pg19_shards.root, output, "train.max_steps=3", "checkpoint.every=2", ZERO3)
    return output


@pytest.fixture(scope="module")
def zero0_run(pg19_shards, tmp_path_factory):
    """One rank without ZeRO, the straight run's global batch as 4 micro-batches: clipped by the stack's
    optimizer rather than DeepSpeed's, with no gradient all-reduce."""
    output = tmp_path_factory.mktemp("zero0")
    train(1, pg19_shards.root, output, "train.max_steps=3", "deepspeed.zero_optimization.stage=0")
    return output


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero3_run", "zero0_run"])
def test_other_zero_stages_follow_the_zero1_run_step_for_step(run, request, straight_run):
    # ZeRO-3 with gradient accumulation must reduce exactly what ZeRO-1 does; stage 0 must clip as ZeRO-1 does.
    assert any(norm > CLIP for step, norm in scalars(straight_run, "train/grad_norm").items() if step <= 3)
    for tag in ("train/loss", "train/grad_norm"):
        other, zero1 = scalars(request.getfixturevalue(run), tag), scalars(straight_run, tag)
        assert sorted(other) == [1, 2, 3]
        for step in other:
            assert other[step] == pytest.approx(zero1[step], rel=1e-4), (tag, step)


@pytest.mark.slow
def test_the_validation_loss_does_not_depend_on_the_number_of_ranks(zero0_run, zero3_run):
    # Both follow the straight run's weights (above); their 3 validation windows are shared out as 3 on one rank,
    # and as 2 and 1 plus an unscored one on two ZeRO-3 ranks.
    one_rank, two_ranks = scalars(zero0_run, "val/loss"), scalars(zero3_run, "val/loss")
    assert sorted(one_rank) == sorted(two_ranks) == [3]
    assert one_rank[3] == pytest.approx(two_ranks[3], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["straight_run", "zero2_run", "zero3_run"])
def test_exported_weights_give_the_logits_of_the_trained_model(run, request, tmp_path):
    """The export (from the module's state) equals the ZeRO optimizer's fp32 master weights, on every rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = request.getfixturevalue(run) / "checkpoints"
    latest = root / checkpoints(root.parent)[-1]
    cli = subprocess.run([sys.executable, "-m", "training.export", str(latest), str(tmp_path / "export")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    exported = load_pretrained(tmp_path / "export")
    info = json.loads((tmp_path / "export" / "config.json").read_text())
    meta = json.loads((latest / "meta.json").read_text())
    assert info["step"] == meta["state"]["step"] and info["tokenizer_checksum"] == meta["tokenizer_checksum"]
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == (latest / "tokenizer.model").read_bytes()

    master = build_model(exported.config)
    master_state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=latest.name)
    master.load_state_dict({name.removeprefix("model."): tensor for name, tensor in master_state.items()})
    ids = torch.randint(0, 1024, (2, 96))
    with torch.no_grad():
        expected = master(ids)[0]
        assert torch.equal(exported(ids)[0], expected)
        assert torch.equal(load_model(root)(ids)[0], expected)   # evaluation's way in: a folder of checkpoints


@pytest.mark.slow
def test_an_export_onto_a_file_or_from_a_damaged_checkpoint_stops_with_one_line(straight_run, tmp_path, capsys):
    from training import export

    latest = straight_run / "checkpoints" / checkpoints(straight_run)[-1]
    (tmp_path / "a_file").write_text("")
    assert export.main([str(latest), str(tmp_path / "a_file")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'a_file'}: a file, not a folder to export to\n"

    damaged = tmp_path / "damaged" / latest.name
    shutil.copytree(latest, damaged)
    weights = damaged / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert export.main([str(damaged), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {damaged}: cannot load the model (")
    assert not (tmp_path / "out").exists()


def fake_run(root, section=None):
    """A run folder with one checkpoint, as far as export reads it (the weights of a tiny model), without training."""
    step = root / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    model = build_model({"arch": "memmamba", "size": "tiny", "notes": False})
    torch.save({"module": {f"model.{k}": v for k, v in model.state_dict().items()}},
               step / "mp_rank_00_model_states.pt")
    (step / "meta.json").write_text(json.dumps({
        **dict.fromkeys(META_KEYS), "format": FORMAT,
        "model": section or {"arch": "memmamba", "size": "tiny", "notes": False}, "zero_stage": 1,
        "tokenizer_checksum": "0" * 64, "state": {"step": 1, "tokens_seen": 64}}))
    return step


@pytest.mark.parametrize("source, out, message", [
    ("{step}", "{checkpoints}", "{checkpoints}: inside training checkpoints ({checkpoints})"),
    ("{checkpoints}", "{step}/export", "{step}/export: inside training checkpoints ({step})"),
    ("{checkpoints}", "{checkpoints}/export", "{checkpoints}/export: inside training checkpoints ({checkpoints})"),
    ("{checkpoints}", "/proc/export", "/proc/export: cannot be made (/proc is not writable"),
    ("{checkpoints}", "{tmp}/a_file/export", "{tmp}/a_file/export: cannot be made ({tmp}/a_file is a file)"),
    ("{run}", "{tmp}/out", "{run}: a training run; its checkpoints are in {checkpoints}"),
    ("{tmp}/nowhere", "{tmp}/out", "{tmp}/nowhere: no such folder"),
    ("{tmp}/exported", "{tmp}/out", "{tmp}/exported: already an exported model; copy the folder instead"),
])
def test_an_export_into_checkpoints_or_from_a_wrong_folder_stops_with_one_line(tmp_path, capsys, source, out,
                                                                                message):
    from training import export

    step = fake_run(tmp_path / "run")
    save_pretrained(build_model({"arch": "memmamba", "size": "tiny"}), tmp_path / "exported")
    (tmp_path / "a_file").write_text("")
    names = dict(step=step, checkpoints=step.parent, run=tmp_path / "run", tmp=tmp_path)
    assert export.main([source.format(**names), out.format(**names)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(**names)}") and err.count("\n") == 1
    assert sorted(p.name for p in step.parent.iterdir()) == ["step-00000001"]
    assert sorted(p.name for p in step.iterdir()) == ["meta.json", "mp_rank_00_model_states.pt"]


def test_an_export_to_an_empty_path_is_refused_rather_than_written_into_the_working_folder(tmp_path, capsys,
                                                                                           monkeypatch):
    from training import export

    step = fake_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert export.main([str(step), ""]) == 1
    assert capsys.readouterr().err == "error: the folder to export to is an empty path\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_interrupted_export_leaves_no_folder_it_made(tmp_path, capsys, monkeypatch):
    import model.pretrained
    from training import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    step = fake_run(tmp_path / "run")
    monkeypatch.setattr(model.pretrained, "save_file", interrupted)
    assert export.main([str(step), str(tmp_path / "exports" / "tiny")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_export_holds_the_latest_checkpoints_weights_progress_and_tokenizer(tmp_path, capsys):
    from training import export

    first = fake_run(tmp_path / "run")
    latest = first.parent / "step-00000002"   # a later checkpoint, of other weights
    latest.mkdir()
    torch.manual_seed(1)
    weights = build_model({"arch": "memmamba", "size": "tiny", "notes": False}).state_dict()
    torch.save({"module": {f"model.{k}": v for k, v in weights.items()}}, latest / "mp_rank_00_model_states.pt")
    meta = {**json.loads((first / "meta.json").read_text()), "state": {"step": 2, "tokens_seen": 128},
            "tokenizer_checksum": "a" * 64}
    (latest / "meta.json").write_text(json.dumps(meta))
    (latest / "tokenizer.model").write_bytes(b"pieces")

    out = tmp_path / "out"
    assert export.main([str(first.parent), str(out)]) == 0 and capsys.readouterr().out == f"exported {out}\n"
    config = json.loads((out / "config.json").read_text())
    assert {key: config[key] for key in ("step", "tokens_seen", "tokenizer_checksum", "checkpoint")} == {
        "step": 2, "tokens_seen": 128, "tokenizer_checksum": "a" * 64, "checkpoint": str(latest)}
    assert (out / "tokenizer.model").read_bytes() == b"pieces"
    exported = load_pretrained(out).state_dict()
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    assert export.trained_tokenizer_checksum(out) == export.trained_tokenizer_checksum(first.parent) == "a" * 64


def test_a_checkpoint_whose_weights_disagree_with_its_model_section_names_the_tensor(tmp_path, capsys):
    from training import export

    step = fake_run(tmp_path, {"arch": "memmamba", "size": "tiny", "notes": False, "d_state": 4})
    assert export.main([str(step), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {step}: weights do not match its model section (size "
                                              "mismatch for layers.0.mixer.A_log")


def test_a_checkpoint_whose_model_section_cannot_be_built_names_its_meta_json(tmp_path, capsys):
    from training import export

    step = fake_run(tmp_path, {"arch": "memmamba", "size": "tiny", "window": 8})   # e.g. a later version's setting
    assert export.main([str(step), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {step / 'meta.json'}: unknown key model.window") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_stops_the_resume_and_the_export_with_one_line(pg19_shards, tmp_path, capsys):
    from training import export

    train(1, pg19_shards.root, tmp_path / "run", "train.max_steps=1")
    for damage in ("truncated", "missing", "missing rank file"):
        output = tmp_path / damage
        shutil.copytree(tmp_path / "run", output)
        latest = output / "checkpoints" / "step-00000001"
        weights = latest / ("rank-00000.pt" if damage == "missing rank file" else "mp_rank_00_model_states.pt")
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            weights.unlink()
        result = train(1, pg19_shards.root, output, "train.max_steps=2", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {latest}: damaged ("), errors
        assert errors[0].endswith(f"); move it out of {latest.parent} to resume from the checkpoint before it")
        assert checkpoints(output) == ["step-00000001"]
        if damage != "missing rank file":   # which an export does not read
            assert export.main([str(latest), str(tmp_path / "export")]) == 1
            assert capsys.readouterr().err.startswith(f"error: {latest}: cannot load the model (")


@pytest.mark.slow
def test_a_file_of_another_rank_damaged_stops_every_rank_with_one_line(pg19_shards, straight_run, tmp_path):
    """Rank 1's optimizer state truncated (a copy that did not finish): rank 0 loads its own and must not go on to
    wait for rank 1 in the first step's all-reduce."""
    latest = tmp_path / "checkpoints" / "step-00000016"
    shutil.copytree(straight_run / "checkpoints" / "step-00000016", latest)
    optimizer = latest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    result = train(2, pg19_shards.root, tmp_path, f"train.max_steps={STEPS + 1}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {latest}: damaged ({optimizer.name} is truncated); move it out of {latest.parent} "
                      "to resume from the checkpoint before it"], result.stderr[-3000:]


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_trained_weights(pg19_shards, straight_run, tmp_path):
    # A learning rate too small to move anything: the new run's weights are those it started from.
    source = straight_run / "checkpoints"
    started_run = train(1, pg19_shards.root, tmp_path, "train.max_steps=1", "optimizer.lr=1e-30",
                        f"train.init_from={source}")
    started, trained = load_model(tmp_path / "checkpoints").state_dict(), load_model(source).state_dict()
    assert started.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(started[name], trained[name], rtol=0, atol=1e-12, msg=name)
    meta = json.loads((tmp_path / "checkpoints" / "step-00000001" / "meta.json").read_text())
    assert meta["state"]["step"] == 1 and meta["state"]["consumed_samples"] == 8   # a new run, not a resume
    assert f"initialised from {source}" in started_run.stdout

    other = train(1, pg19_shards.root, tmp_path / "other", "train.max_steps=1", f"train.init_from={source}",
                  "model.n_layer=2", check=False)
    assert other.returncode == 1
    assert re.search(r"checkpoint of a different model: parameter layers\.2\.\S+ is \[.*\] there and absent here",
                     other.stderr), other.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_steps_are_skipped_then_the_run_aborts(pg19_shards, tmp_path, stage):
    # A huge learning rate: step 1 is applied and ruins the weights, after which every loss is NaN.
    result = train(1, pg19_shards.root, tmp_path, "train.max_steps=8", "optimizer.lr=1e30",
                   "train.max_skipped_steps=3", "checkpoint.every=1", "checkpoint.keep=10",
                   f"deepspeed.zero_optimization.stage={stage}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 3 steps in a row had a non-finite loss")
    assert checkpoints(tmp_path) == ["step-00000001", "step-00000002", "step-00000003"]
    after_1, after_3 = (module_state(tmp_path / "checkpoints" / name) for name in ("step-00000001", "step-00000003"))
    assert all(torch.equal(after_1[name], after_3[name]) for name in after_1)   # the skipped steps changed nothing
    meta = json.loads((tmp_path / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["state"]["skipped_steps"] == 2 and meta["state"]["skipped_in_a_row"] == 2

    # Resumed, the run goes on counting: its first step is the third in a row.
    resumed = train(1, pg19_shards.root, tmp_path, "train.max_steps=8", "optimizer.lr=1e30",
                    "train.max_skipped_steps=3", "checkpoint.every=1", "checkpoint.keep=10",
                    f"deepspeed.zero_optimization.stage={stage}", check=False)
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1].startswith(
        "error: 3 steps in a row had a non-finite loss or gradient (step 4,"), resumed.stderr
    assert checkpoints(tmp_path) == ["step-00000001", "step-00000002", "step-00000003"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks, layout", [(2, "accumulation 4 x 1 data-parallel ranks, of 64 tokens, each split"),
                                           (4, "accumulation 2 x 2 data-parallel ranks, of 64 tokens, each split")],
                         ids=["one-group-of-2", "2x2"])
def test_sequence_parallel_run_matches_the_data_parallel_run_and_resumes_bit_for_bit(pg19_shards, straight_run,
                                                                                    zero0_run, tmp_path, ranks,
                                                                                    layout):
    # Groups of 2 ranks split each 64-token window; the global batch, and so the data, stays that of the
    # straight run, and the loss must follow it step for step, as must the validation loss at the end.
    run = tmp_path / "run"
    result = train(ranks, pg19_shards.root, run, "train.max_steps=3", "parallel.sequence_parallel_size=2",
                   "checkpoint.every=2")
    assert f"{layout} over 2 ranks\n" in result.stdout
    sequence_parallel, data_parallel = scalars(run, "train/loss"), scalars(straight_run, "train/loss")
    assert sorted(sequence_parallel) == [1, 2, 3]
    for step in sequence_parallel:
        assert sequence_parallel[step] == pytest.approx(data_parallel[step], rel=1e-4)
    assert scalars(run, "val/loss")[3] == pytest.approx(scalars(zero0_run, "val/loss")[3], rel=1e-4)

    # Stopped and resumed in the same layout, it continues bit for bit.
    assert_resumes_bit_for_bit(run, tmp_path, ranks, pg19_shards.root, "parallel.sequence_parallel_size=2")

    if ranks == 2:   # resumed on one rank without sequence parallelism, it goes on with the same samples
        one_rank = tmp_path / "one-rank"
        shutil.copytree(run / "checkpoints" / "step-00000002", one_rank / "checkpoints" / "step-00000002")
        result = train(1, pg19_shards.root, one_rank, "train.max_steps=3")
        assert "resumed from" in result.stdout and "accumulation 4 x 1 data-parallel ranks" in result.stdout
        assert scalars(one_rank, "train/loss") == {3: pytest.approx(data_parallel[3], rel=1e-4)}


@pytest.mark.slow
def test_a_resumed_run_takes_the_configs_optimizer_settings_and_names_model_changes(pg19_shards, straight_run,
                                                                                     tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(straight_run / "checkpoints" / "step-00000008", tmp_path / "checkpoints" / "step-00000008")
    result = train(1, pg19_shards.root, tmp_path, "train.max_steps=10", "optimizer.lr=1e-3", "model.backend=torch")
    assert "note: model.backend is 'torch' here, 'auto' in the checkpoint" in result.stdout
    assert "note: optimizer.lr is 0.001 here, 0.003 in the checkpoint" in result.stdout
    assert scalars(straight_run, "train/lr")[9] == pytest.approx(3e-3)
    assert scalars(tmp_path, "train/lr") == {9: pytest.approx(1e-3), 10: pytest.approx(1e-3)}
    assert scalars(tmp_path, "train/loss")[9] == pytest.approx(scalars(straight_run, "train/loss")[9], rel=1e-4)


@pytest.mark.slow
def test_a_resumed_run_clips_with_the_configs_grad_clip(pg19_shards, straight_run, tmp_path):
    """ZeRO's optimizer loads the clipping it was saved with; a run resumed with another train.grad_clip must clip
    with that one."""
    shutil.copytree(straight_run / "checkpoints" / "step-00000008", tmp_path / "checkpoints" / "step-00000008")
    result = train(1, pg19_shards.root, tmp_path, "train.max_steps=10", "train.grad_clip=0.01")
    assert f"note: train.grad_clip is 0.01 here, {CLIP} in the checkpoint" in result.stdout
    assert scalars(straight_run, "train/grad_norm")[9] > 1.5 * CLIP   # clipped by the straight run
    resumed, straight = scalars(tmp_path, "train/loss"), scalars(straight_run, "train/loss")
    assert resumed[9] == pytest.approx(straight[9], rel=1e-4)   # the same weights and data before step 9's update
    assert resumed[10] != pytest.approx(straight[10], rel=1e-4)   # resumed with CLIP: within 1e-7


@pytest.mark.slow
def test_a_resume_with_another_global_batch_says_so_and_goes_on_with_the_next_samples(pg19_shards, straight_run,
                                                                                      tmp_path):
    step8 = tmp_path / "checkpoints" / "step-00000008"
    shutil.copytree(straight_run / "checkpoints" / "step-00000008", step8)
    result = train(1, pg19_shards.root, tmp_path, "train.max_steps=9", "train.global_batch_size=16")
    assert f"resumed from {step8} at step 8 with global batch 16 (was 8)\n" in result.stdout
    assert scalars(tmp_path, "train/tokens_seen") == {9: (8 * 8 + 16) * 64}
    meta = json.loads((tmp_path / "checkpoints" / "step-00000009" / "meta.json").read_text())
    assert meta["state"]["consumed_samples"] == 8 * 8 + 16
    # Step 9 trained on samples 64-79 of the global order, whatever the batch: its loss is theirs at step 8's weights.
    samples = data.train_dataset(load_config(CONFIGS / "tiny_cpu.json", [*TINY, f"data.path={pg19_shards.root}"]),
                                 pg19_shards.checksum)
    with torch.no_grad():
        expected = lm_loss(load_model(step8), torch.stack([samples[k] for k in range(64, 80)])).item()
    assert scalars(tmp_path, "train/loss")[9] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing key", "no shards", "vocabulary", "model shape", "another run",
                                     "rollback", "deepspeed key", "deepspeed value", "output is a file",
                                     "sequence length", "zero stage", "output_dir in use"])
def test_bad_input_stops_with_one_line_before_training(problem, pg19_shards, straight_run, tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    raw = json.loads((CONFIGS / "tiny_cpu.json").read_text())
    if problem == "missing key":
        del raw["train"]["max_steps"]
    config.write_text(json.dumps(raw))
    shutil.copy(pg19_shards.tokenizer_path, tmp_path / "tokenizer.model")  # a data.path without shards
    latest = straight_run / "checkpoints" / "step-00000016"
    saved = tmp_path / "run" / "checkpoints"
    if problem in ("another run", "rollback"):   # checkpoints that this run's saves would overwrite or mix with
        for name in ("step-00000008", "step-00000016"):
            shutil.copytree(straight_run / "checkpoints" / name, saved / name)
    if problem == "output_dir in use":   # as a run in progress holds it
        saved.parent.mkdir()
        lock = open(saved.parent / ".lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    overrides, expected = {
        "missing key": ([], "error: missing key train.max_steps"),
        "no shards": ([f"data.path={tmp_path}"],
                      f"error: {tmp_path}/train: no such directory (no prepared splits there); set by "
                      "data.train_split='train'"),
        "vocabulary": (["model.vocab_size=512"], "error: model.vocab_size (512) is smaller than the tokenizer's"),
        "model shape": ([f"checkpoint.resume={latest}", "model.d_model=32"],
                        f"error: {latest}: checkpoint of a different model: parameter embedding.weight is "
                        "[1024, 64] there and [1024, 32] here"),
        "another run": (["checkpoint.resume=never"], f"error: {saved}: holds checkpoints after step 0 "
                                                     "(step-00000008, step-00000016)"),
        "rollback": ([f"checkpoint.resume={saved / 'step-00000008'}"],
                     f"error: {saved}: holds checkpoints after step 8 (step-00000016)"),
        "deepspeed key": (['deepspeed.zero_optimisation={"stage": 2}'],
                          "error: unknown key deepspeed.zero_optimisation: DeepSpeed does not read it"),
        "deepspeed value": (["deepspeed.zero_optimization.overlap_comm=sometimes"],
                            "error: deepspeed.zero_optimization.overlap_comm: Input should be a valid boolean"),
        "output is a file": ([f"output_dir={config}/run"], f"error: output_dir {config}/run: {config} is a file"),
        "sequence length": ([f"checkpoint.resume={latest}", "data.seq_len=128"],
                            f"error: {latest}: data.seq_len is 128 here, 64 in the checkpoint, which would change "
                            "the order of the data"),
        "zero stage": ([f"checkpoint.resume={latest}", ZERO3],
                       f"error: {latest}: written with ZeRO stage 1, which stage 3 cannot load; resume it with "
                       "deepspeed.zero_optimization.stage=1"),
        "output_dir in use": ([], f"error: {saved.parent}: another run is writing into it"),
    }[problem]
    # Two ranks where the error comes before the process group exists, or only the first rank meets it: it is still
    # printed once, also when the first rank gets there last (the launcher kills every rank once one exits with an
    # error).
    ranks = 2 if problem in ("missing key", "output is a file", "output_dir in use") else 1
    if ranks == 2:
        monkeypatch.setenv("PYTHONPATH", late_start(tmp_path / "late_start", "os.environ.get('RANK') == '0'"))
    result = train(ranks, pg19_shards.root, tmp_path / "run", *overrides, check=False, config=config)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
    if problem == "model shape":   # and the setting that made it so
        assert errors[0].endswith(" here (model.d_model is 64 there and 32 here)")
    if problem == "sequence length":
        assert errors[0].endswith(f"; to train its weights on with this data, start a new run with "
                                  f"train.init_from={latest}")
    assert "Traceback" not in result.stderr and "global batch" not in result.stdout   # no engine was built


@pytest.mark.parametrize("rank, stopped", [("0", False), ("1", True), ("1", False)],
                         ids=["first process", "another rank stopped by the launcher", "another rank not stopped"])
def test_an_error_is_printed_by_the_first_process_or_by_a_rank_nothing_stops(rank, stopped, monkeypatch, capsys):
    """Another rank waits: the launcher stopping it means the first process met the error too and printed it;
    not stopped within the wait, it met the error on its own and prints it."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr("training.train.REPORT_WAIT_S", 60.0 if rank == "0" or stopped else 0.3)
    stop_signal = []
    if stopped:
        threading.Timer(0.2, stop_signal.append, ["SIGTERM"]).start()
    started = time.monotonic()
    _report(ConfigError("model.d_model: must be positive"), stop_signal)
    assert time.monotonic() - started < 30          # the first process and a stopped rank do not wait it out
    printed = {"0": "error: model.d_model: must be positive\n", "1": "error: rank 1: model.d_model: must be positive\n"}
    assert capsys.readouterr().err == ("" if stopped else printed[rank])


@pytest.mark.slow
def test_quickstart_prepares_data_trains_and_says_where_the_logs_are(tmp_path):
    env = {**_env(), "PYTHON": sys.executable, "DATA": str(tmp_path / "data"), "OUT": str(tmp_path / "run")}
    result = subprocess.run(["bash", "launch/quickstart.sh", "--set", "train.max_steps=2", "validation.windows=2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()
    assert f"TensorBoard logs: {tmp_path / 'run' / 'tensorboard'}" in result.stdout
    assert sorted(scalars(tmp_path / "run", "train/loss")) == [2]


def _runs_a_child(pid, word):
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if word in child.cmdline():
                return True
        except psutil.Error:   # a child that has just ended
            pass
    return False


def _env():
    # One thread per rank: the ranks share the cores, and OpenMP threads that wait for each other are slow.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


