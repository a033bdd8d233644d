"""The human study (annotate.py): the blind A/B page, its key and the scorer of its judgments,
and plot.py's rendering of the scores.

Unit tests check the page's item order, sides and blinding, and the scorer on hand-made judgments
with known results. The browser test drives annotate.html in a real headless Chromium: answers by
click and key, undo, a note, a reload, the download, and an import into a cleared browser."""

import itertools
import json
import os
import re
import time
from pathlib import Path

import pytest

import annotate
import evaluate
import hyperfit
import plot
import runfiles

annotation = preference = annotate  # the page's builder and the scorer both live in annotate.py
MODES = evaluate.MODES
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def make_pairs(num_prompts, modes):
    """One pair per prompt x mode; texts say which prompt they belong to but never the mode."""
    return [
        {
            "prompt_id": prompt_id,
            "mode": mode,
            "prompt": f"Context {prompt_id}: the lighthouse keeper climbed the stairs and",
            "model_text": f"model continuation {chr(65 + j)} of context {prompt_id}.",
            "human_text": f"human continuation of context {prompt_id}.",
        }
        for prompt_id in range(num_prompts)
        for j, mode in enumerate(modes)
    ]


def sequence(page_items, key):
    """The key entries in presentation order."""
    return [key["items"][item["item_id"]] for item in page_items]


# -----------------------------------------------------------------------------
# build_annotation and the page


def test_build_annotation_is_deterministic_for_a_seed():
    pairs = make_pairs(6, MODES[:3])
    assert annotation.build_annotation(pairs, seed=3) == annotation.build_annotation(pairs, seed=3)
    other_items, other_key = annotation.build_annotation(pairs, seed=4)
    items, key = annotation.build_annotation(pairs, seed=3)
    assert other_items != items and other_key["page_id"] != key["page_id"]
    assert key["seed"] == 3 and len(key["page_id"]) == 16


def test_every_pair_is_one_item_with_the_model_text_on_the_keyed_side():
    pairs = make_pairs(5, MODES)
    items, key = annotation.build_annotation(pairs, seed=1)
    assert len(items) == len(pairs) == len(key["items"])
    assert len({item["item_id"] for item in items}) == len(items)
    by_pair = {(p["prompt_id"], p["mode"]): p for p in pairs}
    seen = set()
    for item, entry in zip(items, sequence(items, key)):
        pair = by_pair[(entry["prompt_id"], entry["mode"])]
        human_side = "right" if entry["model_side"] == "left" else "left"
        assert item[entry["model_side"]] == pair["model_text"]
        assert item[human_side] == pair["human_text"]
        assert item["prompt"] == pair["prompt"]
        seen.add((entry["prompt_id"], entry["mode"]))
    assert seen == set(by_pair)


def test_model_side_is_balanced():
    items, key = annotation.build_annotation(make_pairs(20, MODES[:2]), seed=0)
    sides = [entry["model_side"] for entry in sequence(items, key)]
    assert len(sides) == 40 and 10 <= sides.count("left") <= 30
    for mode in MODES[:2]:  # balanced within each mode, so a side bias cannot favour a mode
        mode_sides = [e["model_side"] for e in key["items"].values() if e["mode"] == mode]
        assert mode_sides.count("left") == mode_sides.count("right") == 10


def test_modes_never_appear_on_the_page():
    items, key = annotation.build_annotation(make_pairs(4, MODES), seed=2)
    page = annotation.annotation_html(items, key["page_id"])
    page_json = json.dumps(items)
    for mode in MODES:
        assert mode not in page_json
        assert mode not in page
        assert mode.replace("_", " ") not in page
    assert key["page_id"] in page and items[0]["left"] in page


@pytest.mark.parametrize("num_prompts,num_modes", [(2, 2), (3, 2), (5, 3), (6, 5), (2, 5)])
def test_order_interleaves_modes_and_never_repeats_a_prompt(num_prompts, num_modes):
    modes = MODES[:num_modes]
    for seed in range(5):
        items, key = annotation.build_annotation(make_pairs(num_prompts, modes), seed=seed)
        entries = sequence(items, key)
        for before, after in itertools.pairwise(entries):
            assert before["prompt_id"] != after["prompt_id"]
            if num_modes >= 3 and num_prompts >= num_modes:
                assert before["mode"] != after["mode"]
        if num_prompts >= num_modes:  # rounds: every mode once in each block of len(modes) items
            for start in range(0, len(entries), num_modes):
                block = entries[start : start + num_modes]
                assert sorted(e["mode"] for e in block) == sorted(modes)


def test_item_ids_are_opaque():
    items, _ = annotation.build_annotation(make_pairs(4, MODES[:2]), seed=0)
    assert [item["item_id"] for item in items] == [f"i{n:03d}" for n in range(1, 9)]


def test_bad_pairs_raise_one_line():
    pairs = make_pairs(2, MODES[:2])
    with pytest.raises(hyperfit.UsageError, match="repeats prompt 0"):
        annotation.build_annotation(pairs + [dict(pairs[0])])
    with pytest.raises(hyperfit.UsageError, match="lacks human_text"):
        annotation.build_annotation([{k: v for k, v in pairs[0].items() if k != "human_text"}])
    with pytest.raises(hyperfit.UsageError, match="no pairs"):
        annotation.build_annotation([])


def test_script_tags_in_texts_cannot_break_the_page():
    pairs = make_pairs(2, MODES[:2])
    pairs[0]["model_text"] = "</script><script>alert(1)</script>"
    items, key = annotation.build_annotation(pairs)
    page = annotation.annotation_html(items, key["page_id"])
    assert "</script><script>alert(1)" not in page
    assert page.count("</script>") == 3  # the two JSON blocks and the program


def write_page(folder, pairs):
    """The page and key of `pairs` in `folder` (annotate.py's files); returns their paths."""
    runfiles.write_folder(folder, annotate.page_files(pairs), "nothing was changed")
    return folder / "annotate.html", folder / "annotate_key.json"


def test_write_page_writes_page_and_key(tmp_path):
    html_path, key_path = write_page(tmp_path / "human_study", make_pairs(3, MODES[:2]))
    key = json.loads(Path(key_path).read_text(encoding="utf-8"))
    page = Path(html_path).read_text(encoding="utf-8")
    assert key["page_id"] in page and len(key["items"]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["human_study"]  # nothing left beside it
    assert sorted(p.name for p in (tmp_path / "human_study").iterdir()) == [
        "annotate.html",
        "annotate_key.json",
    ]
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in page  # self-contained: nothing to fetch


def test_placeholder_names_in_texts_stay_text():
    """The template is filled in one pass: a continuation that holds a placeholder's name (or
    JSON-looking text) is shown as text, and the page's JSON blocks still parse."""
    pairs = make_pairs(2, MODES[:2])
    pairs[0]["model_text"] = '__PAGE_JSON__ and __ITEMS_JSON__ and __TITLE__ {"x": 1}'
    items, key = annotation.build_annotation(pairs)
    page = annotation.annotation_html(items, key["page_id"])
    blocks = re.findall(r'<script type="application/json" id="[a-z-]+">(.*?)</script>', page, re.S)
    assert len(blocks) == 2
    items_back, page_data = (json.loads(block) for block in blocks)
    assert any(
        "__PAGE_JSON__ and __ITEMS_JSON__" in item["left"] + item["right"] for item in items_back
    )
    assert page_data == {"page_id": key["page_id"], "format": annotate.JUDGMENTS_FORMAT}


# -----------------------------------------------------------------------------
# the scorer, on hand-made judgments with known results

PAGE_ID = "0123456789abcdef"


def hand_key(modes_prompts_sides):
    """A key from [(mode, prompt_id, model_side), ...]; item ids k00, k01, ..."""
    items = {
        f"k{n:02d}": {"mode": mode, "prompt_id": prompt_id, "model_side": side}
        for n, (mode, prompt_id, side) in enumerate(modes_prompts_sides)
    }
    return {"page_id": PAGE_ID, "seed": 0, "items": items}


def judgment_set(annotator, choices):
    """What read_judgments returns for one file, from {item_id: choice}."""
    judgments = [
        {"item_id": item_id, "choice": choice, "time": "", "note": ""}
        for item_id, choice in choices.items()
    ]
    return {"annotator": annotator, "judgments": judgments, "path": f"{annotator}.json"}


def write_file(folder, annotator, choices, page_id=PAGE_ID, exported="2025-01-01T00:00:00.000Z"):
    data = {
        "format": preference.JUDGMENTS_FORMAT,
        "page_id": page_id,
        "annotator": annotator,
        "num_items": 0,
        "exported": exported,
        "judgments": judgment_set(annotator, choices)["judgments"],
    }
    path = Path(folder) / f"judgments-{page_id}-{annotator}-{exported[:19]}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def known_key():
    """Two modes on the same four prompts; model sides vary so the side mapping is exercised."""
    sides = ["left", "right", "left", "right"]
    rows = [("original_greedy", p, sides[p]) for p in range(4)]
    rows += [("hyperfitted_greedy", p, sides[3 - p]) for p in range(4)]
    return hand_key(rows)


# original greedy: model better (left), equal, model better (left), human better (left = human)
# -> 3 of 4 judged better or equal = 75 %; hyperfitted greedy: the model side always chosen -> 100 %
KNOWN_CHOICES = {
    "k00": "left",
    "k01": "equal",
    "k02": "left",
    "k03": "left",
    "k04": "right",
    "k05": "left",
    "k06": "right",
    "k07": "left",
}


def test_scores_match_hand_counts():
    scores = preference.score_preference(
        known_key(), [judgment_set("ana", KNOWN_CHOICES)], n_boot=2000
    )
    greedy, hyper = scores["modes"]["original_greedy"], scores["modes"]["hyperfitted_greedy"]
    assert greedy["score"] == 75.0 and greedy["n"] == 4
    assert (greedy["model_better"], greedy["equal"], greedy["human_better"]) == (50.0, 25.0, 25.0)
    assert 0 <= greedy["ci"][0] <= 75.0 <= greedy["ci"][1] <= 100
    assert greedy["ci"][0] < greedy["ci"][1]
    assert hyper["score"] == 100.0 and hyper["ci"] == [100.0, 100.0]
    assert list(scores["modes"]) == ["original_greedy", "hyperfitted_greedy"]  # display order
    (difference,) = scores["differences"]
    assert (difference["a"], difference["b"]) == ("hyperfitted_greedy", "original_greedy")
    assert difference["difference"] == 25.0
    assert 0 <= difference["ci"][0] <= 25.0 <= difference["ci"][1] <= 100
    assert scores["counts"] == {
        "annotators": 1,
        "judgments": 8,
        "items_judged": 8,
        "num_items": 8,
        "prompts": 4,
    }


def test_bootstrap_resamples_prompts_with_known_interval():
    """One prompt judged OK, one not: resamples give 100 (both draws the first, p = 1/4), 50 or 0
    (p = 1/4), so the 95 % percentile interval is exactly [0, 100]."""
    key = hand_key([("original_top_p", 0, "left"), ("original_top_p", 1, "left")])
    scores = preference.score_preference(
        key, [judgment_set("ana", {"k00": "left", "k01": "right"})]
    )
    assert scores["modes"]["original_top_p"]["score"] == 50.0
    assert scores["modes"]["original_top_p"]["ci"] == [0.0, 100.0]


def test_annotators_of_one_prompt_stay_together():
    """A second annotator agreeing on every item adds judgments but no independent prompts: with
    prompts resampled the interval must not narrow (resampling judgments would narrow it)."""
    one = preference.score_preference(known_key(), [judgment_set("ana", KNOWN_CHOICES)])
    two = preference.score_preference(
        known_key(), [judgment_set("ana", KNOWN_CHOICES), judgment_set("bo", KNOWN_CHOICES)]
    )
    assert two["modes"]["original_greedy"]["n"] == 8
    assert two["modes"]["original_greedy"]["ci"] == one["modes"]["original_greedy"]["ci"]
    assert two["agreement"]["alpha"] == 1.0  # perfect agreement
    assert two["agreement"]["items"] == 8 and two["agreement"]["annotators"] == 2


def test_krippendorff_alpha_on_the_published_binary_example():
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", binary data, two
    observers, ten units: alpha = 0.095. Observer values 0/1 become human better / model better."""
    observer_a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    observer_b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    key = hand_key([("hyperfitted_greedy", unit, "left") for unit in range(10)])
    sets = [
        judgment_set(name, {f"k{u:02d}": "left" if v else "right" for u, v in enumerate(values)})
        for name, values in (("a", observer_a), ("b", observer_b))
    ]
    alpha = preference.score_preference(key, sets, n_boot=100)["agreement"]["alpha"]
    # independently: alpha = 1 - (n - 1) * o_01 / (n_0 * n_1) from the coincidence matrix
    values = observer_a + observer_b
    n, n_1 = len(values), sum(values)
    o_01 = sum(a != b for a, b in zip(observer_a, observer_b))
    assert alpha == pytest.approx(1 - (n - 1) * o_01 / ((n - n_1) * n_1))
    assert round(alpha, 3) == 0.095


def test_alpha_is_none_with_a_reason():
    single = preference.score_preference(known_key(), [judgment_set("ana", KNOWN_CHOICES)])
    assert single["agreement"]["alpha"] is None and "one annotator" in single["agreement"]["reason"]
    disjoint = preference.score_preference(
        known_key(),
        [judgment_set("ana", {"k00": "left"}), judgment_set("bo", {"k01": "left"})],
    )
    assert disjoint["agreement"]["alpha"] is None
    assert "no item was judged by two" in disjoint["agreement"]["reason"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is empty"),
        ("this is { not json", "is not JSON"),
        ('{"format": "something-else", "judgments": []}', "is not a judgments file"),
    ],
)
def test_unreadable_files_raise_one_line(tmp_path, content, message):
    path = tmp_path / "judgments-x.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(preference.JudgmentError, match=message) as error:
        preference.read_judgments(known_key(), [path])
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_wrong_page_unknown_items_and_empty_sessions_raise_one_line(tmp_path):
    cases = [
        (write_file(tmp_path, "ana", {"k00": "left"}, page_id="fedcba9876543210"), "another anno"),
        (write_file(tmp_path, "bo", {"k99": "left"}), "not on this run's annotation page"),
        (write_file(tmp_path, "ed", {"k00": "left"}), "not on this run's annotation page"),
        (write_file(tmp_path, "cy", {"k00": "sideways"}), "choice 'sideways'"),
        (write_file(tmp_path, "di", {}), "holds no judgments"),
        (tmp_path / "missing.json", "does not exist"),
    ]
    edited = json.loads(cases[2][0].read_text(encoding="utf-8"))
    edited["judgments"][0]["item_id"] = ["k00"]  # not even a string
    cases[2][0].write_text(json.dumps(edited), encoding="utf-8")
    for path, message in cases:
        with pytest.raises(preference.JudgmentError, match=message) as error:
            preference.read_judgments(known_key(), [path])
        assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(preference.JudgmentError, match="page id fedcba9876543210, this run's"):
        preference.read_judgments(known_key(), [cases[0][0]])


def test_half_finished_session_is_scored_on_what_was_judged(tmp_path):
    path = write_file(tmp_path, "ana", {"k00": "left", "k04": "left"})
    (judged,) = preference.read_judgments(known_key(), [path])
    assert (judged["num_judged"], judged["num_items"]) == (2, 8)
    assert judged["summary"] == "ana: judged 2 of 8 items"
    scores = preference.score_preference(known_key(), [judged])
    assert scores["modes"]["original_greedy"]["score"] == 100.0  # k00: model (left) better
    assert scores["modes"]["hyperfitted_greedy"]["score"] == 0.0  # k04: model is on the right
    table = annotate.preference_table(scores, plot.read_paper())
    assert "annotator ana: 2 of 8 items judged" in table


def test_same_annotator_twice_counts_the_later_export(tmp_path):
    early = write_file(tmp_path, "ana", {"k00": "right"}, exported="2025-01-01T10:00:00.000Z")
    late = write_file(
        tmp_path, "ana", {"k00": "left", "k01": "equal"}, exported="2025-01-02T10:00:00.000Z"
    )
    with pytest.warns(UserWarning, match="only the later export"):
        sets = preference.read_judgments(known_key(), [late, early])
    assert [s["path"] for s in sets] == [str(late)] and sets[0]["replaces"] == [str(early)]


def test_table_and_figure(tmp_path):
    scores = preference.score_preference(
        known_key(),
        [judgment_set("ana", KNOWN_CHOICES), judgment_set("bo", {"k00": "right", "k04": "left"})],
        n_boot=500,
    )
    table = annotate.preference_table(scores, plot.read_paper())
    assert "| original greedy | **60.0** |" in table  # ana: 3 of 4 not worse, bo: 0 of 1
    assert "| hyperfitted greedy | **80.0** |" in table  # ana: 4 of 4, bo: 0 of 1 (k04 model right)
    fig = annotate.plot_preference(scores)
    (ax,) = fig.axes
    assert ax.get_ylim() == (0.0, 100.0) and len(ax.patches) == 2
    for needle in (
        "TinyLlama 1.1B",
        "34.3",
        "35.6",
        "52.4",
        "Krippendorff's alpha",
        "hyperfitted greedy",
    ):
        assert needle in table  # 35.6: DeepSeek's top-p, from data/paper.json


def test_annotator_names_reach_markdown_as_text():
    """A name from a judgments file is escaped in preference.md: no heading, no HTML."""
    name = "# <script>alert(1)</script><img src=x onerror=alert(2)> *bold* | pipe"
    scores = preference.score_preference(
        known_key(), [judgment_set(name, KNOWN_CHOICES)], n_boot=50
    )
    table = annotate.preference_table(scores, plot.read_paper())
    assert "<script>" not in table and "<img" not in table and "\n# " not in table
    line = next(line for line in table.splitlines() if "alert(1)" in line)
    assert line.startswith("- annotator ") and "&lt;script&gt;" in line and "\\|" in line


def test_a_deeply_nested_judgments_file_is_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(preference.JudgmentError, match="nested too deeply") as error:
        preference.read_judgments(known_key(), [path])
    assert "\n" not in str(error.value)


def test_write_scores_checks_everything_before_writing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(preference.JudgmentError, match="build the page first"):
        preference.write_scores(run, [tmp_path])
    (run / "human_study").mkdir(parents=True)
    (run / "human_study" / "annotate_key.json").write_text(
        json.dumps(known_key()), encoding="utf-8"
    )
    good = write_file(tmp_path, "ana", KNOWN_CHOICES)
    bad = write_file(tmp_path, "bo", {"k00": "left"}, page_id="fedcba9876543210")
    with pytest.raises(preference.JudgmentError, match="another annotation page"):
        preference.write_scores(run, [good, bad])
    assert sorted(p.name for p in (run / "human_study").iterdir()) == ["annotate_key.json"]
    scores = preference.write_scores(run, [good], n_boot=200)
    on_disk = json.loads((run / "human_study" / "preference.json").read_text(encoding="utf-8"))
    assert (
        on_disk["modes"]["original_greedy"]["score"]
        == scores["modes"]["original_greedy"]["score"]
        == 75.0
    )
    assert on_disk["page_id"] == PAGE_ID
    assert "**75.0**" in (run / "human_study" / "preference.md").read_text(encoding="utf-8")
    assert (run / "human_study" / "preference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# the page in a real browser


def browser_binaries():
    """Chromium and its driver, or a skip (a failure when HYPERFIT_REQUIRE_BROWSER=1, as in CI)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = (
            f"browser test needs {', '.join(missing)}; install: apt-get install chromium "
            "chromium-driver (and pip install selenium)"
        )
        if os.environ.get("HYPERFIT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM, CHROMEDRIVER


def start_chromium(binaries, download_dir, profile_dir):
    """Headless Chromium that saves downloads to download_dir without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",  # without these Chromium tries to reach Google
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile_dir}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False},
    )
    return webdriver.Chrome(service=Service(binaries[1]), options=options)


class Page:
    """annotate.html in the browser: what a test reads and does, with explicit waits."""

    def __init__(self, driver):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, 10)

    def element(self, element_id):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id):
        return self.element(element_id).text

    def wait_text(self, element_id, expected):
        self.wait.until(
            lambda _: self.text(element_id) == expected,
            message=f"#{element_id} never read {expected!r}",
        )

    def key(self, key):
        """Press a key with nothing focused, as an annotator reading the texts would."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(key).perform()

    def stored_state(self, page_id):
        script = f"return JSON.parse(localStorage.getItem('hyperfit-annotate:{page_id}'))"
        return self.driver.execute_script(script)


def answer_items(page, key_item_ids):
    """Answer the six items with clicks and keys, undo twice (key and button), type a note, reload
    halfway. Returns {item_id: choice} as finally answered."""
    from selenium.webdriver.common.keys import Keys

    page.element("choose-left").click()  # item 1: click
    page.wait_text("progress", "Item 2 of 6")
    page.key("3")  # item 2: key 3 = right
    page.wait_text("progress", "Item 3 of 6")
    page.key(Keys.ARROW_DOWN)  # item 3: equal
    page.wait_text("progress", "Item 4 of 6")
    page.key(Keys.BACKSPACE)  # undo: item 3 comes back
    page.wait_text("progress", "Item 3 of 6")
    assert page.text("judged-count") == "2 of 6 judged"
    page.key(Keys.ARROW_LEFT)  # item 3 again: left
    page.wait_text("progress", "Item 4 of 6")
    note = page.element("note")  # typing digits, u and Backspace in the note must answer nothing
    note.send_keys("looks 123 uu", Keys.BACKSPACE, Keys.ARROW_LEFT, Keys.ESCAPE)
    assert page.text("progress") == "Item 4 of 6" and note.get_attribute("value") == "looks 123 u"

    page.driver.refresh()  # a reload resumes at the same item, with the note typed so far
    page.wait_text("progress", "Item 4 of 6")
    assert page.element("note").get_attribute("value") == "looks 123 u"
    assert page.text("judged-count") == "3 of 6 judged"
    assert page.text("annotator-label") == "ana tester"

    page.element("choose-right").click()  # item 4: click, saved with its note
    page.wait_text("progress", "Item 5 of 6")
    page.element("undo").click()  # undo by button: item 4 comes back with its note
    page.wait_text("progress", "Item 4 of 6")
    assert page.element("note").get_attribute("value") == "looks 123 u"
    page.key("2")  # item 4 again: equal
    page.wait_text("progress", "Item 5 of 6")
    page.key(Keys.ARROW_RIGHT)  # item 5: right
    page.wait_text("progress", "Item 6 of 6")
    page.key("1")  # item 6: left
    page.wait_text("progress", "All 6 items judged")
    choices = ["left", "right", "left", "equal", "right", "left"]
    return dict(zip(key_item_ids, choices))


def expected_scores(key, choices):
    """The paper's score per mode, counted by hand from the key: model better or equal."""
    not_worse, total = {}, {}
    for item_id, choice in choices.items():
        entry = key["items"][item_id]
        ok = choice in ("equal", entry["model_side"])
        not_worse[entry["mode"]] = not_worse.get(entry["mode"], 0) + ok
        total[entry["mode"]] = total.get(entry["mode"], 0) + 1
    return {mode: 100 * not_worse[mode] / total[mode] for mode in total}


def wait_for_file(path, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path} was not downloaded within {timeout} s")


def check_import(page, downloaded, key, tmp_path):
    """Another page's file is refused visibly; the downloaded file restores the whole session."""
    page.driver.execute_script("localStorage.clear()")
    page.driver.refresh()
    page.wait_text("progress", "Item 1 of 6")
    assert page.element("setup").is_displayed()  # a cleared browser asks for the name again

    foreign = json.loads(downloaded.read_text(encoding="utf-8"))
    foreign["page_id"] = "ffffffffffffffff"
    foreign_path = tmp_path / "judgments-foreign.json"
    foreign_path.write_text(json.dumps(foreign), encoding="utf-8")
    page.element("import-file").send_keys(str(foreign_path))
    page.wait.until(lambda _: "another annotation page" in page.text("message"))
    assert "error" in page.element("message").get_attribute("class")
    assert page.text("progress") == "Item 1 of 6"

    page.element("import-file").send_keys(str(downloaded))
    page.wait.until(lambda _: page.text("message").startswith("Imported 6 judgments"))
    assert page.text("progress") == "All 6 items judged"
    assert page.text("annotator-label") == "ana tester"
    assert page.element("done").is_displayed()
    assert len(page.stored_state(key["page_id"])["judgments"]) == 6
    page.key("u")  # the restored session works: undo brings item 6 back
    page.wait_text("progress", "Item 6 of 6")


def test_annotation_page_in_a_real_browser(tmp_path):
    binaries = browser_binaries()
    html_path, key_path = write_page(tmp_path / "human_study", make_pairs(3, MODES[:2]))
    key = json.loads(Path(key_path).read_text(encoding="utf-8"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = start_chromium(binaries, downloads, tmp_path / "profile")
    try:
        page = Page(driver)
        driver.get(Path(html_path).as_uri())
        assert page.element("setup").is_displayed() and not page.element("work").is_displayed()
        page.element("annotator-name").send_keys("ana tester")
        page.element("start").click()
        page.wait_text("progress", "Item 1 of 6")
        choices = answer_items(page, sorted(key["items"]))
        page.element("download-done").click()
        downloaded = wait_for_file(downloads / f"judgments-{key['page_id']}-ana_tester.json")
        check_import(page, downloaded, key, tmp_path)
    finally:
        driver.quit()

    data = json.loads(downloaded.read_text(encoding="utf-8"))
    assert (data["format"], data["page_id"]) == (preference.JUDGMENTS_FORMAT, key["page_id"])
    assert (data["annotator"], data["num_items"]) == ("ana tester", 6)
    assert [j["item_id"] for j in data["judgments"]] == sorted(key["items"])  # in order judged
    assert [j["note"] for j in data["judgments"]][3] == "looks 123 u"
    assert all(j["time"].endswith("Z") for j in data["judgments"]) and data["exported"] > "2024"
    judgment_sets = preference.read_judgments(key, [downloaded])
    assert {j["item_id"]: j["choice"] for j in judgment_sets[0]["judgments"]} == choices
    scores = preference.score_preference(key, judgment_sets, n_boot=200)
    for mode, expected in expected_scores(key, choices).items():
        assert scores["modes"][mode]["score"] == pytest.approx(expected)
        assert scores["modes"][mode]["n"] == 3
