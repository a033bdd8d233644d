"""The documentation says only what the code does, where a machine can tell: every option in a
`python <script> ...` command of README.md, docs/, bench/README.md, data/README.md and the
scripts' own usage lines is one that script's parser accepts, every other option the pages name
is one of some script of the kit, and every relative link leads to a file (and a heading of it,
where the link names one). An audit found renamed options and a dead anchor in these files; this
keeps that kind of drift out."""

import ast
import contextlib
import io
import re

import pytest
from conftest import ROOT, load_bench

import annotate
import evaluate
import hyperfit
import images
import plot
import studies

PARSERS = {
    "hyperfit.py": hyperfit.build_parser,
    "evaluate.py": evaluate.build_parser,
    "plot.py": plot.build_parser,
    "experiments/annotate.py": annotate.build_parser,
    "experiments/images.py": images.build_parser,
    "experiments/studies.py": studies.build_parser,
    "bench/bench.py": None,  # its parser lives inside bench.settings: read from its --help
}
OTHER_TOOLS = {"--no-deps": "pip", "--no-sandbox": "chromium", "--fetch-wheels": "gpu_check.sh"}
DOCS = sorted(f"docs/{p.name}" for p in ROOT.glob("docs/*.md"))
PAGES = ["README.md", "bench/README.md", "data/README.md", *DOCS]
COMMAND = re.compile(r"python3? ((?:experiments/|bench/)?\w+\.py)([^`\n]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def usage_texts():
    """(where, text): each page, and each script's module docstring (its usage lines)."""
    texts = [(page, (ROOT / page).read_text(encoding="utf-8")) for page in PAGES]
    for script in PARSERS:
        tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
        texts.append((script, ast.get_docstring(tree) or ""))
    return texts


def options_of(script):
    """Every option string `script`'s command line accepts."""
    if PARSERS[script] is None:
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            load_bench().settings(["--help"])
        return set(FLAG.findall(help_text.getvalue()))
    parser = PARSERS[script]()
    return {flag for action in parser._actions for flag in action.option_strings}


def commands():
    """(where, script, options used) of every documented command of a script with a parser."""
    found = []
    for where, text in usage_texts():
        for script, rest in COMMAND.findall(text):
            if script in PARSERS:
                rest = re.split(r"&&|;|\||#", rest)[0]  # this command only, not a comment
                found.append((where, script, FLAG.findall(rest)))
    return found


def test_every_documented_option_is_one_the_script_accepts():
    documented, accepted = commands(), {script: options_of(script) for script in PARSERS}
    assert len(documented) > 30  # the pages do hold commands: the pattern finds them
    wrong = [
        f"{where}: python {script} {flag}"
        for where, script, flags in documented
        for flag in flags
        if flag not in accepted[script]
    ]
    assert not wrong, wrong


def test_every_option_the_pages_name_is_one_of_a_kit_script():
    """`--x` anywhere in the pages' code spans: an option of some script of the kit, or of the
    few other tools the pages name (pip, chromium, bench/gpu_check.sh)."""
    kit = set().union(*(options_of(script) for script in PARSERS))
    assert "--lora-r" in kit and "--block-ngrams" in kit and "--time-budget" in kit
    assert "--fetch-wheels" in (ROOT / "bench" / "gpu_check.sh").read_text(encoding="utf-8")
    named = {
        (where, flag)
        for where, text in usage_texts()
        for span in re.findall(r"`([^`\n]+)`", text)
        for flag in FLAG.findall(span)
    }
    unknown = sorted((w, f) for w, f in named if f not in kit and f not in OTHER_TOOLS)
    assert len(named) > 50 and not unknown, unknown


def slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_leads_to_a_file_and_heading(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / path if path else ROOT / page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, broken
