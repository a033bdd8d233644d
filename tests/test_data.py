"""Data loading and splitting: train, validation and prompts never share text; validation does not
move with the training-set size; BOS where the tokenizer adds it, as the official code."""

import json

import pytest
from transformers import AutoTokenizer

from hyperfit import UsageError, bos_prefix, load_texts, make_splits
from runfiles import fingerprint


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def works(tiny_text):
    """Three 'works' cut from the tiny text, so splits draw blocks from several documents."""
    third = len(tiny_text) // 3
    return [(f"work{i}", tiny_text[i * third : (i + 1) * third]) for i in range(3)]


def test_splits_are_disjoint_blocks_of_the_source_text(tokenizer, works):
    splits = make_splits(tokenizer, works, seq_len=32, num_train=20, num_val=10, seed=0)
    assert splits["train"].shape == (20, 32) and splits["val"].shape == (10, 32)
    sources = [s for k in ("train", "val", "heldout") for s in splits["sources"][k]]
    n = len(splits["train"]) + len(splits["val"]) + len(splits["heldout"])
    assert len(sources) == n
    # every block is a distinct, non-overlapping span: (work, offset) unique, offsets on the grid
    assert len(set(sources)) == n and all(offset % 32 == 0 for _, offset in sources)
    # and each block really is that span of the work's tokens
    token_ids = {
        name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in works
    }
    assert splits["documents"] == token_ids
    for key in ("train", "val", "heldout"):
        for block, (name, offset) in zip(splits[key], splits["sources"][key]):
            assert block.tolist() == token_ids[name][offset : offset + 32]
    as_set = {k: {tuple(b.tolist()) for b in splits[k]} for k in ("train", "val", "heldout")}
    assert not as_set["train"] & as_set["val"]
    assert not as_set["train"] & as_set["heldout"]
    assert not as_set["val"] & as_set["heldout"]
    assert len({name for name, _ in splits["sources"]["train"]}) > 1  # several works, not one


def test_validation_and_prompts_do_not_move_with_the_training_set_size(tokenizer, works):
    """The data-size study compares sizes on the same validation text and prompts, and a larger
    training set holds every smaller one."""
    small = make_splits(tokenizer, works, 32, num_train=8, num_val=10, seed=0)
    large = make_splits(tokenizer, works, 32, num_train=40, num_val=10, seed=0)
    assert small["val"].equal(large["val"])
    assert small["sources"]["val"] == large["sources"]["val"]
    assert large["train"][:8].equal(small["train"])
    # evaluate.py's prompts: validation blocks, then held-out ones (here 10 of each)
    prompts_small = [*small["sources"]["val"], *small["sources"]["heldout"]][:20]
    prompts_large = [*large["sources"]["val"], *large["sources"]["heldout"]][:20]
    assert prompts_small == prompts_large
    assert small["heldout"][:10].equal(large["heldout"][:10])


def test_split_is_deterministic_in_the_seed(tokenizer, works):
    a = make_splits(tokenizer, works, 32, 20, 10, seed=0)
    b = make_splits(tokenizer, works, 32, 20, 10, seed=0)
    c = make_splits(tokenizer, works, 32, 20, 10, seed=1)
    assert fingerprint(a["train"]) == fingerprint(b["train"])
    assert fingerprint(a["train"]) != fingerprint(c["train"])


def test_every_sequence_starts_with_bos_where_the_tokenizer_adds_it(
    tiny_bos_model_dir, works, tokenizer
):
    """As the official code's sequences (a document's first 256 tokens, BOS included): the
    sequence length counts the BOS; without BOS (SmolLM2's tokenizer) nothing changes."""
    bos_tokenizer = AutoTokenizer.from_pretrained(tiny_bos_model_dir)
    bos = bos_prefix(bos_tokenizer)
    assert bos == [bos_tokenizer.bos_token_id] and bos_prefix(tokenizer) == []
    splits = make_splits(bos_tokenizer, works, seq_len=32, num_train=20, num_val=10, seed=0)
    for key in ("train", "val", "heldout"):
        assert splits[key].shape[1] == 32 and (splits[key][:, 0] == bos[0]).all()
        for block, (name, offset) in zip(splits[key], splits["sources"][key]):
            assert block[1:].tolist() == splits["documents"][name][offset : offset + 31]
    assert all(offset % 31 == 0 for _, offset in splits["sources"]["train"])


def test_too_little_data_says_how_much_there_is(tokenizer, works):
    blocks = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) // 64 for _, t in works)
    with pytest.raises(UsageError, match=f"holds only {blocks} sequences of 64 tokens"):
        make_splits(tokenizer, works, seq_len=64, num_train=blocks, num_val=5)


def test_load_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first work")
    (tmp_path / "b.txt").write_text("second work")
    (tmp_path / "skip.md").write_text("not text data")
    assert load_texts(str(tmp_path)) == [("a.txt", "first work"), ("b.txt", "second work")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n"
    )
    assert [t for _, t in load_texts(str(jsonl))] == ["one", "two"]
    assert load_texts(str(tmp_path / "a.txt")) == [("a.txt", "first work")]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "no such file or folder"),
        (lambda p: (p / "empty.txt").write_text("  \n") and p / "empty.txt", "no text in it"),
        (lambda p: (p / "sub").mkdir() or p / "sub", "holds no .txt files"),
        (
            lambda p: (
                (p / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n') and p / "bad.jsonl"
            ),
            'line 2 is not a JSON object with a "text" string',
        ),
        (
            lambda p: (p / "num.jsonl").write_text('{"text": 7}\n') and p / "num.jsonl",
            'line 1 is not a JSON object with a "text" string',
        ),
        (
            lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and p / "bin.txt",
            "is not UTF-8 text .* convert it first, e.g. from Latin-1: iconv -f latin1",
        ),
    ],
)
def test_load_texts_bad_input(tmp_path, setup, message):
    with pytest.raises(UsageError, match=message):
        load_texts(str(setup(tmp_path)))
