"""The benchmark scripts that drive the training stack run end to end on the tiny config and print their tables.

No figure is checked against a target (that is what the scripts are for); the tests keep them runnable as the
stack under them changes.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import op_count, step_overhead, train_throughput

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args) -> str:
    done = subprocess.run([sys.executable, ROOT / "bench" / script, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def rows(table: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of a printed markdown table, header and rule left out."""
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_train_throughput_steps_each_variant_and_compares_memmamba_with_mamba(pg19_shards):
    out = bench("train_throughput.py", "--data", pg19_shards.root, "--seq-len", 64, "--warmup", 1, "--steps", 2,
                "--variants", "memmamba", "mamba")
    table = rows(out)
    assert table.keys() == {"memmamba", "mamba"}
    assert all(float(cells[0].replace(",", "")) > 0 for cells in table.values())   # tokens/s
    assert table["mamba"][3] == "1.00x"
    assert re.search(r"^bar: MemMamba >= 0.85x Mamba tokens/s: \d+\.\d\dx, (met|MISSED)$", out, re.M)


def test_train_throughput_stopped_by_a_time_limit_prints_the_steps_measured_so_far(pg19_shards):
    """A GPU session's command is ended by SIGTERM at its time limit: the figures measured until then are kept."""
    bench = subprocess.Popen([sys.executable, ROOT / "bench" / "train_throughput.py", "--data", pg19_shards.root,
                              "--seq-len", "64", "--warmup", "1", "--steps", "300", "--variants", "memmamba", "mamba"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    printed = []
    for line in bench.stdout:   # each step is printed as it ends
        printed.append(line)
        if line.startswith("step 2 of 301 (measured): memmamba "):
            bench.send_signal(signal.SIGTERM)
            break
    out = "".join(printed) + bench.communicate(timeout=60)[0]
    assert bench.returncode == 130, out
    table = rows(out)
    assert table.keys() == {"memmamba", "mamba"} and table["mamba"][3] == "1.00x"
    assert re.search(r"^tiny_cpu.json, 64 tokens per sequence, micro-batch 1, [1-9]\d* steps per variant", out, re.M)
    assert re.search(r"^bar: MemMamba >= 0.85x Mamba tokens/s: \d+\.\d\dx", out, re.M)


def test_train_throughput_peak_memory_is_each_variants_own_with_the_others_set_up_beside_it(monkeypatch):
    """On a GPU torch's allocated bytes and their peak, here counted by hand: the variants' set-ups and steps
    allocate as the benchmark takes turns."""
    allocated, peak = [0], [0]

    def allocate(n):
        allocated[0] += n
        peak[0] = max(peak[0], allocated[0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak[0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.__setitem__(0, allocated[0]))
    memory = train_throughput.DeviceMemory()
    for name, weights in (("large", 10), ("small", 1)):
        with memory.track(name):
            allocate(weights)
    for step in range(2):
        with memory.track("large"):
            allocate(20 if step == 0 else 0)   # the optimizer's state, made in the first step
            allocate(5)    # activations, freed by the end of the step
            allocate(-5)
        with memory.track("small"):
            allocate(2)
            allocate(-2)
    assert memory.peak == {"large": 10 + 20 + 5, "small": 1 + 2}


# train_throughput.py whose MemMamba runs out of memory in its second step
OUT_OF_MEMORY_IN_STEP_2 = """
import sys, torch
from bench import train_throughput
steps = []
def train_step(run):
    steps.extend([run] if run.cfg.model_config.notes else [])
    if len(steps) == 2 and run.cfg.model_config.notes:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\\nmore")
    return real(run)
real, train_throughput.train_step = train_throughput.train_step, train_step
sys.exit(train_throughput.main(sys.argv[1:]))
"""


def test_train_throughput_goes_on_without_a_variant_that_fails(pg19_shards):
    done = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_IN_STEP_2, "--data", pg19_shards.root, "--seq-len", "64",
                           "--warmup", "1", "--steps", "2", "--variants", "memmamba", "mamba"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr[-3000:]
    table = rows(done.stdout)
    assert table["memmamba"][0] == "failed in step 2: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert float(table["mamba"][0].replace(",", "")) > 0 and table["mamba"][3] == "1.00x"
    assert "step 3 of 3 (measured): mamba " in done.stdout and "bar:" not in done.stdout


def test_train_throughput_measures_mamba_ssm_alone(monkeypatch, capsys):
    """mamba_ssm's model on a GPU, here a stand-in that takes 10 ms a step; no variant of the stack is set up."""
    class MambaSsmStep:
        def __init__(self, config, micro_batch, seq_len, device):
            assert config.notes is False and device.type == "cuda"

        def step(self):
            time.sleep(0.01)

    monkeypatch.setattr(train_throughput, "MambaSsmStep", MambaSsmStep)
    monkeypatch.setattr(train_throughput, "mamba_ssm_available", lambda: True)
    assert train_throughput.main(["--data", "data/pg19-mini", "--seq-len", "64", "--warmup", "0", "--steps", "2",
                                  "--variants", "mamba_ssm", "--set", "logging.peak_tflops=1"]) == 0
    out = capsys.readouterr().out
    assert "2 steps per variant after 0 warm-up, taking turns; cuda, " in out
    tokens_per_s = float(rows(out)["mamba_ssm"][0].replace(",", ""))
    assert 64 / 0.1 < tokens_per_s < 64 / 0.01


@pytest.mark.parametrize("args, error", [
    (["--variants", "mamba", "mamba_ssm"], "error: the variant mamba_ssm needs a CUDA GPU and the mamba_ssm package "
                                           "(pip install -r requirements-cuda.txt --no-build-isolation)"),
    (["--set", "model.n_layr=2"], "error: unknown key model.n_layr for arch 'memmamba'; allowed: "),
    (["--config", "configs/nope.json"], "error: configs/nope.json: no such config file"),
])
def test_train_throughput_names_what_cannot_run_in_one_line_before_setting_anything_up(args, error, capsys):
    assert train_throughput.main(["--data", "data/pg19-mini", *args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(error) and err.count("\n") == 1


@pytest.mark.parametrize("args", [["--steps", "0"], ["--variants", "mamba_compiled", "--warmup", "0"]])
def test_train_throughput_refuses_runs_that_would_measure_nothing_or_compiling(args, capsys):
    with pytest.raises(SystemExit) as exit:
        train_throughput.main(["--data", "data/pg19-mini", *args])
    assert exit.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_step_overhead_counts_the_operations_of_each_phase(pg19_shards):
    table = rows(bench("step_overhead.py", "--config", ROOT / "configs" / "tiny_cpu.json", "--data",
                       pg19_shards.root))
    assert table.keys() == {"forward", "backward", "step"}
    assert all(int(cells[0]) > 0 for cells in table.values())


def test_op_count_and_step_overhead_name_a_mistyped_override_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        op_count.main(["--set", "model.n_layr=2"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and ": error: unknown key model.n_layr for arch 'memmamba'" in err
    assert "Traceback" not in err
    assert step_overhead.main(["--data", "data/pg19-mini", "--set", "model.n_layr=2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key model.n_layr for arch 'memmamba'") and err.count("\n") == 1


def test_op_count_finds_the_note_block_adds_operations_to_a_mamba_layer():
    table = rows(bench("op_count.py", "--config", ROOT / "configs" / "tiny_cpu.json", "--seq-len", 64))
    memmamba, mamba = (list(map(int, table[name][0].split(" / "))) for name in ("MemMamba", "Mamba"))
    assert memmamba[0] > mamba[0] > 0 and memmamba[1] > mamba[1] > 0
