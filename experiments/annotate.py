"""
The paper's human study, whole: a blind A/B page, its key, and the scores of the judgments
(Carlsson et al. 2025: three annotators compared each continuation with the real human
continuation of the same 32-token context; a decoding mode's score is the share of judgments in
which its text was judged better than or as good as the human text).

    python experiments/annotate.py results/reference           # the page: human_study/annotate.html
    python experiments/annotate.py results/reference --judgments a.json b.json c.json
                                                              # -> human_study/preference.json

Reads the run's evaluation (eval/generations.jsonl: every mode's continuation and the human
continuation of each prompt, from evaluate.py) and writes <run>/human_study/:
    annotate.html        one self-contained page (no network), opened from disk by annotators
    annotate_key.json    which side held which mode's text: keep it away from the annotators
    preference.json      the scores (with --judgments): per mode the paper's score with a 95 %
                         prompt-bootstrap interval, the pairwise differences, Krippendorff's alpha
The page's texts come from one evaluation; the key records which (a digest of its
generations.jsonl), so plot.py never presents a page or scores of an earlier evaluation as
current. Rebuilding a page over one that annotators may hold needs --overwrite.
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))
if "__file__" in globals():  # the kit's files (hyperfit.py and the rest) are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hashlib
import html
import json
import random
import re
import warnings
from pathlib import Path

import krippendorff
import numpy as np

try:
    import hyperfit as hf
    import plot
    import runfiles
except ModuleNotFoundError:  # pasted into a notebook after the other files' cells: names are here
    import types

    hf = plot = runfiles = types.SimpleNamespace(**globals())

STUDY_DIR = "human_study"  # inside a run folder
# what the kit writes into human_study/: a new page replaces the folder only if it holds no more
# (judgments files an annotator put there are theirs, and stop it)
STUDY_FILES = frozenset(
    {"annotate.html", "annotate_key.json", "preference.json", "preference.md", "preference.png"}
)
ANNOTATE_MODES = ("original_greedy", "original_top_p", "hyperfitted_greedy", "hyperfitted_blocked")
ANNOTATE_TOKENS = 128  # tokens per side (the paper's human study: 128 and 256)
HUMAN = "human"  # evaluate.py's row of the real continuations
JUDGMENTS_FORMAT = "hyperfit-judgments-1"  # the "format" field of a downloaded judgments file
PAIR_FIELDS = ("prompt_id", "mode", "prompt", "model_text", "human_text")
TEMPLATE = "data/annotate.html"  # the page; placeholders __TITLE__, __ITEMS_JSON__, ...
DEFAULT_TITLE = "Which continuation is better?"
DEFAULT_INSTRUCTIONS = (
    "Each item shows the beginning of a text (grey) and two possible continuations of it. "
    "Read both and choose the better continuation of the context: fluent, coherent, consistent "
    "with the context, interesting to read and not repetitive. If you cannot tell them apart in "
    "quality, choose “Equally good”. Judge each item on its own; there are no right answers."
)
CHOICES = ("left", "equal", "right")
# a judgment from the model's point of view; the order is the ordinal scale of Krippendorff's alpha
HUMAN_BETTER, EQUAL, MODEL_BETTER = 0, 1, 2
N_BOOT, CI_LEVEL = 10_000, 95
PREFERENCE_FIGSIZE = (7.5, 4.8)


def ordered_modes(modes):
    """Modes in the kit's order (evaluate.py's, then any other in the order given)."""
    known = [*ANNOTATE_MODES, "original_entropy_matched"]
    return [m for m in known if m in modes] + [m for m in modes if m not in known]


class JudgmentError(hf.UsageError):
    """Bad judgment input: one line saying what was wrong and what to do (the CLI exits 2,
    having written nothing)."""


# -----------------------------------------------------------------------------
# the pairs: each mode's continuation beside the human one, from the run's evaluation


def evaluation_digest(generations_path):
    """First 16 hex digits of the SHA-256 of an evaluation's generations.jsonl: which evaluation
    a page was built from."""
    return hashlib.sha256(Path(generations_path).read_bytes()).hexdigest()[:16]


def annotation_pairs(records, tokenizer, tokens=ANNOTATE_TOKENS, modes=ANNOTATE_MODES):
    """One pair per prompt and annotated mode: the prompt, the mode's continuation and the human
    continuation (the text that follows the prompt in its book), both cut to the same number of
    tokens (at most `tokens`) and decoded with the model's tokenizer."""
    human = {r["prompt_id"]: r["token_ids"] for r in records if r["mode"] == HUMAN}
    pairs = []
    for record in (r for r in records if r["mode"] in modes and human.get(r["prompt_id"])):
        theirs = human[record["prompt_id"]]
        length = min(tokens, len(theirs), len(record["token_ids"]))
        pairs.append(
            dict(
                prompt_id=record["prompt_id"],
                mode=record["mode"],
                prompt=record["prompt_text"],
                model_text=tokenizer.decode(record["token_ids"][:length]),
                human_text=tokenizer.decode(theirs[:length]),
            )
        )
    return pairs


# -----------------------------------------------------------------------------
# the page's items, order and sides, and its key


def check_pairs(pairs):
    """One line saying what is wrong with `pairs`, or None."""
    if not pairs:
        return "no pairs to annotate: pass one {" + ", ".join(PAIR_FIELDS) + "} per prompt and mode"
    seen = set()
    for index, pair in enumerate(pairs):
        missing = [
            field for field in PAIR_FIELDS if not isinstance(pair, dict) or field not in pair
        ]
        if missing:
            return (
                f"pair {index} lacks {', '.join(missing)}; each pair needs {', '.join(PAIR_FIELDS)}"
            )
        if (pair["prompt_id"], pair["mode"]) in seen:
            return (
                f"pair {index} repeats prompt {pair['prompt_id']} in mode {pair['mode']!r}; "
                "pass each (prompt, mode) once"
            )
        seen.add((pair["prompt_id"], pair["mode"]))
    return None


def annotation_rounds(pairs, rng):
    """Group the pairs into rounds that each hold every mode at most once, on different prompts.
    A Latin square: with the prompts in a shuffled order, the pair (mode j, prompt at position i)
    goes to round (i - j) mod P, so a round holds every mode once whenever each mode covers every
    prompt."""
    modes = sorted({pair["mode"] for pair in pairs})
    prompt_ids = sorted({pair["prompt_id"] for pair in pairs})
    rng.shuffle(modes)
    rng.shuffle(prompt_ids)
    mode_index = {mode: j for j, mode in enumerate(modes)}
    prompt_position = {prompt_id: i for i, prompt_id in enumerate(prompt_ids)}
    rounds = [[] for _ in prompt_ids]
    for pair in sorted(
        pairs, key=lambda p: (prompt_position[p["prompt_id"]], mode_index[p["mode"]])
    ):
        position = prompt_position[pair["prompt_id"]] - mode_index[pair["mode"]]
        rounds[position % len(prompt_ids)].append(pair)
    for round_pairs in rounds:
        rng.shuffle(round_pairs)
    rng.shuffle(rounds)
    return [round_pairs for round_pairs in rounds if round_pairs]


def item_clash(pair, previous):
    """(same prompt, same mode) as 0/1 for `pair` shown right after `previous`."""
    if previous is None:
        return (0, 0)
    return (int(pair["prompt_id"] == previous["prompt_id"]), int(pair["mode"] == previous["mode"]))


def next_in_round(round_pairs, previous):
    """Index of the pair to show next: not the previous prompt if possible; then the prompt with the
    most pairs left in the round (placing the commonest prompt first is what keeps repeats apart
    when a round has more modes than there are prompts); then not the previous mode."""
    ranks = []
    for pair in round_pairs:
        same_prompt, same_mode = item_clash(pair, previous)
        left = sum(other["prompt_id"] == pair["prompt_id"] for other in round_pairs)
        ranks.append((same_prompt, -left, same_mode))
    return ranks.index(min(ranks))


def presentation_order(rounds):
    """The pairs in the order shown. Greedy: the next round is the first remaining one that can
    start without repeating the previous item's prompt or mode (else its prompt only), and inside a
    round the next item is chosen by next_in_round."""
    order = []
    remaining_rounds = list(rounds)
    while remaining_rounds:
        previous = order[-1] if order else None
        best_start = [min(item_clash(pair, previous) for pair in r) for r in remaining_rounds]
        round_pairs = list(remaining_rounds.pop(best_start.index(min(best_start))))
        while round_pairs:
            previous = order[-1] if order else None
            order.append(round_pairs.pop(next_in_round(round_pairs, previous)))
    return order


def model_sides(order, rng):
    """Left/right for the model text of each pair in `order`: a shuffled half-and-half split
    within each mode, so every mode has (within one) as many model texts on the left as on the
    right and an annotator's side preference cannot favour one mode."""
    sides = [None] * len(order)
    for mode in sorted({pair["mode"] for pair in order}):
        positions = [i for i, pair in enumerate(order) if pair["mode"] == mode]
        mode_sides = ["left", "right"] * (len(positions) // 2)
        if len(positions) % 2:
            mode_sides.append(rng.choice(["left", "right"]))
        rng.shuffle(mode_sides)
        for position, side in zip(positions, mode_sides):
            sides[position] = side
    return sides


def page_id_of(page_items):
    """First 16 hex digits of the SHA-256 of the page items' canonical JSON: another page (other
    texts, order or sides) gets another id, the same page always the same one."""
    canonical = json.dumps(page_items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def build_annotation(pairs, seed=0):
    """The annotation page's items and the key that unblinds them.

    pairs: one dict per prompt x decoding mode, {"prompt_id", "mode", "prompt", "model_text",
    "human_text"}. Returns (page_items, key): page_items = [{"item_id", "prompt", "left", "right"}]
    in presentation order; key = {"page_id", "seed", "items": {item_id: {"mode", "prompt_id",
    "model_side"}}}. Items come in rounds holding every mode once on different prompts, so
    modes alternate and a prompt never shows twice in a row (when there are two or more prompts);
    the model side is balanced within each mode. Item ids ("i001", ... in presentation order)
    reveal no mode. Everything random comes from random.Random(seed): same pairs and seed -> same
    page. Raises UsageError (one line) for missing fields or a repeated (prompt, mode)."""
    problem = check_pairs(pairs)
    if problem:
        raise hf.UsageError(problem)
    rng = random.Random(seed)
    order = presentation_order(annotation_rounds(list(pairs), rng))
    sides = model_sides(order, rng)
    width = max(3, len(str(len(order))))
    page_items, key_items = [], {}
    for number, (pair, model_side) in enumerate(zip(order, sides), 1):
        item_id = f"i{number:0{width}d}"
        texts = {
            model_side: pair["model_text"],
            ("right" if model_side == "left" else "left"): pair["human_text"],
        }
        page_items.append(
            {
                "item_id": item_id,
                "prompt": pair["prompt"],
                "left": texts["left"],
                "right": texts["right"],
            }
        )
        key_items[item_id] = {
            "mode": pair["mode"],
            "prompt_id": pair["prompt_id"],
            "model_side": model_side,
        }
    return page_items, {"page_id": page_id_of(page_items), "seed": seed, "items": key_items}


def script_json(value):
    """JSON that is safe inside <script>: '<' escaped, so no text can close the tag early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def annotation_html(page_items, page_id, title=DEFAULT_TITLE, instructions=DEFAULT_INSTRUCTIONS):
    """The annotation page as one self-contained HTML document (inline CSS and JS, no network),
    from the template data/annotate.html, its placeholders filled in one pass (a text that
    contains a placeholder's name stays text). Judgments are saved to localStorage after every
    click or key (under "hyperfit-annotate:<page_id>"), so a reload resumes where the annotator
    was; "Download judgments" saves judgments-<page_id>-<annotator>.json (format
    JUDGMENTS_FORMAT) and "Import judgments" restores a session from such a file. The page holds
    only page_items: no decoding mode is named anywhere."""
    values = {
        "__TITLE__": html.escape(title),
        "__INSTRUCTIONS__": html.escape(instructions),
        "__ITEMS_JSON__": script_json(page_items),
        "__PAGE_JSON__": script_json({"page_id": page_id, "format": JUDGMENTS_FORMAT}),
    }
    template = (Path(runfiles.repo_root()) / TEMPLATE).read_text(encoding="utf-8")
    return re.sub("|".join(values), lambda match: values[match.group(0)], template)


def write_page(run_dir, tokens=ANNOTATE_TOKENS, seed=0, overwrite=False):
    """Build the run's human-study page from its evaluation and write <run>/human_study/ whole
    (annotate.html and annotate_key.json, in a new folder that takes the old one's place). A page
    already there (annotators may hold it, and only its key scores their files) is replaced only
    with `overwrite`. Returns the page's path."""
    run_dir = Path(run_dir)
    generations, what = (
        run_dir / "eval" / "generations.jsonl",
        "evaluate the run first: python evaluate.py RUN",
    )
    summary = runfiles.read_json(run_dir / "eval" / "summary.json", what)
    if not generations.is_file():
        raise hf.UsageError(f"{generations} is missing: {what}")
    runfiles.check_positive_int("tokens", tokens)
    study = run_dir / STUDY_DIR
    if (study / "annotate_key.json").exists() and not overwrite:
        raise hf.UsageError(
            f"{study} already holds a page (annotators may be using it, and only its "
            "key scores their files): pass --overwrite to replace it"
        )
    tokenizer = hf.load_tokenizer(summary["args"]["model"])
    pairs = annotation_pairs(runfiles.read_jsonl(generations), tokenizer, tokens)
    files = page_files(pairs, seed, tokens=tokens, evaluation=evaluation_digest(generations))
    with runfiles.RunLock(run_dir, "annotate.py " + " ".join(sys.argv[1:])):
        failure = "nothing was changed: free some space and run it again"
        runfiles.write_folder(study, files, failure, owned=STUDY_FILES)
    return str(study / "annotate.html")


def page_files(pairs, seed=0, **about):
    """{"annotate_key.json": the key, "annotate.html": the page} of `pairs`; `about` (tokens,
    evaluation) goes into the key."""
    page_items, key = build_annotation(pairs, seed=seed)
    key.update(about)
    return {
        "annotate_key.json": json.dumps(key, indent=2, ensure_ascii=False) + "\n",
        "annotate.html": annotation_html(page_items, key["page_id"]),
    }


# -----------------------------------------------------------------------------
# reading and checking judgment files


def _check_key(key):
    """Raise JudgmentError unless `key` looks like annotate_key.json."""
    items = key.get("items") if isinstance(key, dict) else None
    if not isinstance(key, dict) or not isinstance(key.get("page_id"), str) or not items:
        raise JudgmentError(
            "the annotation key has no page_id or no items; pass human_study/annotate_key.json "
            "as written by annotate.py"
        )
    for item_id, item in items.items():
        if not isinstance(item, dict) or item.get("model_side") not in ("left", "right"):
            raise JudgmentError(
                f"the annotation key's item {item_id!r} has no model_side left/right; "
                "rebuild the page and key with annotate.py --overwrite"
            )


def _load_json(path):
    """The parsed JSON of a judgments file, or JudgmentError saying why it can't be read."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise JudgmentError(
            f"{path} {problem}; pass the judgments files downloaded from annotate.html"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise JudgmentError(f"{path} is empty; download the judgments from annotate.html again")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JudgmentError(
            f"{path} is not JSON ({error.msg}, line {error.lineno}); pass the "
            "judgments-<page id>-<name>.json files downloaded from annotate.html"
        ) from None
    except RecursionError:  # nested deeper than any judgments file is
        raise JudgmentError(f"{path} is nested too deeply to be a judgments file") from None


def _check_judgment(path, key, judgment):
    """Raise JudgmentError unless `judgment` answers an item of this key with a known choice."""
    item_id = judgment.get("item_id") if isinstance(judgment, dict) else None
    if not isinstance(item_id, str) or item_id not in key["items"]:
        raise JudgmentError(
            f"{path} judges item {item_id!r}, which is not on this run's annotation page; "
            "pass only files downloaded from this run's annotate.html, unedited"
        )
    if judgment.get("choice") not in CHOICES:
        raise JudgmentError(
            f"{path}: item {judgment['item_id']} has choice {judgment.get('choice')!r}, expected "
            f"one of {', '.join(CHOICES)}; download the judgments from annotate.html again"
        )


def _read_judgment_file(key, path):
    """One judgments file, checked against the key: {"path", "annotator", "exported",
    "judgments" (latest answer per item, in the order judged), "num_judged", "num_items"}."""
    data = _load_json(path)
    if not isinstance(data, dict) or data.get("format") != JUDGMENTS_FORMAT:
        raise JudgmentError(
            f"{path} is not a judgments file (its format is not {JUDGMENTS_FORMAT!r}); pass the "
            "files downloaded with the annotation page's 'Download judgments' button"
        )
    if data.get("page_id") != key["page_id"]:
        raise JudgmentError(
            f"{path} was made on another annotation page (page id {data.get('page_id')}, this "
            f"run's page is {key['page_id']}); score it against the run whose "
            "human_study/annotate_key.json has that page id"
        )
    judgments = data.get("judgments")
    if not isinstance(judgments, list) or not judgments:
        raise JudgmentError(
            f"{path} holds no judgments; the annotator has to judge at least one item on "
            "annotate.html before downloading"
        )
    annotator = data.get("annotator")
    if not isinstance(annotator, str) or not annotator.strip():
        raise JudgmentError(
            f"{path} has no annotator name; enter a name on annotate.html and download again"
        )
    latest = {}
    for judgment in judgments:
        _check_judgment(path, key, judgment)
        latest.pop(judgment["item_id"], None)  # a later answer to the same item replaces it
        latest[judgment["item_id"]] = {
            "item_id": judgment["item_id"],
            "choice": judgment["choice"],
            "time": str(judgment.get("time", "")),
            "note": str(judgment.get("note", "")),
        }
    return {
        "path": str(path),
        "annotator": annotator.strip(),
        "exported": str(data.get("exported", "")),
        "judgments": list(latest.values()),
        "num_judged": len(latest),
        "num_items": len(key["items"]),
        "summary": f"{annotator.strip()}: judged {len(latest)} of {len(key['items'])} items",
    }


def read_judgments(key, paths):
    """The judgment files at `paths`, each checked against `key` (the dict in annotate_key.json).

    Returns one dict per annotator: {"path", "annotator", "exported", "judgments", "num_judged",
    "num_items", "summary" ("ana: judged 40 of 128 items"), "replaces"}, with the latest answer
    per item. A half-finished session is accepted
    ("judged k of N items"). Two files by the same annotator name: only the later export counts
    (by the file's "exported" time, then by the order given), the earlier one is listed under
    "replaces" and a warning names both. Raises JudgmentError (one line, naming the file) for a
    file that is missing, empty, not JSON, not a judgments file, from another page, with unknown
    items or choices, or with zero judgments."""
    _check_key(key)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise JudgmentError(
            "no judgments files given; pass the judgments-*.json files from annotate.html"
        )
    sets = [_read_judgment_file(key, Path(path)) for path in paths]
    by_annotator = {}
    for _, judgment_set in sorted(enumerate(sets), key=lambda p: (p[1]["exported"], p[0])):
        earlier = by_annotator.get(judgment_set["annotator"])
        judgment_set["replaces"] = []
        if earlier is not None:
            warnings.warn(
                f"{earlier['path']} and {judgment_set['path']} are both by annotator "
                f"{judgment_set['annotator']!r}; only the later export, {judgment_set['path']}, "
                "counts",
                stacklevel=2,
            )
            judgment_set["replaces"] = earlier["replaces"] + [earlier["path"]]
        by_annotator[judgment_set["annotator"]] = judgment_set
    kept = {id(judgment_set) for judgment_set in by_annotator.values()}
    return [judgment_set for judgment_set in sets if id(judgment_set) in kept]


def _judgment_files(judgment_paths):
    """The files behind `judgment_paths`: a folder stands for its judgments-*.json files."""
    if isinstance(judgment_paths, (str, os.PathLike)):
        judgment_paths = [judgment_paths]
    files = []
    for path in map(Path, judgment_paths):
        if path.is_dir():
            found = sorted(path.glob("judgments-*.json"))
            if not found:
                raise JudgmentError(
                    f"{path} holds no judgments-*.json files; pass the files downloaded from "
                    "annotate.html or the folder they are in"
                )
            files += found
        else:
            files.append(path)
    return files


def _read_key(key_path):
    if not key_path.is_file():
        raise JudgmentError(
            f"{key_path} does not exist; build the page first: python experiments/annotate.py "
            "RUN (it writes the annotation page annotate.html and its key)"
        )
    try:
        return json.loads(key_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise JudgmentError(
            f"{key_path} is not valid JSON; rebuild the page: "
            "python experiments/annotate.py RUN --overwrite"
        ) from None


# -----------------------------------------------------------------------------
# scoring (Carlsson et al. 2025: % of judgments with the model text judged >= the human text)


def _code(choice, model_side):
    """A judgment from the model's point of view: MODEL_BETTER, EQUAL or HUMAN_BETTER."""
    if choice == "equal":
        return EQUAL
    return MODEL_BETTER if choice == model_side else HUMAN_BETTER


def _records(key, judgment_sets):
    """One (mode, prompt_id, annotator index, item_id, code) per judgment."""
    records = []
    for rater, judgment_set in enumerate(judgment_sets):
        for judgment in judgment_set["judgments"]:
            item = key["items"][judgment["item_id"]]
            code = _code(judgment["choice"], item["model_side"])
            records.append((item["mode"], item["prompt_id"], rater, judgment["item_id"], code))
    return records


def _bootstrap_weights(num_prompts, n_boot, seed):
    """n_boot x num_prompts matrix: how often each prompt is drawn in each bootstrap resample
    (num_prompts draws with replacement). A prompt's judgments count that many times."""
    draws = np.random.default_rng(seed).integers(0, num_prompts, size=(n_boot, num_prompts))
    flat = draws + num_prompts * np.arange(n_boot)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_boot * num_prompts)
    return counts.reshape(n_boot, num_prompts).astype(np.float64)


def _percentile_ci(values):
    """The central CI_LEVEL % percentile interval of bootstrap values (NaN = a resample without
    data for it, skipped)."""
    tail = (100 - CI_LEVEL) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _mode_scores(records, prompt_ids, weights):
    """Per mode: the paper's score with its bootstrap replicates, and the shares of each outcome."""
    prompt_index = {prompt_id: i for i, prompt_id in enumerate(prompt_ids)}
    results, replicates = {}, {}
    for mode in ordered_modes({r[0] for r in records}):
        codes = np.array([r[4] for r in records if r[0] == mode])
        where = np.array([prompt_index[r[1]] for r in records if r[0] == mode])
        judged = np.bincount(where, minlength=len(prompt_ids)).astype(np.float64)
        not_worse = np.bincount(where, weights=codes >= EQUAL, minlength=len(prompt_ids))
        with np.errstate(invalid="ignore", divide="ignore"):  # resamples without this mode: NaN
            replicates[mode] = 100 * (weights @ not_worse) / (weights @ judged)
        results[mode] = {
            "n": int(codes.size),
            "prompts": int(np.count_nonzero(judged)),
            "score": float(100 * np.mean(codes >= EQUAL)),
            "ci": _percentile_ci(replicates[mode]),
            "model_better": float(100 * np.mean(codes == MODEL_BETTER)),
            "equal": float(100 * np.mean(codes == EQUAL)),
            "human_better": float(100 * np.mean(codes == HUMAN_BETTER)),
        }
    return results, replicates


def _differences(results, replicates):
    """score_a - score_b for every pair of modes (a later in display order), with the paired
    bootstrap CI: both scores of a replicate come from the same resampled prompts."""
    modes = list(results)
    differences = []
    for i, mode_b in enumerate(modes):
        for mode_a in modes[i + 1 :]:
            differences.append(
                {
                    "a": mode_a,
                    "b": mode_b,
                    "difference": results[mode_a]["score"] - results[mode_b]["score"],
                    "ci": _percentile_ci(replicates[mode_a] - replicates[mode_b]),
                }
            )
    return differences


def _agreement(records, num_raters):
    """Krippendorff's alpha (krippendorff package, ordinal: human better < equal < model better) on
    the items judged by two or more annotators; annotators are rows, items columns, NaN = not
    judged. Returns {"alpha", "reason" (why alpha is None), "items", "annotators"}."""
    raters_of = {}
    for _, _, rater, item_id, _ in records:
        raters_of.setdefault(item_id, set()).add(rater)
    shared = sorted(item_id for item_id, raters in raters_of.items() if len(raters) >= 2)
    raters = sorted({rater for item_id in shared for rater in raters_of[item_id]})
    result = {"alpha": None, "reason": None, "items": len(shared), "annotators": len(raters)}
    if not shared:
        reason = "only one annotator" if num_raters < 2 else "no item was judged by two annotators"
        result["reason"] = f"{reason}, so there is no agreement to measure"
        return result
    data = np.full((len(raters), len(shared)), np.nan)
    row, column = {r: i for i, r in enumerate(raters)}, {s: j for j, s in enumerate(shared)}
    for _, _, rater, item_id, code in records:
        if item_id in column:
            data[row[rater], column[item_id]] = code
    # the fixed value domain keeps the three categories even when the data miss one of them
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        alpha = krippendorff.alpha(
            reliability_data=data,
            level_of_measurement="ordinal",
            value_domain=[HUMAN_BETTER, EQUAL, MODEL_BETTER],
        )
    if not np.isfinite(alpha):
        result["reason"] = "every shared judgment has the same value, so alpha is undefined"
        return result
    result["alpha"] = float(alpha)
    return result


def score_preference(key, judgment_sets, n_boot=N_BOOT, seed=0):
    """Scores of the human-preference study from read_judgments' output.

    Per mode (scores["modes"][mode]): "score" = % of judgments where the model text was judged
    better than or equal to the human text (the paper's definition), "ci" = 95 % percentile
    bootstrap interval over prompts (resampled with replacement, all judgments of a prompt kept
    together), "model_better" / "equal" / "human_better" shares (%), "n" judgments, "prompts".
    scores["differences"]: score_a - score_b per pair of modes with a paired bootstrap CI (the same
    resampled prompts for both). scores["agreement"]: Krippendorff's alpha (ordinal, krippendorff
    package) over items judged by >= 2 annotators, or None with a "reason". Also "counts" and
    "annotators" (judged k of N per annotator). Deterministic for a seed."""
    _check_key(key)
    records = _records(key, judgment_sets)
    if not records:
        raise JudgmentError("no judgments to score; pass files with at least one judgment")
    prompt_ids = sorted({r[1] for r in records}, key=str)
    weights = _bootstrap_weights(len(prompt_ids), n_boot, seed)
    results, replicates = _mode_scores(records, prompt_ids, weights)
    num_items = len(key["items"])
    return {
        "page_id": key["page_id"],
        "modes": results,
        "unjudged_modes": ordered_modes(
            {item["mode"] for item in key["items"].values()} - set(results)
        ),
        "differences": _differences(results, replicates),
        "agreement": _agreement(records, len(judgment_sets)),
        "counts": {
            "annotators": len(judgment_sets),
            "judgments": len(records),
            "items_judged": len({r[3] for r in records}),
            "num_items": num_items,
            "prompts": len(prompt_ids),
        },
        "annotators": [
            {
                "annotator": s["annotator"],
                "judged": len(s["judgments"]),
                "num_items": num_items,
                "path": s.get("path"),
                "replaces": s.get("replaces", []),
            }
            for s in judgment_sets
        ],
        "n_boot": n_boot,
        "seed": seed,
    }


def write_scores(run_dir, judgment_paths, n_boot=N_BOOT):
    """Score the judgments files (or folders of them) of a run's page and write, in
    <run>/human_study/, preference.json (the scores), preference.md and preference.png. Every file
    is read and checked, and the page and figure rendered, before anything is written. Returns
    the scores."""
    study = Path(run_dir) / STUDY_DIR
    key = _read_key(study / "annotate_key.json")
    judgment_sets = read_judgments(key, _judgment_files(judgment_paths))
    scores = score_preference(key, judgment_sets, n_boot=n_boot)
    scores["evaluation"] = key.get("evaluation")
    files = {
        "preference.json": (json.dumps(scores, indent=2) + "\n").encode("utf-8"),
        "preference.md": preference_table(scores, plot.read_paper()).encode("utf-8"),
        "preference.png": plot._png(plot_preference(scores)),
    }
    with runfiles.RunLock(run_dir, "annotate.py " + " ".join(sys.argv[1:])):
        for name, data in files.items():
            plot._write_atomic(study / name, data)
    return scores


# -----------------------------------------------------------------------------
# the scores as a page and a figure: preference.md and preference.png


def _fmt_ci(ci, signed=False):
    sign = "+" if signed else ""
    return f"{ci[0]:{sign}.1f} to {ci[1]:{sign}.1f}"


def _paper_lines(paper):
    """The paper's human-preference numbers as a markdown table, with how to read them."""
    intro = (
        f"Carlsson et al. (ICLR 2025), human preference: {paper['human_preference']['definition']}."
    )
    how_to_read = (
        "These come from larger models, longer texts and other annotators: compare the ordering "
        "of the modes and the size of the gaps between them with yours (hyperfitted above greedy "
        "and top-p), not the absolute percentages."
    )
    header = "| model (paper) | " + " | ".join(plot._mode_label(m) for m in ANNOTATE_MODES) + " |"
    lines = [
        "## The paper's numbers",
        "",
        intro,
        "",
        header,
        "|---" * (len(ANNOTATE_MODES) + 1) + "|",
    ]
    for numbers in paper["human_preference"]["models"]:
        cells = [f"{numbers[m]:.1f}" if m in numbers else "–" for m in ANNOTATE_MODES]
        lines.append(f"| {numbers['model']} | " + " | ".join(cells) + " |")
    return lines + ["", how_to_read]


def _agreement_line(agreement):
    if agreement["alpha"] is None:
        return f"Krippendorff's alpha: not computed ({agreement['reason']})."
    return (
        f"Krippendorff's alpha (ordinal: human better < equal < model better): "
        f"{agreement['alpha']:.3f}, over {agreement['items']} items judged by two or more of "
        f"{agreement['annotators']} annotators (1 = perfect agreement, 0 = chance level)."
    )


def _mode_rows(scores):
    rows = [
        (
            f"| mode | score (% model ≥ human) | {CI_LEVEL} % CI | model better | equal | "
            "human better | judgments | prompts |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in scores["modes"].items():
        rows.append(
            f"| {plot._mode_label(mode)} | **{m['score']:.1f}** | {_fmt_ci(m['ci'])} | "
            f"{m['model_better']:.1f} | {m['equal']:.1f} | {m['human_better']:.1f} | {m['n']} | "
            f"{m['prompts']} |"
        )
    for mode in scores.get("unjudged_modes", []):
        rows.append(f"| {plot._mode_label(mode)} | no judgments yet | | | | | 0 | 0 |")
    return rows


def _difference_rows(scores):
    if not scores["differences"]:
        return ["Only one mode was judged: no differences between modes."]
    rows = [
        f"| A − B | difference (points) | {CI_LEVEL} % CI (paired) |",
        "|---|---|---|",
    ]
    for d in scores["differences"]:
        rows.append(
            f"| {plot._mode_label(d['a'])} − {plot._mode_label(d['b'])} | {d['difference']:+.1f} | "
            f"{_fmt_ci(d['ci'], signed=True)} |"
        )
    rows += ["", "A CI that excludes 0 means the two modes differ beyond resampling noise."]
    return rows


def _annotator_lines(scores):
    lines = []
    for a in scores["annotators"]:
        name = markdown_text(a["annotator"])
        line = f"- annotator {name}: {a['judged']} of {a['num_items']} items judged"
        if a.get("replaces"):
            earlier = markdown_text(", ".join(a["replaces"]))
            line += f" (an earlier file, {earlier}, was replaced by this one)"
        lines.append(line)
    return lines


def markdown_text(value):
    """Text from a file (an annotator's name, a path) as plain Markdown text: HTML escaped, the
    characters Markdown acts on backslash-escaped, on one line."""
    text = html.escape(" ".join(str(value).split()))
    return "".join(f"\\{c}" if c in "\\`*_[]|#<>!" else c for c in text)


def preference_table(scores, paper):
    """preference.md: the paper's score per mode (with CI and outcome shares), the differences
    between modes, Krippendorff's alpha, each annotator's completeness and the paper's numbers.
    `scores`: annotate.py's preference.json."""
    counts = scores["counts"]
    overview = (
        f"{counts['annotators']} annotator(s), {counts['judgments']} judgments of "
        f"{counts['items_judged']} of {counts['num_items']} items ({counts['prompts']} prompts) "
        f"on annotation page {scores['page_id']}. Each item put a model continuation beside the "
        "real human continuation of the same context, blind and in random order."
    )
    definition = (
        "Score = % of judgments in which the model's continuation was judged better than or "
        "equal to the human one (the paper's definition). CI: percentile bootstrap over "
        f"prompts ({scores['n_boot']} resamples; all judgments of a prompt stay together)."
    )
    lines = [
        "# Human preference: model vs. human continuation",
        "",
        overview,
        "",
        definition,
        "",
        *_mode_rows(scores),
        "",
        "## Differences between modes",
        "",
        *_difference_rows(scores),
        "",
        "## Agreement between annotators",
        "",
        _agreement_line(scores["agreement"]),
        "",
        "## Annotators",
        "",
        *_annotator_lines(scores),
        "",
        *_paper_lines(paper),
    ]
    return "\n".join(lines) + "\n"


def plot_preference(scores):
    """Bar chart of the paper's score per judged mode, with the 95 % bootstrap CI as error bars
    (y axis 0-100 %). Returns the matplotlib Figure."""
    modes = list(scores["modes"])
    values = np.array([scores["modes"][m]["score"] for m in modes])
    cis = np.array([scores["modes"][m]["ci"] for m in modes]).reshape(-1, 2)
    fig = plot.Figure(figsize=PREFERENCE_FIGSIZE)
    ax = fig.add_subplot()
    positions = np.arange(len(modes))
    ax.bar(
        positions,
        values,
        yerr=np.vstack([values - cis[:, 0], cis[:, 1] - values]),
        capsize=6,
        error_kw={"clip_on": False},  # a CI reaching 100 % keeps its cap visible
        color=[plot.mode_color(m) for m in modes],
        label="score (bars)",
    )
    for x, value in zip(positions, values):  # beside the error bar, so the two never overlap
        ax.text(
            x + 0.04,
            value + 1,
            f"{value:.1f} %",
            ha="left",
            va="bottom",
            fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
    ax.set_xticks(
        positions,
        [f"{plot._mode_label(m)}\nn = {scores['modes'][m]['n']}" for m in modes],
        fontsize=9,
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("model judged ≥ human (%)")
    ax.set_title("Human preference: model vs. human continuation")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.text(
        0.01,
        0.01,
        f"% of judgments where the model text was judged better than or equal to the human text; "
        f"error bars: {CI_LEVEL} % percentile bootstrap CI over prompts. "
        f"{scores['counts']['annotators']} annotator(s), "
        f"{scores['counts']['judgments']} judgments.",
        fontsize=7,
        color="#555555",
        wrap=True,
    )
    fig.subplots_adjust(bottom=0.2, top=0.9, left=0.1, right=0.98)
    return fig


# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = runfiles.Parser(
        description="The paper's human study for a run: its blind page (RUN/human_study/"
        "annotate.html + annotate_key.json), or, with --judgments, the scores of the files the "
        "annotators downloaded from it (RUN/human_study/preference.json; plot.py renders them).",
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder with an evaluation (evaluate.py)")
    p.add_argument(
        "--tokens", type=int, default=ANNOTATE_TOKENS, help="tokens per side (default: 128)"
    )
    p.add_argument("--seed", type=int, default=0, help="the page's order and sides (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a page that exists")
    p.add_argument("--judgments", nargs="+", metavar="FILE", help="judgments files or folders")
    return p


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input); errors are one line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    warnings.formatwarning = lambda message, *args, **kwargs: f"annotate.py: warning: {message}\n"
    try:
        args = build_parser().parse_args(argv)
        if args.judgments:
            scores = write_scores(args.run_dir, args.judgments)
            judged = {m: f"{s['score']:.1f} %" for m, s in scores["modes"].items()}
            print(f"scores: {judged}; {Path(args.run_dir) / STUDY_DIR / 'preference.md'}")
        else:
            print(write_page(args.run_dir, args.tokens, args.seed, args.overwrite))
    except hf.UsageError as e:
        print(f"annotate.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk while writing the scores: each file is whole or absent
        print(
            f"annotate.py: cannot write {e.filename} ({e.strerror}); check the folder",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("annotate.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
