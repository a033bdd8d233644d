"""Data loading and splitting: train, validation and prompts never share text."""
import json

import pytest
from transformers import AutoTokenizer

from hyperfit import UsageError, fingerprint, load_texts, make_splits


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def works(tiny_text):
    """Three 'works' cut from the tiny text, so splits draw blocks from several documents."""
    third = len(tiny_text) // 3
    return [(f"work{i}", tiny_text[i * third:(i + 1) * third]) for i in range(3)]


def test_splits_are_disjoint_blocks_of_the_source_text(tokenizer, works):
    splits = make_splits(tokenizer, works, seq_len=32, num_train=20, num_val=10, seed=0)
    assert splits["train"].shape == (20, 32) and splits["val"].shape == (10, 32)
    n = len(splits["train"]) + len(splits["val"]) + len(splits["heldout"])
    assert len(splits["sources"]) == n
    # every block is a distinct, non-overlapping span: (work, offset) unique and offsets on the block grid
    assert len(set(splits["sources"])) == n
    assert all(offset % 32 == 0 for _, offset in splits["sources"])
    # and each block really is that span of the work's tokens
    token_ids = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in works}
    all_blocks = list(splits["train"]) + list(splits["val"]) + list(splits["heldout"])
    for block, (name, offset) in zip(all_blocks, splits["sources"]):
        assert block.tolist() == token_ids[name][offset:offset + 32]
    # no 32-token block of one split appears in another
    as_set = {k: {tuple(b.tolist()) for b in splits[k]} for k in ("train", "val", "heldout")}
    assert not as_set["train"] & as_set["val"]
    assert not as_set["train"] & as_set["heldout"]
    assert not as_set["val"] & as_set["heldout"]
    # blocks come from several works, not one
    assert len({name for name, _ in splits["sources"][:20]}) > 1


def test_split_is_deterministic_in_the_seed(tokenizer, works):
    a = make_splits(tokenizer, works, 32, 20, 10, seed=0)
    b = make_splits(tokenizer, works, 32, 20, 10, seed=0)
    c = make_splits(tokenizer, works, 32, 20, 10, seed=1)
    assert fingerprint(a["train"]) == fingerprint(b["train"])
    assert fingerprint(a["train"]) != fingerprint(c["train"])


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
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert [t for _, t in load_texts(str(jsonl))] == ["one", "two"]
    assert load_texts(str(tmp_path / "a.txt")) == [("a.txt", "first work")]


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing.txt", "no such file or folder"),
    (lambda p: (p / "empty.txt").write_text("  \n") and p / "empty.txt", "no text in it"),
    (lambda p: (p / "sub").mkdir() or p / "sub", "holds no .txt files"),
    (lambda p: (p / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n') and p / "bad.jsonl",
     'line 2 is not a JSON object with a "text" field'),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and p / "bin.txt", "cannot read"),
])
def test_load_texts_bad_input(tmp_path, setup, message):
    with pytest.raises(UsageError, match=message):
        load_texts(str(setup(tmp_path)))
