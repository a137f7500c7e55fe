"""Results on disk: <out>/<task>.json (everything), <task>.md (the tables) and <task>.png
(a plot, only when matplotlib is installed; it is optional); while a task runs,
<task>.partial.json holds what it has finished, so that an interrupted run can go on."""
from __future__ import annotations

import json
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipeline.storage import local_folder_problem
from training.evaluation.common import EvalError, log

EXTENSIONS = ("json", "md", "png", "partial.json")


@dataclass
class Outcome:
    """What a task hands back: its settings and results (to JSON), its tables, maybe a plot.

    plot: {"title", "xlabel", "ylabel", "series": {name: (xs, ys)}, "logx", "logy"}.
    """
    settings: dict
    results: dict
    markdown: str
    plot: dict | None = field(default=None)


def fmt(value, digits: int = 2) -> str:
    """A table cell: '-' for a missing value."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def length_label(length: int) -> str:
    """4000 -> '4k' (the paper's column names), 4096 -> '4096'."""
    return f"{length // 1000}k" if length % 1000 == 0 else str(length)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def check_out(out: Path, task: str) -> None:
    """Refuse, before any work, a results folder that `write` could not fill."""
    problem = local_folder_problem(out)
    if problem:
        raise EvalError(f"--out {out}: cannot be a results folder ({problem})")
    for path in (out / f"{task}.{extension}" for extension in EXTENSIONS):
        if path.is_dir() or path.exists() and not os.access(path, os.W_OK):
            raise EvalError(f"--out {out}: cannot write {path}")


def identity(run: dict) -> dict:
    """What identifies a run's results (its task, settings and weights), as it reads back from a JSON file."""
    return json.loads(json.dumps(run, default=str))


def made_by(out: Path, task: str, run_identity: dict) -> bool:
    """Whether <out>/<task>.json holds the results of the run of this identity."""
    try:
        return json.loads((out / f"{task}.json").read_text()).get("identity") == run_identity
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def write(out: Path, task: str, argv: list[str], checkpoints: list, outcome: Outcome,
          run_identity: dict) -> list[Path]:
    """Write the task's files; returns their paths. `argv`: the command line, for the record."""
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "training.evaluate", *argv])
    record = {
        "task": task,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "host": platform.node()},
        "models": [c.describe() for c in checkpoints],
        "settings": outcome.settings,
        "results": outcome.results,
        "identity": run_identity,
    }
    paths = [out / f"{task}.json", out / f"{task}.md"]
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    paths[1].write_text(f"# {task}\n\n`{command}`\n\n{outcome.markdown}\n")
    if outcome.plot is not None and _plot(out / f"{task}.png", **outcome.plot):
        paths.append(out / f"{task}.png")
    return paths


class PartialResults:
    """The results of every finished unit of work (one model at one length, say), written to
    <out>/<task>.partial.json as each finishes, so that the same command run again after an interruption
    (Ctrl-C, a scheduler's time limit, a crash) does only what is left and writes the results an
    uninterrupted run would have.

    `command` identifies the run (`identity`): the task's settings, each model's weights and the hardware. Units of
    another command are never reused; its file is replaced by this run's first finished unit. The file
    goes once the results are written.
    """

    def __init__(self, out: Path, task: str, command: dict):
        self.path = out / f"{task}.partial.json"
        self.command = command
        self.units: dict[str, dict[str, object]] = {}
        if not self.path.exists():
            return
        try:
            record = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            log(f"{self.path}: unreadable ({error}); starting over")
            return
        if not isinstance(record, dict) or record.get("command") != self.command:
            log(f"{self.path}: from another command (other settings, weights or hardware); starting over")
            return
        self.units = record["units"]
        count = self.count()
        log(f"{self.path}: {count} finished unit{'s' * (count != 1)} of this command; going on from there")

    def has(self, model: str, unit) -> bool:
        return str(unit) in self.units.get(model, {})

    def get(self, model: str, unit):
        return self.units[model][str(unit)]

    def add(self, model: str, unit, result) -> None:
        """Record a finished unit; the file is replaced whole, so a kill mid-write keeps the previous one."""
        # kept as it reads back, so that a resumed run's results are those of an uninterrupted one
        self.units.setdefault(model, {})[str(unit)] = json.loads(json.dumps(result))
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text(json.dumps({"command": self.command, "units": self.units}) + "\n")
        os.replace(staging, self.path)

    def per_model(self, checkpoints: list, evaluate) -> dict:
        """{name: evaluate(checkpoint)} where a model's whole evaluation is one unit, done only where missing."""
        for checkpoint in checkpoints:
            if not self.has(checkpoint.name, "model"):
                self.add(checkpoint.name, "model", evaluate(checkpoint))
        return {checkpoint.name: self.get(checkpoint.name, "model") for checkpoint in checkpoints}

    def count(self) -> int:
        return sum(map(len, self.units.values()))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict, logx: bool = False,
          logy: bool = False) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=name)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:   # a tick at every measured length, named as in the tables
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        axes.set_xscale("log")
        axes.set_xticks(ticks, [length_label(x) for x in ticks])
        axes.minorticks_off()
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
