"""No kit command deletes or writes a file outside the folders it owns (issue 29): decoys of a
user's files are laid around a run (beside it in the results folder, in the data folder, in the
model folder, in the working folder, in a judgments download folder), then every command runs in
turn — train, resume, overwrite, evaluate in place and into an --out-dir, the paper comparison,
plot, the human study's page and its scores, a study, the image path, the bench — and after each
one every file outside what it owns must be exactly as before: same names, same bytes, same
modification times."""

import hashlib
import json
import shutil
from pathlib import Path

from conftest import TINY_COMMAND, command_line, load_bench

import annotate
import evaluate
import hyperfit
import images
import paper_comparison
import plot
import studies

bench = load_bench()

TINY_EVAL = ["--num-prompts", "4", "--new-tokens", "24", "--sharpness-seqs", "2"]
TINY_EVAL += ["--modes", "original_greedy,hyperfitted_greedy,hyperfitted_blocked"]


def snapshot(root, owned):
    """{path: (kind, sha256 or link target, mtime_ns)} for everything under `root` that lies
    outside every folder in `owned` (folders themselves too, so a new or removed one shows)."""
    owned = [Path(p).resolve() for p in owned]
    seen = {}
    for path in sorted(Path(root).rglob("*")):
        if any(path == o or o in path.parents for o in owned):
            continue
        info = path.lstat()
        if path.is_symlink():
            seen[str(path)] = ("link", str(path.readlink()), info.st_mtime_ns)
        elif path.is_dir():
            seen[str(path)] = ("dir", None, None)  # a folder's mtime moves when a child is owned
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path)] = ("file", digest, info.st_mtime_ns)
    return seen


def lay_decoys(ws, tiny_model_dir, tiny_data):
    """A user's working folder: the kit's inputs with the user's own files beside them."""
    decoys = {
        "notes.txt": "my notes",
        "results/thesis.txt": "chapter 1",
        "results/other/notes.txt": "a folder of mine beside the runs",
        "results/other/summary.json": '{"mine": true}',
        "data/README.md": "where the text came from",
        "downloads/unrelated.json": '{"not": "judgments"}',
        "elsewhere/keep.txt": "keep me",
    }
    for name, text in decoys.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    shutil.copy(tiny_data, ws / "data" / "alice.txt")
    shutil.copytree(tiny_model_dir, ws / "model")
    (ws / "model" / "my-notes.txt").write_text("a user's file inside the model folder")
    (ws / "elsewhere" / "link-to-notes").symlink_to(ws / "notes.txt")


def judgments_of(run):
    """One annotator's downloaded judgments of the run's page: 'left' on every item."""
    key = json.loads((run / "human_study" / "annotate_key.json").read_text())
    judged = [{"item_id": i, "choice": "left", "time": "", "note": ""} for i in key["items"]]
    data = {"format": annotate.JUDGMENTS_FORMAT, "page_id": key["page_id"], "annotator": "ann"}
    data.update(num_items=len(judged), exported="2025-01-01T00:00:00.000Z", judgments=judged)
    return json.dumps(data)


def untouched_outside(ws, owned, what, main, argv):
    """Run `main(argv)`; every file of `ws` outside the `owned` folders is as before."""
    before = snapshot(ws, owned)
    assert main(argv) == 0, what
    after = snapshot(ws, owned)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert not changed, f"{what} touched {sorted(changed)}"


def test_no_command_touches_a_file_outside_what_it_owns(
    tmp_path, monkeypatch, tiny_model_dir, tiny_data, tiny_imagegpt, picture_folder
):
    ws = tmp_path / "ws"
    ws.mkdir()
    lay_decoys(ws, tiny_model_dir, tiny_data)
    monkeypatch.chdir(ws)  # relative paths, as a user types them
    monkeypatch.setenv("HYPERFIT_CACHE", str(ws / "cache"))  # images.py's copy of its model
    study = dict(seq_len=64, num_val=8, num_prompts=4, prompt_len=16, epochs=2, num_train=16)
    monkeypatch.setattr(studies, "STUDY_TRAINING", dict(studies.STUDY_TRAINING, **study))
    evaluation = dict(studies.STUDY_EVALUATION, sharpness_seqs=2)
    monkeypatch.setattr(studies, "STUDY_EVALUATION", evaluation)
    run, inputs = ws / "results" / "r", ["--model", "model", "--data", "data/alice.txt"]
    train = [*inputs, "--out-dir", "results", "--run-name", "r"]
    train += command_line(**TINY_COMMAND, epochs=2, eval_every=3)
    image = ["--model", tiny_imagegpt, "--data", str(picture_folder[0]), "--run-name", "img"]
    image += ["--out-dir", "results", "--num-train", "8", "--num-val", "32", "--epochs", "2"]
    shuffle = ["shuffle", "--out-dir", "studies", *inputs, "--order-seeds", "0,1"]
    elsewhere = ["results/r", "--out-dir", "evals/r", *TINY_EVAL]
    quick_bench = ["--quick", "--only", "4bit_lora", "--out-dir", "bench"]
    steps = [  # (what, the command's main, its arguments, the folders it owns)
        ("train", hyperfit.main, train, [run]),
        ("resume", hyperfit.main, [*train, "--resume", "--epochs", "3"], [run]),
        ("overwrite", hyperfit.main, [*train, "--overwrite"], [run]),
        ("evaluate", evaluate.main, ["results/r", *TINY_EVAL], [run]),
        ("evaluate again", evaluate.main, ["results/r", *TINY_EVAL], [run]),
        ("evaluate elsewhere", evaluate.main, elsewhere, [run, ws / "evals"]),  # makes evals/
        ("paper comparison", paper_comparison.main, ["results/r"], [run]),
        ("plot", plot.main, ["results/r"], [run]),
        ("annotate page", annotate.main, ["results/r", "--tokens", "16"], [run]),
    ]
    for what, main, argv, owned in steps:
        untouched_outside(ws, owned, what, main, argv)
    (ws / "downloads" / "judgments-ann.json").write_text(judgments_of(run))  # the annotator's
    steps = [
        ("annotate scores", annotate.main, ["results/r", "--judgments", "downloads"], [run]),
        ("study", studies.main, [*shuffle, "--new-tokens", "24"], [ws / "studies"]),
        ("images", images.main, image, [ws / "results/img", ws / "cache"]),
        ("bench", bench.main, quick_bench, [ws / "bench"]),
    ]
    for what, main, argv, owned in steps:
        untouched_outside(ws, owned, what, main, argv)
    assert (ws / "notes.txt").read_text() == "my notes"  # and the decoys are still the user's
    assert (ws / "results" / "other" / "summary.json").read_text() == '{"mine": true}'
