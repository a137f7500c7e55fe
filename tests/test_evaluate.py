"""The evaluation runners and CLIs, on tiny checkpoints and pg19-mini."""
import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.reader import ShardedBooks
from data_pipeline.tokenizer import Tokenizer
from model import build_model, save_pretrained
from model.config import model_config_to_dict
from training import evaluate, generate
from training.checkpoint import FORMAT, META_KEYS
from data_pipeline import DataError
from training.export import load_model
from training.evaluation import common, passkey, perplexity, report
from training.evaluation.common import (Checkpoint, EvalError, chunked_hidden, greedy, load_checkpoint, parse_length,
                                        parse_lengths, unique_names)
from training.evaluation.fidelity import (CrossLayerStats, cosine_fidelity, expected_embedding, ridge_fidelity,
                                          ridge_score)
from training.evaluation.perplexity import evaluate as perplexity_evaluate, scored_nll, window_starts
from training.tasks import BookFiller, PasskeyTask

SPECS = {"memmamba": {"arch": "memmamba", "size": "tiny"},
         "mamba": {"arch": "memmamba", "size": "tiny", "notes": False},
         "transformer": {"arch": "transformer", "size": "tiny"}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(pg19_shards, tmp_path_factory):
    """Exported tiny models (random weights) with the session tokenizer next to them."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for name, spec in SPECS.items():
        torch.manual_seed(0)
        folders[name] = root / name
        save_pretrained(build_model(spec), folders[name], {"tokenizer_checksum": pg19_shards.checksum})
        shutil.copy(pg19_shards.tokenizer_path, folders[name] / "tokenizer.model")
    return folders


def book_window(pg19_shards, length, start=1000):
    books = ShardedBooks(pg19_shards.root, "test")
    return torch.from_numpy(books.tokens(0, start, start + length).astype(np.int64))[None]


@pytest.mark.parametrize("kind", SPECS)
def test_window_perplexity_is_exp_of_the_mean_nll_computed_by_hand(pg19_shards, checkpoints, kind):
    model = load_checkpoint(str(checkpoints[kind]), torch.device("cpu")).model
    window = book_window(pg19_shards, 301)
    with torch.no_grad():
        logits, _ = model(window[:, :-1])                        # one unchunked pass
    log_probs = torch.log_softmax(logits[0, -40:].double(), -1)
    by_hand = -log_probs.gather(1, window[0, -40:, None]).mean()
    nll = scored_nll(model, window, scored=40, chunk_len=64)    # five chunks, the last 40 kept
    assert nll.shape == (1, 40)
    torch.testing.assert_close(nll.mean().exp(), by_hand.exp(), rtol=1e-5, atol=0)


def test_windows_spread_over_the_book_and_short_books_are_skipped():
    assert window_starts(1001, 100, 10) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert window_starts(1001, 100, 3) == [0, 450, 900]
    assert window_starts(101, 100, 10) == [0]
    assert window_starts(100, 100, 10) == []


class Books:
    """Two books of given lengths, in ShardedBooks' interface."""

    def __init__(self, *lengths):
        rng = np.random.default_rng(0)
        self.data = [rng.integers(5, 1000, n) for n in lengths]
        self.num_tokens = np.array(lengths)
        self.books = [{"book_id": str(i)} for i in range(len(lengths))]

    def __len__(self):
        return len(self.data)

    def tokens(self, index, start, stop):
        return self.data[index][start:stop]


def test_perplexity_pools_the_windows_of_the_books_long_enough(checkpoints, tmp_path):
    checkpoint = load_checkpoint(str(checkpoints["mamba"]), torch.device("cpu"))
    books = Books(70, 200)
    args = argparse.Namespace(windows_per_book=3, scored=20, batch_size=2, chunk_len=32, device="cpu")
    short, long = perplexity_evaluate(checkpoint, books, [50, 100], args, report.PartialResults(tmp_path, "ppl", {}))
    assert (short["books"], short["books_skipped"], short["windows"]) == (2, 0, 6)
    assert (long["books"], long["books_skipped"], long["windows"], long["tokens"]) == (1, 1, 3, 60)
    nll = torch.cat([scored_nll(checkpoint.model, torch.from_numpy(books.data[1][s:s + 101])[None], 20, 32)
                     for s in window_starts(200, 100, 3)])
    assert math.isclose(long["ppl"], float(nll.mean().exp()), rel_tol=1e-9)
    assert long["ci95"][0] < long["ppl"] < long["ci95"][1]


def test_progress_counts_tokens_so_the_time_left_holds_when_long_windows_come_last(checkpoints, capsys,
                                                                                   monkeypatch, tmp_path):
    class EveryUpdate(perplexity.Progress):   # a log line at every update, not every 30 s
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, interval=0.0)
    monkeypatch.setattr(perplexity, "Progress", EveryUpdate)
    checkpoint = load_checkpoint(str(checkpoints["mamba"]), torch.device("cpu"))
    args = argparse.Namespace(windows_per_book=1, scored=20, batch_size=1, chunk_len=64, device="cpu")
    perplexity_evaluate(checkpoint, Books(500, 500), [50, 400], args, report.PartialResults(tmp_path, "ppl", {}))
    lines = capsys.readouterr().err.splitlines()
    # the two 50-token windows are 100 of 900 tokens, not 2 of 4 windows: half done would promise the end too soon
    assert "100/900 tokens (11%)" in lines[1] and "left" in lines[1] and "window 2/2 of 50 tokens" in lines[1]
    assert "900/900 tokens (100%)" in lines[-1] and "left" not in lines[-1]


def test_a_long_window_shows_progress_chunk_by_chunk_before_it_ends(checkpoints, pg19_shards, capsys, monkeypatch,
                                                                     tmp_path):
    class EveryChunk(common.Progress):   # a log line whenever one is due, not every 30 s
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, interval=0.0)
    monkeypatch.setattr(perplexity, "Progress", EveryChunk)
    monkeypatch.setattr(passkey, "Progress", EveryChunk)
    checkpoint = load_checkpoint(str(checkpoints["memmamba"]), torch.device("cpu"))
    args = argparse.Namespace(windows_per_book=1, scored=20, batch_size=1, chunk_len=64, device="cpu")
    perplexity_evaluate(checkpoint, Books(201), [200], args, report.PartialResults(tmp_path, "ppl", {}))
    lines = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    # one window of 200 tokens read in chunks of 64, 64, 64 and 8: a line after each, the last one once
    assert [line.split(" tokens")[0] for line in lines] == ["64/200", "128/200", "192/200", "200/200"]
    assert all(line.endswith(", window 1/1 of 200 tokens") for line in lines)

    task = PasskeyTask(checkpoint.tokenizer, BookFiller(ShardedBooks(pg19_shards.root, "test")))
    args = argparse.Namespace(samples=1, batch_size=1, chunk_len=64, device="cpu", seed=0)
    passkey.evaluate(checkpoint, task, [150], [0.5], args, report.PartialResults(tmp_path, "passkey", {}))
    lines = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert [line.split(" tokens")[0] for line in lines] == ["64/150", "128/150", "150/150", "150/150"]
    assert lines[2].endswith(", sample 1/1 of 150 tokens")   # the prompt read, the key not yet decoded
    assert re.search(r", sample 1/1 of 150 tokens, [01]\.00 correct$", lines[3])


def test_greedy_decoding_with_a_chunked_prefill_equals_generate(pg19_shards, checkpoints):
    for kind in SPECS:
        model = load_checkpoint(str(checkpoints[kind]), torch.device("cpu")).model
        prompt = book_window(pg19_shards, 30)
        expected = model.generate(prompt, 4, greedy=True)[:, 30:]
        assert torch.equal(greedy(model, prompt, 4, chunk_len=7), expected)
        few = model.generate(prompt, 4, greedy=True, vocab_size=20)[:, 30:]   # a tokenizer of 20 pieces
        assert (few < 20).all() and torch.equal(greedy(model, prompt, 4, chunk_len=7, vocab_size=20), few)


def test_a_100k_token_passkey_prompt_runs_in_chunks_with_a_constant_state(pg19_shards, checkpoints, tmp_path):
    checkpoint = load_checkpoint(str(checkpoints["memmamba"]), torch.device("cpu"))
    model = checkpoint.model
    chunks, state_bytes = [], []
    forward = model.hidden_states

    def recording(ids, state=None):
        hidden, state = forward(ids, state)
        chunks.append(ids.shape[1])
        state_bytes.append(sum(t.numel() * t.element_size() for t in _tensors(state)))
        return hidden, state

    model.hidden_states = recording
    task = PasskeyTask(checkpoint.tokenizer, BookFiller(ShardedBooks(pg19_shards.root, "test")))
    args = argparse.Namespace(samples=1, batch_size=1, chunk_len=8192, device="cpu", seed=0)
    result = passkey.evaluate(checkpoint, task, [100_000], [0.5], args, report.PartialResults(tmp_path, "passkey", {}))
    assert sum(chunks) == 100_000 and max(chunks) == 8192 and len(chunks) == 13
    assert len(set(state_bytes)) == 1                           # the memory does not grow with the input
    assert result["lengths"][0]["length"] == 100_000 and len(result["predictions"]) == 1


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def test_token_fidelity_is_one_for_identical_and_near_zero_for_unrelated_representations():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 500, 64, generator=g)
    assert cosine_fidelity(t, t, 0) == pytest.approx((1000.0, 1000))
    total, count = cosine_fidelity(t, torch.randn(2, 500, 64, generator=g), 0)
    assert abs(total / count) < 0.02
    shifted = torch.roll(t, 8, dims=1)                          # t^_{i+8} = t_i
    total, count = cosine_fidelity(t, shifted, 8)
    assert count == 2 * 492 and total / count == pytest.approx(1.0)


def test_cross_layer_fidelity_is_one_for_identical_and_near_zero_for_unrelated_layers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 32, generator=g)
    assert ridge_fidelity(x, x) == pytest.approx(1.0, abs=1e-4)
    assert ridge_fidelity(x, x @ torch.randn(32, 32, generator=g) * 0.3) == pytest.approx(1.0, abs=1e-4)
    assert abs(ridge_fidelity(x, torch.randn(4000, 32, generator=g))) < 0.05


def test_cross_layer_statistics_streamed_in_chunks_give_the_one_shot_score():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(1, 600, 16, generator=g)]
    for _ in range(3):
        layers.append(torch.tanh(layers[-1] @ torch.randn(16, 16, generator=g)) + 0.1 * torch.randn(1, 600, 16))
    stats = CrossLayerStats(4, 16, [1, 2], "cpu")
    for piece in (slice(0, 250), slice(250, 600)):
        stats.add([h[:, piece] for h in layers])
    expected = [ridge_fidelity(layers[l][0], layers[l + 2][0]) for l in range(2)]
    assert stats.scores(2, 1e-4) == pytest.approx(expected, abs=1e-9)
    assert len(stats.scores(1, 1e-4)) == 3
    repeated = CrossLayerStats(4, 16, [2, 2], "cpu")                  # a gap given twice counts once
    repeated.add(layers)
    assert repeated.scores(2, 1e-4) == pytest.approx(expected, abs=1e-9)
    x = layers[0][0].double()
    assert ridge_score(x.T @ x, x.T @ x, float((x * x).sum()), float((x * x).sum())) == pytest.approx(1, abs=1e-4)


def test_expected_embedding_of_a_certain_prediction_is_that_tokens_embedding():
    model = build_model({**SPECS["transformer"], "tie_embeddings": False})
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(model.config.vocab_size, 64) * 100)   # logit v = 100 * hidden[v]
    hidden = torch.zeros(1, 3, 64)
    hidden[0, torch.arange(3), torch.tensor([5, 9, 60])] = 1.0
    t_hat = expected_embedding(model, hidden)
    torch.testing.assert_close(t_hat[0], model.embedding.weight[[5, 9, 60]], rtol=1e-4, atol=1e-4)


def run_cli(module, argv, capsys):
    code = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_passkey_depth_given_twice_is_one_row(pg19_shards, checkpoints, tmp_path, capsys):
    argv = ["passkey", "--checkpoint", checkpoints["memmamba"], "--data", pg19_shards.root, "--lengths", 100,
            "--depths", 1, 0, 1.0, "--samples", 1, "--out", tmp_path]
    code, out, _ = run_cli(evaluate, argv, capsys)
    assert code == 0
    rows = [line.split(" |")[0] for line in out.splitlines() if line.startswith("| depth")]
    assert rows == ["| depth 1", "| depth 0"]
    result = json.loads((tmp_path / "passkey.json").read_text())
    assert result["settings"]["depths"] == [1.0, 0.0]
    assert [p["depth"] for p in result["results"]["memmamba"]["predictions"]] == [1.0, 0.0]


def test_every_evaluation_runs_end_to_end_on_tiny_checkpoints(pg19_shards, checkpoints, tmp_path, capsys):
    models = [arg for kind in SPECS for arg in ("--checkpoint", checkpoints[kind])]
    data = ["--data", pg19_shards.root]
    runs = {
        "ppl": [*data, "--lengths", 64, 128, "--windows-per-book", 2, "--scored", 20, "--chunk-len", 50],
        "passkey": [*data, "--lengths", 100, 200, "--depths", 0, 1, "--samples", 1, "--batch-size", 2],
        "retrieval": [*data, "--distractors", 1, 2, 1, "--samples", 2],   # a value given twice is one column
        "fidelity": [*data, "--length", 96, "--windows", 2, "--gaps", 1, 2, 5, "--chunk-len", 40],
    }
    for task, argv in runs.items():
        code, out, err = run_cli(evaluate, [task, *models, *argv, "--out", tmp_path / task], capsys)
        assert code == 0, err
        record = json.loads((tmp_path / task / f"{task}.json").read_text())
        assert [m["kind"] for m in record["models"]] == ["memmamba", "mamba", "transformer"]
        assert set(record["results"]) == {"memmamba", "mamba", "transformer"}
        assert (tmp_path / task / f"{task}.md").read_text().count("| transformer |") >= 1
        assert "| memmamba |" in out
    ppl = json.loads((tmp_path / "ppl" / "ppl.json").read_text())["results"]
    assert all(1 < entry["ppl"] < 2000 and entry["windows"] == 6 for r in ppl.values() for entry in r)
    passkey_run = json.loads((tmp_path / "passkey" / "passkey.json").read_text())["results"]["mamba"]
    assert [e["length"] for e in passkey_run["lengths"]] == [100, 200] and len(passkey_run["predictions"]) == 4
    retrieval = json.loads((tmp_path / "retrieval" / "retrieval.json").read_text())["results"]
    assert all([e["distractors"] for e in entries] == [1, 2] for entries in retrieval.values())
    fidelity = json.loads((tmp_path / "fidelity" / "fidelity.json").read_text())["results"]
    assert fidelity["memmamba"]["eclmf"]["5"] is None and len(fidelity["memmamba"]["eclmf_per_layer"]["1"]) == 3
    assert all(-1 <= r["etmf"][d] <= 1 for r in fidelity.values() for d in ("0", "8", "16", "32"))


def test_latency_compares_with_the_transformer(checkpoints, tmp_path, capsys):
    mamba = tmp_path / "mamba"   # without a tokenizer: latency never decodes
    shutil.copytree(checkpoints["mamba"], mamba, ignore=shutil.ignore_patterns("tokenizer.model"))
    argv = ["latency", "--model", "memmamba:tiny", "--model", "transformer:tiny", "--checkpoint", mamba,
            "--lengths", 32, 64, "--positions", 40, "--repeats", 1, "--gen-tokens", 2, "--out", tmp_path]
    code, out, err = run_cli(evaluate, argv, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "latency.json").read_text())["results"]
    assert set(results["ratios"]) == {"mamba", "memmamba:tiny"}
    forward = results["models"]["memmamba:tiny"]["forward"]
    assert [e["length"] for e in forward] == [32, 64] and all(e["ms"] > 0 for e in forward)
    assert results["models"]["transformer:tiny"]["generation"][0]["position"] == 40
    assert "Mean latency ratio mamba / transformer:tiny" in out


def test_generate_streams_the_decoded_continuation(checkpoints, capsys):
    code, out, err = run_cli(generate, ["--checkpoint", checkpoints["memmamba"], "--prompt", "It was a dark night",
                                        "--max-new-tokens", 12, "--greedy"], capsys)
    assert code == 0, err
    model = load_checkpoint(str(checkpoints["memmamba"]), torch.device("cpu"))
    ids = torch.tensor([model.tokenizer.encode("It was a dark night")])
    tokens = model.model.generate(ids, 12, greedy=True)[0, ids.shape[1]:].tolist()
    assert out == model.tokenizer.decode(tokens) + "\n"
    assert "12 new tokens" in err


def test_text_stream_reassembles_multibyte_characters(pg19_shards):
    tokenizer = Tokenizer(str(pg19_shards.tokenizer_path))
    text = "Ünïcode — “quotes” and 漢字, then plain text again."
    ids = tokenizer.encode(text)
    stream = generate.TextStream(tokenizer, [])
    assert "".join(stream.push(i) for i in ids) == text


def test_text_stream_prints_bytes_that_make_no_character_rather_than_wait_for_ever(pg19_shards):
    tokenizer = Tokenizer(str(pg19_shards.tokenizer_path))
    stray = tokenizer.encode("漢")[-1]   # its last byte (byte fallback), which no character starts with
    stream = generate.TextStream(tokenizer, tokenizer.encode("It was"))
    assert "".join(stream.push(stray) for _ in range(8)) == "\ufffd" * 8
    assert stream.push(tokenizer.encode("a")[-1]) == "a"


@pytest.mark.parametrize("argv, message", [
    (["ppl", "--checkpoint", "nowhere", "--data", "x"], "nowhere: no such checkpoint folder"),
    (["ppl", "--checkpoint", "{memmamba}/model.safetensors", "--data", "x"],
     "memmamba/model.safetensors: a file; give the checkpoint's folder"),
    (["ppl", "--data", "x"], "give at least one --checkpoint"),
    (["passkey", "--checkpoint", "{memmamba}", "--data", "{data}", "--lengths", "4x"], "'4x': not a length"),
    (["passkey", "--checkpoint", "{memmamba}", "--data", "{data}", "--lengths", "20"],
     "--lengths 20: a passkey prompt needs at least"),
    (["ppl", "--checkpoint", "{memmamba}", "--data", "{data}", "--split", "nope"],
     "nope: no such directory (prepared splits there: test, train, validation)"),
    (["retrieval", "--checkpoint", "{memmamba}"], "needs --passages"),
    (["latency", "--model", "memmamba:huge"], "model.size must be one of"),
    (["latency", "--model", "mamba:tiny", "--model", "mamba:tiny"], "--model mamba:tiny is given twice"),
    (["ppl", "--checkpoint", "{memmamba}", "--checkpoint", "{memmamba}/", "--data", "{data}"], "is given twice"),
    (["fidelity", "--checkpoint", "{memmamba}", "--data", "{data}", "--windows", "0"],
     "--length, --windows and --gaps must be positive"),
    (["fidelity", "--checkpoint", "{memmamba}", "--data", "{data}", "--ridge", "-1"], "--ridge must be zero or"),
    (["ppl", "--checkpoint", "{memmamba}", "--data", "{data}", "--device", "foo"], "--device foo: not a device"),
    (["ppl", "--checkpoint", "{memmamba}", "--data", "{data}", "--lengths", "inf"], "--lengths 'inf': a length"),
    (["ppl", "--checkpoint", "{memmamba}", "--data", "{data}", "--lengths", "nan"], "--lengths 'nan': a length"),
    (["latency", "--model", "mamba:tiny", "--positions", "1e400"], "--positions '1e400': a length"),
    (["passkey", "--checkpoint", "{memmamba}", "--data", "{data}", "--key-digits", "20"], "--key-digits must be"),
    (["retrieval", "--checkpoint", "{memmamba}", "--passages", "{data}"], "pg19_shards0: is a directory"),
    (["retrieval", "--checkpoint", "{memmamba}", "--passages", "{data}/tokenizer.model"],
     "tokenizer.model: not UTF-8 text"),
    (["ppl", "--checkpoint", "{memmamba}", "--data", "{data}", "--out", "{data}/tokenizer.model"],
     "tokenizer.model: cannot be a results folder"),
])
def test_problems_end_with_one_line_and_status_1(pg19_shards, checkpoints, capsys, argv, message):
    argv = [a.format(memmamba=checkpoints["memmamba"], data=pg19_shards.root) for a in argv]
    code, _, err = run_cli(evaluate, argv, capsys)
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def write_training_checkpoint(model, step_folder):
    """What training/checkpoint.py writes, as far as loading the weights reads it (of an unknown tokenizer)."""
    step_folder.mkdir(parents=True)
    torch.save({"module": {f"model.{k}": v for k, v in model.state_dict().items()}},
               step_folder / "mp_rank_00_model_states.pt")
    (step_folder / "meta.json").write_text(json.dumps({
        **dict.fromkeys(META_KEYS), "format": FORMAT, "model": model_config_to_dict(model.config), "zero_stage": 1,
        "tokenizer_checksum": "0" * 64}))


@pytest.mark.parametrize("damage", ["model.safetensors", "config.json", "mp_rank_00_model_states.pt", "meta.json"])
def test_a_damaged_checkpoint_is_named_in_one_line(checkpoints, tmp_path, capsys, damage):
    folder = tmp_path / "copy"
    if damage in ("model.safetensors", "config.json"):
        shutil.copytree(checkpoints["mamba"], folder)
        path = folder / damage
    else:
        folder = folder / "step-00000001"
        write_training_checkpoint(load_checkpoint(str(checkpoints["mamba"]), torch.device("cpu")).model, folder)
        path = folder / damage
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])   # truncated
    expected = f"{path}: not valid JSON (" if damage == "meta.json" else f"{folder}: cannot load the model ("
    for module, argv in [(evaluate, ["latency", "--lengths", 8, "--positions"]), (generate, [])]:
        code, _, err = run_cli(module, [*argv, "--checkpoint", folder, "--device", "cpu"], capsys)
        assert code == 1 and err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_generate_names_a_prompt_file_that_is_not_text_and_stops_on_ctrl_c(checkpoints, tmp_path, capsys,
                                                                             monkeypatch):
    (tmp_path / "prompt.txt").write_bytes(b"abc\xff")
    code, _, err = run_cli(generate, ["--checkpoint", checkpoints["mamba"], "--prompt-file", tmp_path / "prompt.txt"],
                           capsys)
    assert code == 1 and err == f"error: {tmp_path / 'prompt.txt'}: not UTF-8 text (byte 3)\n"

    model_class = type(load_checkpoint(str(checkpoints["memmamba"]), torch.device("cpu")).model)
    stream = model_class.stream

    def interrupted_after_three(*args, **kwargs):
        for count, token in enumerate(stream(*args, **kwargs)):
            if count == 3:
                raise KeyboardInterrupt
            yield token
    monkeypatch.setattr(model_class, "stream", interrupted_after_three)
    code, _, err = run_cli(generate, ["--checkpoint", checkpoints["memmamba"], "--prompt", "It was a dark night",
                                      "--max-new-tokens", 12, "--greedy"], capsys)
    assert code == 130 and "3 new tokens" in err and err.endswith(", interrupted\n")


def test_generate_interrupted_while_the_model_loads_says_so_in_one_line(checkpoints, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "load_checkpoint", interrupted)
    code, out, err = run_cli(generate, ["--checkpoint", checkpoints["mamba"]], capsys)
    assert (code, out, err) == (130, "", "interrupted\n")


@pytest.mark.parametrize("argv, source", [(["--prompt-file", "-"], "stdin"),
                                          (["--prompt", os.fsdecode(b"abc\xff")], "--prompt")])
def test_generate_names_a_prompt_on_stdin_or_the_command_line_that_is_not_text(checkpoints, capsys, monkeypatch,
                                                                               argv, source):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff")))
    code, _, err = run_cli(generate, ["--checkpoint", checkpoints["mamba"], *argv], capsys)
    assert code == 1 and err == f"error: {source}: not UTF-8 text (byte 3)\n"


def test_generate_into_a_pipe_that_closes_stops_quietly(checkpoints):
    """As `python -m training.generate ... | head -c 1`."""
    argv = ["-m", "training.generate", "--checkpoint", checkpoints["memmamba"], "--prompt", "It was", "--greedy",
            "--max-new-tokens", 100_000, "--device", "cpu"]
    with subprocess.Popen([sys.executable, *map(str, argv)], cwd=Path(__file__).resolve().parents[1],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout.read(1)
        process.stdout.close()
        err = process.stderr.read()
    assert process.returncode == 0 and err.startswith("[generate] ") and err.count("\n") == 1, err


def test_generate_names_a_device_that_does_not_exist(checkpoints, capsys):
    code, _, err = run_cli(generate, ["--checkpoint", checkpoints["mamba"], "--device", "foo"], capsys)
    assert code == 1 and err == "error: --device foo: not a device (cpu, cuda, cuda:1 ...)\n"


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_it_cannot_sample_with(checkpoints, capsys, temperature):
    code, _, err = run_cli(generate, ["--checkpoint", checkpoints["mamba"], "--temperature", temperature], capsys)
    assert code == 1 and err.startswith("error: ") and "--temperature (finite)" in err and err.count("\n") == 1


def test_ctrl_c_ends_an_evaluation_with_one_line_and_status_130(pg19_shards, checkpoints, tmp_path, capsys,
                                                                monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(perplexity, "evaluate", interrupted)
    argv = ["ppl", "--checkpoint", checkpoints["mamba"], "--data", pg19_shards.root, "--lengths", 200,
            "--out", tmp_path]
    assert run_cli(evaluate, argv, capsys)[::2] == (130, "interrupted\n")


def test_sigterm_ends_an_evaluation_as_ctrl_c_does_and_leaves_no_empty_results_folder(pg19_shards, checkpoints,
                                                                                      tmp_path, capsys, monkeypatch):
    def terminated(*args):   # what the SIGTERM handler does when the signal comes midway
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "SIGTERM would end the evaluation without a word"
        handler(signal.SIGTERM, None)
    monkeypatch.setattr(perplexity, "evaluate", terminated)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["ppl", "--checkpoint", checkpoints["mamba"], "--data", pg19_shards.root, "--lengths", 200,
            "--out", tmp_path / "eval" / "results"]   # as launch/eval.sh all: runs/eval/<name>/<task>
    assert run_cli(evaluate, argv, capsys)[::2] == (130, "interrupted\n")
    assert not (tmp_path / "eval").exists()
    assert signal.getsignal(signal.SIGTERM) == before   # given back as it was

RESUMABLE = {
    "ppl": ["--lengths", 64, 128, "--windows-per-book", 2, "--scored", 20, "--chunk-len", 50],
    "passkey": ["--lengths", 100, 200, "--depths", 0, 1, "--samples", 1],
    "retrieval": ["--distractors", 1, 2, "--samples", 2],
    "fidelity": ["--length", 96, "--windows", 2, "--gaps", 1],
}


def interrupt_in_the_second_unit(monkeypatch):
    """Ctrl-C at the first progress update after a unit of work has been kept: halfway through the next."""
    kept = []
    add = report.PartialResults.add

    def keep(self, model, unit, result):
        add(self, model, unit, result)
        kept.append((model, str(unit)))

    def update(self, *args, **kwargs):
        if kept:
            raise KeyboardInterrupt
    monkeypatch.setattr(report.PartialResults, "add", keep)
    monkeypatch.setattr(common.Progress, "update", update)
    return kept


@pytest.mark.parametrize("task", RESUMABLE)
def test_an_interrupted_evaluation_goes_on_where_it_stopped_with_the_results_of_an_uninterrupted_one(
        pg19_shards, checkpoints, tmp_path, capsys, task):
    argv = [task, "--checkpoint", checkpoints["memmamba"], "--checkpoint", checkpoints["mamba"],
            "--data", pg19_shards.root, *RESUMABLE[task]]
    assert run_cli(evaluate, [*argv, "--out", tmp_path / "straight"], capsys)[0] == 0
    out = tmp_path / "resumed"
    with pytest.MonkeyPatch.context() as monkeypatch:
        kept = interrupt_in_the_second_unit(monkeypatch)
        code, _, err = run_cli(evaluate, [*argv, "--out", out], capsys)
    partial = out / f"{task}.partial.json"
    assert code == 130 and err == f"interrupted; what was finished is kept in {partial}, and the same command " \
                                  "goes on from there\n"
    assert len(kept) == 1 and [path.name for path in out.iterdir()] == [partial.name]

    with pytest.MonkeyPatch.context() as monkeypatch:
        computed = []
        add = report.PartialResults.add
        monkeypatch.setattr(report.PartialResults, "add",
                            lambda self, model, unit, result: (computed.append((model, str(unit))),
                                                               add(self, model, unit, result)))
        code, _, err = run_cli(evaluate, [*argv, "--out", out], capsys)
    assert code == 0, err
    assert f"{partial}: 1 finished unit of this command; going on from there" in err
    assert kept[0] not in computed and len(computed) == (1 if task == "fidelity" else 3)
    assert not partial.exists()
    straight, resumed = (json.loads((tmp_path / run / f"{task}.json").read_text()) for run in ("straight", "resumed"))
    assert resumed["results"] == straight["results"] and resumed["models"] == straight["models"]
    assert (out / f"{task}.md").read_text().split("\n", 3)[3] == \
        (tmp_path / "straight" / f"{task}.md").read_text().split("\n", 3)[3]   # the tables, below the command


def test_results_kept_for_other_weights_settings_or_hardware_are_not_reused(pg19_shards, checkpoints, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["mamba"], model)
    argv = ["ppl", "--checkpoint", model, "--data", pg19_shards.root, "--lengths", 64, 128, "--scored", 20,
            "--windows-per-book", 1, "--out", tmp_path / "out"]
    partial = tmp_path / "out" / "ppl.partial.json"

    def interrupted_run(argv):
        with pytest.MonkeyPatch.context() as monkeypatch:
            interrupt_in_the_second_unit(monkeypatch)
            assert run_cli(evaluate, argv, capsys)[0] == 130
        return json.loads(partial.read_text())["units"]["model"]["64"]

    first = interrupted_run(argv)
    torch.manual_seed(1)   # the same folder and command, other weights: a new export over the old one
    save_pretrained(build_model(SPECS["mamba"]), model, {"tokenizer_checksum": pg19_shards.checksum})
    code, _, err = run_cli(evaluate, argv, capsys)
    assert code == 0 and f"{partial}: from another command (other settings, weights or hardware); starting over" \
        in err
    results = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert results["results"]["model"][0]["ppl"] != first["ppl"]
    assert results["models"][0]["weights_sha256"] == common.digest_weights(load_model(model))

    second = interrupted_run(argv)
    code, _, err = run_cli(evaluate, [*argv[:-2], "--scored", 10, *argv[-2:]], capsys)   # other settings
    assert code == 0 and "from another command" in err
    assert json.loads((tmp_path / "out" / "ppl.json").read_text())["results"]["model"][0]["ppl"] != second["ppl"]

    interrupted_run(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)   # other hardware: units timed or computed elsewhere are not mixed in
    try:
        code, _, err = run_cli(evaluate, argv, capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and "from another command" in err
    assert json.loads((tmp_path / "out" / "ppl.json").read_text())["identity"]["hardware"].endswith(
        f", {threads + 1} threads")

    partial.write_text('{"command": ')   # a file cut short: nothing of it is used
    code, _, err = run_cli(evaluate, argv, capsys)
    assert code == 0 and f"{partial}: unreadable (" in err and "starting over" in err


def test_skip_done_does_nothing_only_where_the_results_are_of_this_command_and_these_weights(
        pg19_shards, checkpoints, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["mamba"], model)
    out = tmp_path / "out"
    argv = ["ppl", "--checkpoint", model, "--data", pg19_shards.root, "--lengths", 64, "--scored", 20,
            "--windows-per-book", 1, "--out", out, "--skip-done"]
    runs = []
    evaluate_model = perplexity.evaluate
    monkeypatch.setattr(perplexity, "evaluate", lambda *a: runs.append(1) or evaluate_model(*a))
    assert run_cli(evaluate, argv, capsys)[0] == 0 and len(runs) == 1
    code, out_text, err = run_cli(evaluate, argv, capsys)
    assert code == 0 and len(runs) == 1 and out_text == ""
    assert err.endswith(f"{out}/ppl.json holds the results of this command on these weights: nothing to do\n")
    assert run_cli(evaluate, argv[:-1], capsys)[0] == 0 and len(runs) == 2         # without --skip-done: again
    assert run_cli(evaluate, [*argv, "--scored", 10], capsys)[0] == 0 and len(runs) == 3   # another setting
    torch.manual_seed(1)   # a new export over the old one
    save_pretrained(build_model(SPECS["mamba"]), model, {"tokenizer_checksum": pg19_shards.checksum})
    assert run_cli(evaluate, [*argv, "--scored", 10], capsys)[0] == 0 and len(runs) == 4


def test_every_value_is_checked_before_any_work_and_an_error_leaves_no_results_folder(
        pg19_shards, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(passkey, "evaluate", lambda *a: pytest.fail("evaluated before the checks"))
    monkeypatch.setattr(perplexity, "evaluate", lambda *a: pytest.fail("evaluated before the checks"))
    model, data, out = ["--checkpoint", checkpoints["memmamba"]], ["--data", pg19_shards.root], tmp_path / "out"
    for argv, message in [
        (["passkey", "--lengths", "200", "60"], "error: --lengths 60: a passkey prompt needs at least "),
        (["retrieval", "--distractors", "1", "5000"], "error: --distractors 5000: at most "),
        (["ppl", "--lengths", "2000k"], "error: --lengths: no book of "),
    ]:
        code, _, err = run_cli(evaluate, [*argv, *model, *data, "--out", out], capsys)
        assert code == 1 and err.startswith(message) and err.count("\n") == 1
        assert not out.exists()
    (out / "ppl.json").mkdir(parents=True)
    code, _, err = run_cli(evaluate, ["ppl", *model, *data, "--lengths", "64", "--out", out], capsys)
    assert code == 1 and err == f"error: --out {out}: cannot write {out / 'ppl.json'}\n"


@pytest.mark.parametrize("task", ["ppl", "passkey", "latency"])
def test_a_transformer_whose_kv_cache_cannot_fit_is_refused_in_one_line_before_any_work(
        pg19_shards, checkpoints, tmp_path, capsys, monkeypatch, task):
    monkeypatch.setattr(common, "available_memory", lambda device: 2 ** 20)   # 1 MiB free
    data = ["--positions", "--repeats", 1] if task == "latency" else ["--data", pg19_shards.root]
    models = ["--checkpoint", checkpoints["memmamba"], "--checkpoint", checkpoints["transformer"]]
    # tiny: 2 (keys, values) x 2 layers x 64 channels x 4 bytes = 1 KiB a token: 1 MiB holds 1,024 tokens
    fits = [task, *models, *data, "--lengths", 400, "--out", tmp_path / "fits"]
    assert run_cli(evaluate, fits, capsys)[0] == 0
    code, _, err = run_cli(evaluate, [task, *models, *data, "--lengths", 1100, "--out", tmp_path / "none"], capsys)
    assert code == 1 and err.count("\n") == 1 and not (tmp_path / "none").exists()
    assert err.startswith("error: transformer: a Transformer's KV cache at 1,1") and "more than the 0.0 GiB free" in err

def test_every_models_data_is_checked_before_the_first_is_evaluated(pg19_shards, checkpoints):
    good = load_checkpoint(str(checkpoints["mamba"]), torch.device("cpu"))
    other = Checkpoint("other", "other", good.model, argparse.Namespace(checksum="0" * 64))   # another tokenizer
    args = argparse.Namespace(data=pg19_shards.root, split="test", lengths=["64"], scored=10, windows_per_book=1,
                              batch_size=1)
    with pytest.raises(DataError, match=r"shards were made with tokenizer \w{12}\.\.\., not 000000000000\.\.\.$"):
        perplexity.prepare([good, other], args)


def test_lengths_no_book_reaches_are_named_in_a_warning(pg19_shards, checkpoints, tmp_path, capsys):
    argv = ["ppl", "--checkpoint", checkpoints["mamba"], "--data", pg19_shards.root, "--lengths", 64, "2000k",
            "--windows-per-book", 1, "--scored", 10, "--out", tmp_path]
    code, _, err = run_cli(evaluate, argv, capsys)
    assert code == 0 and "warning: no book of " in err and "no perplexity at 2000k" in err
    short, long = json.loads((tmp_path / "ppl.json").read_text())["results"]["mamba"]
    assert short["windows"] > 0 and long["windows"] == 0 and long["ppl"] is None


@pytest.mark.parametrize("kind", ["export", "training checkpoint"])
def test_a_checkpoint_with_another_tokenizer_is_refused(checkpoints, tmp_path, pg19_shards, kind):
    folder = tmp_path / "copy"
    if kind == "export":
        shutil.copytree(checkpoints["mamba"], folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tokenizer_checksum": "0" * 64}))
    else:
        model = load_checkpoint(str(checkpoints["mamba"]), torch.device("cpu")).model
        step = folder / "step-00000001"
        write_training_checkpoint(model, step)
        shutil.copy(pg19_shards.tokenizer_path, step / "tokenizer.model")
        assert load_model(folder).config == model.config
    with pytest.raises(EvalError, match="not the tokenizer"):
        load_checkpoint(str(folder), torch.device("cpu"))


def test_help_shows_every_options_default():
    task_parsers = evaluate.build_parser()._subparsers._group_actions[0].choices
    for name, parser in [*task_parsers.items(), ("generate", generate.build_parser())]:
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
            if not unset:
                assert f"{action.help} (default: {action.default})" in text or "default" in action.help, \
                    (name, action.dest)


def test_lengths_read_k_as_thousands():
    assert [parse_length(x) for x in ("4096", "4k", "1.5K", "400k")] == [4096, 4000, 1500, 400_000]
    assert parse_lengths(["2k", "1k", "1000", "2000"]) == [2000, 1000]   # one table column each


def test_tables_name_checkpoints_by_run_and_keep_names_unique():
    paths = ["runs/a/checkpoints", "runs/a/checkpoints/step-00000100", "exports/x", "other/x", "exports/y"]
    assert unique_names(paths) == ["a", "a/step-00000100", "exports/x", "other/x", "y"]


def test_chunked_hidden_keeps_positions_across_chunk_boundaries(checkpoints, pg19_shards):
    model = load_checkpoint(str(checkpoints["memmamba"]), torch.device("cpu")).model
    ids = book_window(pg19_shards, 120)
    full, _ = model.hidden_states(ids)
    kept, _ = chunked_hidden(model, ids, 32, keep=(30, 70))
    torch.testing.assert_close(kept, full[:, 30:70], rtol=1e-5, atol=1e-5)


def test_results_get_a_png_plot_when_matplotlib_is_installed(checkpoints, pg19_shards, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["ppl", "--checkpoint", checkpoints["mamba"], "--data", pg19_shards.root, "--lengths", 64, 128,
            "--windows-per-book", 1, "--scored", 10, "--out", tmp_path]
    code, _, err = run_cli(evaluate, argv, capsys)
    assert code == 0, err
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def eval_sh(*argv):
    script = Path(__file__).resolve().parents[1] / "launch" / "eval.sh"
    return subprocess.run(["bash", script, *argv], capture_output=True, text=True, env={**os.environ, "PYTHON": "echo"})


def test_eval_sh_all_names_the_results_after_the_run_and_refuses_wrong_arguments():
    commands = eval_sh("all", "runs/x/checkpoints/step-00001000").stdout.splitlines()
    assert all(line.endswith(" --skip-done") for line in commands)
    outs = [line.split("--out ")[1].split()[0] for line in commands]
    assert outs == [f"runs/eval/x/step-00001000/{task}" for task in ("ppl", "passkey", "retrieval", "fidelity")]
    assert eval_sh("all", "runs/x/checkpoints").stdout.split("--out ")[1].startswith("runs/eval/x/ppl")
    for wrong in [("all",), ("all", "exports/200m", "data/pg19", "runs/eval/a", "runs/eval/b")]:
        refused = eval_sh(*wrong)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr == "usage: launch/eval.sh all CHECKPOINT [DATA] [OUT]\n"
