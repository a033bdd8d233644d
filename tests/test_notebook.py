"""The users' notebooks: hyperfit.ipynb runs top to bottom on a real kernel (nbclient + ipykernel)
at tiny settings, and each script pasted whole into a cell, in a folder without the kit (as on
Colab), defines its functions and neither exits nor starts work."""

import os

import nbformat
import pytest
from conftest import ROOT
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


def test_the_notebook_runs_top_to_bottom(tmp_path, tiny_model_dir):
    notebook = nbformat.read(ROOT / "hyperfit.ipynb", as_version=4)
    env = {
        "HYPERFIT_NOTEBOOK_MODEL": tiny_model_dir,
        "HYPERFIT_NOTEBOOK_OUT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    done = execute(notebook, ROOT, env)
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


ORDER = [
    "runfiles.py",
    "hyperfit.py",
    "measures.py",
    "evaluate.py",
    "plot.py",
    "annotate.py",
    "studies.py",
    "images.py",
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
        "hyperfit.py": "print(type_token_ratio([1, 2, 2, 3]), callable(hyperfit), callable(main))",
        "measures.py": "print(simctg_repetition(['a b a b a'])['simctg_rep_2'], "
        "unknown_words('a zxqv'))",
        "evaluate.py": "print(check_modes(None, True)[-1], callable(evaluate))",
        "annotate.py": "print(page_id_of([]) == page_id_of([]), callable(write_page))",
        "studies.py": "print(study_plan('shuffle')[0][0], callable(run_study))",
        "images.py": "print(shape_settings(dict(side=8, positions=65)), callable(images))",
        "plot.py": "print(repeated_ngram_mask([1, 2, 3, 1, 2, 3], 3), callable(plot_run))",
    }
    expected = {
        "runfiles.py": "a True",
        "hyperfit.py": "0.75 True True",
        "measures.py": "33.33 ['zxqv']",
        "evaluate.py": "hyperfitted_blocked True",
        "annotate.py": "True True",
        "studies.py": "order0 True",
        "images.py": "{'seq_len': 65, 'prompt_len': 33, 'gen_tokens': 32} True",
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
