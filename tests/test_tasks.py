"""The synthetic task generators: exact lengths, keys at the stated depth, the stated formats."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import DataError
from data_pipeline.reader import ShardedBooks
from data_pipeline.stream import PackedWindows
from data_pipeline.tokenizer import NEWLINE_ID, Tokenizer
from model import ConfigError, build_model
from training.config import load_config
from training.data import train_dataset
from training.loss import lm_loss
from training.tasks import (PASSKEY_NEEDLE, BookFiller, Passage, PasskeyTask, PasskeyWindows, RetrievalTask,
                            book_passages, load_passages, place_needle)

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(pg19_shards):
    return Tokenizer(str(pg19_shards.tokenizer_path))


@pytest.fixture(scope="module")
def test_books(pg19_shards):
    return ShardedBooks(pg19_shards.root, "test")


@pytest.mark.parametrize("depth", DEPTHS)
def test_place_needle_puts_the_needle_depth_times_the_filler_in(depth):
    filler = np.arange(100, 200)
    ids, position = place_needle(np.array([1, 2]), filler, np.array([7, 7, 7]), np.array([9]), depth)
    assert len(ids) == 2 + 100 + 3 + 1
    before = round(depth * 100)
    assert position == 2 + before
    assert ids[position:position + 3].tolist() == [7, 7, 7]
    assert ids[2:position].tolist() == list(range(100, 100 + before))       # filler order is kept
    assert ids[position + 3:-1].tolist() == list(range(100 + before, 200))


def test_book_filler_reads_the_books_in_order_with_a_newline_between(test_books):
    filler = BookFiller(test_books)
    first = int(test_books.num_tokens[0])
    stretch = filler.take(first - 5, 12)
    assert stretch[:5].tolist() == test_books.tokens(0, first - 5, first).tolist()
    assert stretch[5] == NEWLINE_ID
    assert stretch[6:].tolist() == test_books.tokens(1, 0, 6).tolist()
    # the stream wraps around, so any length can be filled
    assert filler.take(filler.total - 1, 3).tolist() == [NEWLINE_ID, *test_books.tokens(0, 0, 2).tolist()]


@pytest.mark.parametrize("length", [300, 1000, 5000])
def test_passkey_prompt_has_the_exact_length_and_the_key_at_the_depth(tokenizer, test_books, length):
    task = PasskeyTask(tokenizer, BookFiller(test_books))
    for d, depth in enumerate(DEPTHS):
        sample = task.sample(length, depth, np.random.default_rng([length, d]))
        needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=sample.key))
        n_filler = length - len(task.prefix) - len(needle) - len(task.query)
        assert len(sample.ids) == length
        assert sample.key_position == len(task.prefix) + round(depth * n_filler)
        assert sample.ids[sample.key_position:sample.key_position + len(needle)].tolist() == needle
        assert sample.ids[:len(task.prefix)].tolist() == task.prefix.tolist()
        assert sample.ids[-len(task.query):].tolist() == task.query.tolist()
        text = tokenizer.decode(sample.ids.tolist())
        assert text.count(f"The pass key is {sample.key}. Remember it. {sample.key} is the pass key.") == 1
        assert text.endswith("What is the pass key? The pass key is")
        assert len(sample.key) == 5 and tokenizer.decode(sample.answer.tolist()) == f" {sample.key}"


def test_passkey_filler_is_book_text_not_a_repeated_sentence(tokenizer, test_books):
    sample = PasskeyTask(tokenizer, BookFiller(test_books)).sample(3000, 0.5, np.random.default_rng(0))
    filler = np.concatenate([sample.ids[60:sample.key_position], sample.ids[sample.key_position + 30:-20]])
    assert len(np.unique(filler)) > 300        # a repeated sentence has a few dozen distinct tokens


def test_passkey_answer_is_judged_by_the_first_number(tokenizer, test_books):
    task = PasskeyTask(tokenizer, BookFiller(test_books))
    sample = task.sample(300, 0.5, np.random.default_rng(1), key="71432")
    assert task.is_correct(sample, " 71432. Remember")
    assert not task.is_correct(sample, " 7143")
    assert not task.is_correct(sample, " 714321")
    assert not task.is_correct(sample, " the key")


def test_passkey_windows_end_with_the_answer_and_depend_only_on_seed_and_index(pg19_shards, tokenizer):
    dataset = PasskeyWindows(pg19_shards.root, "train", seq_len=400, seed=3)
    window, mask = dataset[5]
    assert window.shape == (401,) and window.dtype == torch.long and mask.shape == (400,)
    answer = window[1:][mask]
    assert mask[-len(answer):].all() and mask.sum() == len(answer)
    key = tokenizer.decode(answer.tolist()).strip()
    assert len(key) == 5 and f"The pass key is {key}." in tokenizer.decode(window.tolist())
    again = PasskeyWindows(pg19_shards.root, "train", seq_len=400, seed=3)[5]
    assert torch.equal(again[0], window) and torch.equal(again[1], mask)
    assert not torch.equal(dataset[6][0], window)
    assert dataset[10 ** 9][0].shape == (401,)                            # any index is valid
    model = build_model({"arch": "memmamba", "size": "tiny"})
    loss = lm_loss(model, window[None], 128, mask[None])
    assert torch.isfinite(loss) and loss > 0


def test_a_passkey_stream_resumes_only_from_a_checkpoint_of_the_same_windows(pg19_shards):
    state = PasskeyWindows(pg19_shards.root, "train", seq_len=400, seed=3).state_dict(12)
    assert PasskeyWindows(pg19_shards.root, "train", seq_len=400, seed=3).load_state_dict(state) == 12
    mismatch = f"{pg19_shards.root}/train: checkpoint's data stream does not match this dataset"
    for other, difference in [({"seq_len": 500}, "seq_len 400 != 500"), ({"seed": 4}, "seed 3 != 4"),
                              ({"key_digits": 6}, "key_digits 5 != 6")]:
        dataset = PasskeyWindows(pg19_shards.root, "train", **{"seq_len": 400, "seed": 3, **other})
        with pytest.raises(DataError) as error:
            dataset.load_state_dict(state)
        assert str(error.value) == f"{mismatch} ({difference})"
    with pytest.raises(DataError, match="key_digits None != 5"):   # a checkpoint of a run on the shards
        PasskeyWindows(pg19_shards.root, "train", seq_len=400, seed=3).load_state_dict(
            PackedWindows(pg19_shards.root, "train", seq_len=400, seed=3).state_dict(12))


def test_passkey_config_trains_on_passkey_windows(pg19_shards):
    cfg = load_config(CONFIGS / "passkey_finetune_tiny.json", [f"data.path={pg19_shards.root}"])
    dataset = train_dataset(cfg, pg19_shards.checksum)
    window, mask = dataset[0]
    assert isinstance(dataset, PasskeyWindows)
    assert window.shape == (cfg.data.seq_len + 1,) and mask.shape == (cfg.data.seq_len,) and 0 < mask.sum() < 10


@pytest.fixture(scope="module")
def passages(test_books, tokenizer):
    return book_passages(test_books, tokenizer)


def test_book_passages_are_paragraphs_that_ask_for_their_own_opening(passages):
    assert len(passages) > 300
    for passage in passages[:50]:
        assert 30 <= len(passage.text.split()) <= 150
        quote = passage.question.split('"')[1]
        assert passage.text.startswith(quote)


@pytest.mark.parametrize("n", [0, 5, 30])
def test_retrieval_prompt_repeats_the_question_before_every_document(tokenizer, passages, n):
    task = RetrievalTask(tokenizer, passages)
    sample = task.sample(n, np.random.default_rng(n))
    *documents, query = tokenizer.decode(sample.ids.tolist()).split("\n\n")
    assert len(documents) == len(sample.doc_starts) == len(set(sample.doc_ids)) == n + 1
    question = documents[0].split("\n")[0]
    assert question.startswith('Question: Which document begins with the words "')
    assert query == f"{question}\nAnswer: Document"
    texts = []
    for document, doc_id, start in zip(documents, sample.doc_ids, sample.doc_starts):
        head, body = document.split("\n")
        assert head == question and body.startswith(f"Document {doc_id}: ")
        assert tokenizer.decode(sample.ids[start:].tolist()).startswith(document)
        texts.append(body.split(": ", 1)[1])
    assert len(set(texts)) == n + 1                                    # distractors differ from the gold
    assert sample.doc_ids[sample.gold_index] == sample.gold_id
    assert texts[sample.gold_index].startswith(question.split('"')[1])  # the gold is the quoted paragraph
    assert tokenizer.decode(sample.answer.tolist()) == f" {sample.gold_id}"
    assert task.is_correct(sample, f" {sample.gold_id}\n") and not task.is_correct(sample, " 1000")


def test_passages_load_from_json_lines_and_bad_lines_are_named(tmp_path, tokenizer):
    path = tmp_path / "squad.jsonl"
    rows = [{"question": f"What is {i}?", "text": f"Paragraph number {i} says {i}."} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sample = RetrievalTask(tokenizer, load_passages(path)).sample(10, np.random.default_rng(0))
    prompt = tokenizer.decode(sample.ids.tolist())
    gold = prompt.split(f"Document {sample.gold_id}: Paragraph number ")[1].split(" ")[0]
    assert prompt.count(f"Question: What is {gold}?\n") == 12        # 11 documents and the query
    path.write_text('{"text": "fine"}\n{"question": "no text"}\n')
    with pytest.raises(ValueError, match=r"squad.jsonl:2: "):
        load_passages(path)
    path.write_text('{"text": "a paragraph"}\n{"text": "another"}\n')
    with pytest.raises(ValueError, match=r"squad.jsonl: no line has a \"question\""):
        load_passages(path)


def test_distractors_are_distinct_documents_when_a_paragraph_has_several_questions(tokenizer):
    passages = [Passage(f"Paragraph {i}.", f"Question {q} on {i}?") for i in range(20) for q in range(5)]
    task = RetrievalTask(tokenizer, passages)
    assert task.most_distractors() == 19
    for seed in range(5):
        sample = task.sample(19, np.random.default_rng(seed))
        texts = [t.split(".")[0] for t in tokenizer.decode(sample.ids.tolist()).split("Paragraph ")[1:]]
        assert len(set(texts)) == 20
    with pytest.raises(ValueError, match="20 distractors asked, at most 19 "):
        task.sample(20, np.random.default_rng(0))


def test_every_key_fits_a_prompt_of_the_shortest_length(tokenizer, test_books):
    task = PasskeyTask(tokenizer, BookFiller(test_books))
    for seed in range(20):
        assert len(task.sample(task.shortest(), 0.5, np.random.default_rng(seed)).ids) == task.shortest()
        with pytest.raises(ValueError, match="a passkey prompt needs at least"):
            task.sample(task.shortest() - 1, 0.5, np.random.default_rng(seed))


def test_passkey_windows_too_short_for_a_prompt_are_a_config_error(pg19_shards):
    task = PasskeyWindows(pg19_shards.root, "train", seq_len=400, seed=3).task
    shortest = task.shortest() + len(task.answer("12345")) - 1               # the prompt and its answer
    assert PasskeyWindows(pg19_shards.root, "train", seq_len=shortest, seed=3)[0][0].shape == (shortest + 1,)
    with pytest.raises(ConfigError, match=f"^data.seq_len {shortest - 1}: a passkey window needs at least {shortest} "):
        PasskeyWindows(pg19_shards.root, "train", seq_len=shortest - 1, seed=3)
