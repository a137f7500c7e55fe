"""What every evaluation shares: loading a checkpoint, the chunked state-carrying forward,
greedy decoding, and progress output.

Every long input runs chunk by chunk through `model.hidden_states(chunk, state)`, so memory
holds one chunk's activations and the model's state, whatever the input length (the
Transformer's state, its KV cache, grows with the input: that is the architecture).
"""
from __future__ import annotations

import hashlib
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from data_pipeline.tokenizer import Tokenizer
from model import build_model
from training.checkpoint import complete_checkpoints
from training.export import load_model, trained_tokenizer_checksum

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalError(Exception):
    """A one-line, user-facing problem (a missing file, a bad argument); the CLI prints it as is."""


@dataclass
class Checkpoint:
    """A model to evaluate and how tables name it."""
    name: str
    path: str
    model: nn.Module
    tokenizer: Tokenizer | None
    random_weights: bool = False        # a model built to be timed, whose weights do not matter

    @property
    def kind(self) -> str:
        """memmamba, mamba (MemMamba with notes off) or transformer."""
        config = self.model.config
        if config.arch == "memmamba" and not config.notes:
            return "mamba"
        return config.arch

    @cached_property
    def weights_sha256(self) -> str | None:
        """Which weights were evaluated; worked out when a task first records it (generation never does)."""
        return None if self.random_weights else digest_weights(self.model)

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "kind": self.kind,
                "params": sum(p.numel() for p in self.model.parameters()),
                "tokenizer_checksum": self.tokenizer.checksum if self.tokenizer else None,
                "weights_sha256": self.weights_sha256}


def load_checkpoint(path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    tokenizer_path: str | None = None, name: str | None = None,
                    need_tokenizer: bool = True) -> Checkpoint:
    """The one way evaluation loads a model: an exported folder (model.safetensors, config.json,
    tokenizer.model), a training checkpoint, or a folder of checkpoints (the latest).
    need_tokenizer=False: a missing tokenizer is no error, and the checkpoint has none."""
    folder = Path(path)
    if folder.is_file():   # e.g. the model.safetensors of an export
        raise EvalError(f"{path}: a file; give the checkpoint's folder")
    if not folder.is_dir():
        raise EvalError(f"{path}: no such checkpoint folder")
    model = load_model(folder, device).to(dtype).eval()
    expected = trained_tokenizer_checksum(folder)
    tokenizer_file = Path(tokenizer_path) if tokenizer_path else _tokenizer_next_to(folder)
    if tokenizer_file is None and not need_tokenizer:
        return Checkpoint(name or folder.name, str(folder), model, None)
    if tokenizer_file is None:
        raise EvalError(f"{path}: no tokenizer.model next to the weights; pass --tokenizer")
    tokenizer = Tokenizer(str(tokenizer_file))
    if expected and expected != tokenizer.checksum:
        raise EvalError(f"{tokenizer_file}: not the tokenizer {path} was trained with "
                        f"({tokenizer.checksum[:12]}... != {expected[:12]}...)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise EvalError(f"{tokenizer_file}: {tokenizer.vocab_size} pieces, more than the model's "
                        f"vocabulary of {model.config.vocab_size}")
    return Checkpoint(name or folder.name, str(folder), model, tokenizer)


def digest_weights(model: nn.Module) -> str:
    """A digest of the model's tensors (names, dtypes, shapes, values): which weights a result is of,
    whichever checkpoint of a run folder they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def random_model(spec: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """A randomly initialised model of a named size, "memmamba:200m", "mamba:130m" or
    "transformer:200m": enough for latency, which does not depend on the weights."""
    kind, _, size = spec.partition(":")
    section = {"memmamba": {"arch": "memmamba"}, "mamba": {"arch": "memmamba", "notes": False},
               "transformer": {"arch": "transformer"}}.get(kind)
    if section is None or not size:
        raise EvalError(f"--model {spec!r}: expected memmamba:SIZE, mamba:SIZE or transformer:SIZE")
    try:
        model = build_model({**section, "size": size})
    except ValueError as error:
        raise EvalError(f"--model {spec!r}: {error}") from None
    return Checkpoint(spec, spec, model.to(device=device, dtype=dtype).eval(), None, random_weights=True)


def _tokenizer_next_to(folder: Path) -> Path | None:
    candidates = [folder / "tokenizer.model"] + [c / "tokenizer.model" for c in complete_checkpoints(folder)[-1:]]
    return next((c for c in candidates if c.is_file()), None)


def unique_names(paths: list[str]) -> list[str]:
    """Table labels: the run's name for its checkpoints (runs/x/checkpoints -> x,
    runs/x/checkpoints/step-00001000 -> x/step-00001000), else the folder's name; the whole
    path where two labels would be the same."""
    names = []
    for path in map(Path, paths):
        if path.name.startswith("step-"):
            names.append(f"{path.parent.parent.name}/{path.name}")
        else:
            names.append(path.parent.name if path.name == "checkpoints" else path.name)
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


@torch.no_grad()
def chunked_hidden(model: nn.Module, ids: Tensor, chunk_len: int, keep: tuple[int, int] | None = None,
                   state=None, on_chunk: Callable[[int], None] | None = None):
    """Run ids [B, T] chunk by chunk, carrying the state; `on_chunk(tokens)` after each chunk (B x its length),
    so that progress shows inside an input that takes minutes.

    Returns (the final hidden states of positions [keep[0], keep[1]) as [B, n, D], or None
    without `keep`; the state after the last token).
    """
    kept = []
    for start in range(0, ids.shape[1], chunk_len):
        end = min(start + chunk_len, ids.shape[1])
        hidden, state = model.hidden_states(ids[:, start:end], state)
        if on_chunk is not None:
            on_chunk(ids.shape[0] * (end - start))
        if keep is not None and max(keep[0], start) < min(keep[1], end):
            kept.append(hidden[:, max(keep[0], start) - start:min(keep[1], end) - start])
    return (torch.cat(kept, 1) if keep is not None else None), state


@torch.no_grad()
def greedy(model: nn.Module, ids: Tensor, new_tokens: int, chunk_len: int, vocab_size: int | None = None,
           on_chunk: Callable[[int], None] | None = None) -> Tensor:
    """ids [B, T] -> the next `new_tokens` greedy tokens [B, new_tokens]: a chunked prefill (`on_chunk` as for
    chunked_hidden), then one `step` per token. `vocab_size`: only ids below it (a tokenizer smaller than the
    model's vocabulary)."""
    T = ids.shape[1]
    hidden, state = chunked_hidden(model, ids, chunk_len, keep=(T - 1, T), on_chunk=on_chunk)
    logits = model.lm_head(hidden[:, -1])
    out = []
    for i in range(new_tokens):
        token = logits[:, :vocab_size].argmax(-1)
        out.append(token)
        if i + 1 < new_tokens:
            logits, state = model.step(token, state)
    return torch.stack(out, 1)


def parse_length(text: str, option: str = "--lengths") -> int:
    """'4096', '4k' (4,000) or '64K' -> tokens."""
    text = str(text).strip().lower()
    scale = 1000 if text.endswith("k") else 1
    try:
        value = float(text.removesuffix("k")) * scale
    except ValueError:
        raise EvalError(f"{option} {text!r}: not a length (use e.g. 4096 or 4k)") from None
    if not 1 <= value < math.inf or value != int(value):   # also refuses nan and inf
        raise EvalError(f"{option} {text!r}: a length must be a positive whole number of tokens")
    return int(value)


def parse_lengths(texts: list[str], option: str = "--lengths") -> list[int]:
    """Lengths in the order given, each once (4k and 4000 are one column)."""
    return list(dict.fromkeys(parse_length(text, option) for text in texts))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on the device (MemAvailable for the CPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_kv_cache(checkpoints: list[Checkpoint], tokens: int, batch_size: int, device: torch.device,
                   option: str = "--lengths") -> None:
    """Refuse, before any work, a Transformer whose KV cache at `tokens` cannot fit in the device's memory.

    The cache grows with the input by design (MemMamba's state does not), and a process that runs out
    of memory on a CPU is killed by the kernel without a word, hours into a run; so the size is named
    up front, and a cache larger than the memory free now is an error instead.
    """
    free = available_memory(device)
    for checkpoint in checkpoints:
        if checkpoint.kind != "transformer":
            continue
        config, weight = checkpoint.model.config, next(checkpoint.model.parameters())
        need = 2 * config.n_layer * tokens * config.d_model * batch_size * weight.element_size()   # keys and values
        where = f"{checkpoint.name}: a Transformer's KV cache at {tokens:,} tokens (batch {batch_size}) takes " \
                f"{need / 2 ** 30:.1f} GiB, growing with the input"
        if free is not None and need > free:
            raise EvalError(f"{where}, more than the {free / 2 ** 30:.1f} GiB free on {device}; "
                            f"give it shorter {option}")
        if need >= 2 ** 30:
            log(f"note: {where}")


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name}: not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {name}: no such CUDA device ({torch.cuda.device_count()} available)")
    return device


def hardware(device: torch.device) -> str:
    """What runs the evaluation, as results and timings depend on it: the GPU's name, or the CPU's and its
    threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line for line in cpuinfo if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration, IndexError):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar on a terminal; otherwise a plain log line every `interval` seconds, with the time
    so far and an estimate of the time left.

    `total` and `update(n)` count work, not items: the tasks count tokens, because their items
    differ in cost by orders of magnitude (a 1k window and a 60k one), and an estimate from the
    share of items done would promise the end long before it comes.
    """

    def __init__(self, total: int, label: str, unit: str = "sample", interval: float = 30.0):
        self.total, self.label, self.unit, self.interval = total, label, unit, interval
        self.done, self.start = 0, time.monotonic()
        self.last, self.shown = self.start, None
        self.bar = tqdm(total=total, desc=label, unit=unit, unit_scale=True, file=sys.stderr,
                        dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, n: int = 1, status: str = "") -> None:
        """`n` more done, at the end of an item: the last item's update gives the final line."""
        self._count(n, status, self.done + n == self.total)

    def advance(self, n: int, status: str = "") -> None:
        """`n` more done inside an item (a chunk of a long window): a line only when the interval has passed,
        so that an item of minutes or hours still shows progress, and the item's `update` has the final say."""
        self._count(n, status, False)

    def _count(self, n: int, status: str, final: bool) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n)
            return
        if (time.monotonic() - self.last >= self.interval or final) and (self.done, status) != self.shown:
            self.last, self.shown = time.monotonic(), (self.done, status)
            log(f"{self.label}: {self.describe()}" + (f", {status}" if status else ""))

    def describe(self) -> str:
        """'1,200,000/6,500,000 tokens (18%), 2:01 elapsed, about 8:57 left'."""
        elapsed = time.monotonic() - self.start
        share = self.done / self.total if self.total else 1.0
        text = f"{self.done:,}/{self.total:,} {self.unit}s ({share:.0%}), {_clock(elapsed)} elapsed"
        if 0 < share < 1:
            text += f", about {_clock(elapsed * (1 - share) / share)} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    """3725.2 -> '1:02:05', 65 -> '1:05'."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
