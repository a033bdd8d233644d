"""The users' notebooks: hyperfit.ipynb runs top to bottom on a real kernel (nbclient + ipykernel)
at tiny settings, and each script pasted whole into a cell, in a folder without the kit (as on
Colab), defines its functions and neither exits nor starts work."""

import os
import shutil

import nbformat
import pytest
from conftest import ROOT, TINY_RUN
from nbclient import NotebookClient


def execute(notebook, cwd, env=None, timeout=600):
    """Run every cell on a fresh python3 kernel; returns the executed notebook."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd)}},
        )
        return client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def outputs(cell):
    return [o for o in cell.get("outputs", []) if o.get("output_type") != "stream" or o.get("text")]


TINY_SETTINGS = """MODEL = {model!r}
OUT_DIR = {out!r}
SETTINGS.update(data="data/fiction/carroll_alice_in_wonderland.txt", seq_len=64, num_train=16,
                num_val=8, num_prompts=4, prompt_len=16, gen_tokens=16, epochs=10, lr=1e-2,
                eval_every=10)
EVALUATION.update(num_prompts=6, new_tokens=100, sharpness_seqs=2, batch_size=8)"""


def test_the_notebook_runs_top_to_bottom(tmp_path, tiny_model_dir):
    """The notebook as users run it, with one cell added after its settings cell: a tiny random
    model and tiny settings (the code path only, in seconds)."""
    notebook = nbformat.read(ROOT / "hyperfit.ipynb", as_version=4)
    settings = next(i for i, c in enumerate(notebook.cells) if c.source.startswith("MODEL ="))
    tiny = TINY_SETTINGS.format(model=tiny_model_dir, out=str(tmp_path))
    notebook.cells.insert(settings + 1, nbformat.v4.new_code_cell(tiny))
    done = execute(notebook, ROOT, {"OMP_NUM_THREADS": "1"})
    code = [cell for cell in done.cells if cell.cell_type == "code"]
    assert all(
        not any(o.get("output_type") == "error" for o in cell.get("outputs", [])) for cell in code
    )
    images = [o for cell in code for o in outputs(cell) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # training curves, decoding comparison, quality, TTR along the position
    markdown = [
        o["data"]["text/markdown"]
        for cell in code
        for o in outputs(cell)
        if "text/markdown" in o.get("data", {})
    ]
    assert any("| hyperfitted_greedy |" in m for m in markdown)  # table.md shown inline
    assert any("beside the paper" in m for m in markdown)  # paper_comparison.md shown inline
    run = tmp_path / "notebook"
    assert (run / "report.md").exists() and (run / "human_study" / "annotate.html").exists()
    assert (run / "eval" / "table.md").exists() and (run / "eval" / "quality.png").exists()
    assert not (ROOT / "results" / "notebook").exists()  # nothing written into the kit's results
    shown = [
        o for o in outputs(code[next(i for i, c in enumerate(code) if "getsource" in c.source)])
    ]
    assert "def train_step(" in str(shown)  # the training step, shown from its source
    assert "def token_loss_sum(" in str(shown)  # and the loss, where a student changes it


def test_the_notebook_s_first_cell_clones_the_kit_and_moves_into_it(tmp_path):
    """Kaggle or Colab: no kit beside the notebook; the first cell clones KIT_REPO and moves in."""
    first = nbformat.read(ROOT / "hyperfit.ipynb", as_version=4).cells[1]
    assert first.source.startswith("# 0. The kit")
    check = nbformat.v4.new_code_cell("print(os.path.exists('hyperfit.py'), os.getcwd())")
    notebook = nbformat.v4.new_notebook(cells=[first, check])
    done = execute(notebook, tmp_path, {"HYPERFIT_KIT_REPO": str(ROOT)})
    assert done.cells[-1].outputs[0]["text"].strip() == f"True {tmp_path / 'hyperfit'}"


ORDER = [  # docs/usage.md's paste order: each file after the ones it imports
    "runfiles.py",
    "engine.py",
    "measures.py",
    "hyperfit.py",
    "evaluate.py",
    "plot.py",
    "experiments/paper_comparison.py",
    "experiments/annotate.py",
    "experiments/studies.py",
    "experiments/images.py",
]


@pytest.mark.parametrize("script", ORDER)
def test_a_script_pasted_into_a_cell_only_defines_its_functions(tmp_path, script):
    """As on Colab: no kit files beside the notebook, each file's text pasted into a cell, in the
    order of ORDER (plot.py alone needs none before it), then a cell that uses them. The kernel's
    own argv (-f <connection file>) must not reach an argument parser, and nothing may exit."""
    names = [script] if script == "plot.py" else ORDER[: ORDER.index(script) + 1]
    sources = [(ROOT / name).read_text() for name in names]
    checks = {
        "runfiles.py": "print(check_run_name('a'), callable(write_atomic))",
        "engine.py": "print(BUNDLED, callable(dense_copy))",
        "measures.py": "print(simctg_repetition(['a b a b a'])['simctg_rep_2'], "
        "unknown_words('a zxqv'))",
        "hyperfit.py": "print(type_token_ratio([1, 2, 2, 3]), callable(hyperfit), callable(main))",
        "evaluate.py": "print(check_modes(None, True)[-1], callable(evaluate), callable(hyperfit))",
        "experiments/paper_comparison.py": "print(callable(paper_comparison), callable(plot_run))",
        "experiments/annotate.py": "print(page_id_of([]) == page_id_of([]), callable(write_page))",
        "experiments/studies.py": "print(study_plan('shuffle')[0][0], callable(run_study))",
        "experiments/images.py": "print(shape_settings(dict(side=8, positions=65)), "
        "callable(images), callable(hyperfit))",
        "plot.py": "print(repeated_ngram_mask([1, 2, 3, 1, 2, 3], 3), callable(plot_run))",
    }
    expected = {
        "runfiles.py": "a True",
        "engine.py": "bundled:smollm2-135m True",
        "measures.py": "33.33 ['zxqv']",
        "hyperfit.py": "0.75 True True",
        "evaluate.py": "hyperfitted_blocked True True",
        "experiments/paper_comparison.py": "True True",
        "experiments/annotate.py": "True True",
        "experiments/studies.py": "order0 True",
        "experiments/images.py": "{'seq_len': 65, 'prompt_len': 33, 'gen_tokens': 32} True True",
        "plot.py": "[False, False, False, False, False, True] True",
    }
    cells = [nbformat.v4.new_code_cell(text) for text in sources]
    cells.append(nbformat.v4.new_code_cell(checks[script]))
    notebook = nbformat.v4.new_notebook(cells=cells)
    done = execute(notebook, tmp_path, {"PYTHONPATH": ""})
    assert not list(tmp_path.iterdir())  # nothing written: no run started
    last = "".join(o.get("text", "") for o in done.cells[-1].outputs)
    assert last.strip() == expected[script]
    for cell in done.cells:
        assert not any(o.get("output_type") == "error" for o in cell.outputs), cell.source[:80]


def test_the_pasted_files_run_the_documented_calls(tmp_path, tiny_model_dir):
    """docs/usage.md's paste route, whole: every file pasted in ORDER into one namespace (no kit
    files beside the notebook, as on Colab), then the documented calls: hyperfit(), evaluate()
    and the plot functions. A later file's paste header must not shadow an earlier name."""
    data = tmp_path / "alice.txt"
    data.write_text((ROOT / "data/fiction/carroll_alice_in_wonderland.txt").read_text())
    work = tmp_path / "work"  # the kit's data/ beside the cells, as docs/usage.md says
    shutil.copytree(ROOT / "data" / "nltk_data", work / "data" / "nltk_data")
    shutil.copy(ROOT / "data" / "paper.json", work / "data")  # the paper's numbers
    settings = dict(TINY_RUN, epochs=2, data=str(data), out_dir=str(tmp_path / "runs"))
    calls = f"""
run_dir = hyperfit(model={tiny_model_dir!r}, run_name="pasted", **{settings!r})
summary = evaluate(run_dir, num_prompts=4, new_tokens=24, sharpness_seqs=2, batch_size=8,
                   modes=["original_greedy", "hyperfitted_greedy"], progress=False)
figure = plot_training_curves(run_dir)
compared = os.path.basename(write_comparison(run_dir))  # experiments/paper_comparison.py
print(len(read_metrics(run_dir)), sorted(summary["modes"]), len(figure.axes) > 0, compared)
"""
    cells = [nbformat.v4.new_code_cell((ROOT / name).read_text()) for name in ORDER]
    cells.append(nbformat.v4.new_code_cell(calls))
    done = execute(nbformat.v4.new_notebook(cells=cells), work, {"PYTHONPATH": ""})
    for cell in done.cells:
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        assert not errors, (cell.source[:80], errors)
    last = "".join(o.get("text", "") for o in done.cells[-1].outputs).strip().splitlines()[-1]
    assert last == "2 ['human', 'hyperfitted_greedy', 'original_greedy'] True paper_comparison.md"
