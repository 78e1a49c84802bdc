"""tutorial.ipynb shows what the code does: it is committed with its outputs, and this test executes it top to
bottom in a real Jupyter kernel (nbclient) and checks that every cell runs and that the numbers its committed
outputs show (matrices, metrics, the seeds' table) are the ones the current code produces.

The cells assert their own claims too (the adapters against the papers' equations, the top-1 routers' zero
gradient, the metrics by hand against eval.continual_metrics). Timings ("31 s") vary from run to run and are
left out of the comparison; pictures are compared by their presence, not their bytes. The continual runs
need the pretrained tiny base: the notebook builds it in smolora.CACHE if it is not there (about 3.5 minutes).
The workbench cell defines an adapter class and runs it in the kernel: its run must have used that class.

The numbers of a training run are exact only for the arithmetic that made them: another CPU (its vector
instructions, its BLAS) builds the base to other bits, and every run from it differs. The notebook prints the
base's weights' hash; where the fresh hash differs from the committed one, the cells before the base are still
compared number for number, and the later ones must run, assert their own claims and draw their pictures.
"""
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"
TIMING = re.compile(r"\d+(\.\d+)? s\b")            # "(31 s)", "Run time: 26 s": not the code's numbers
BUILDING = re.compile(r"^building the tiny base model .*$", re.M)   # only where the cache was empty
BASE = re.compile(r"^the tiny base: .* weights sha256 ([0-9a-f]{12})\b.*$", re.M)
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")   # "87.5", "-47.50"; not the 2 of "tiny-llava-v2"


def shown(notebook):
    """Per code cell: the numbers its outputs show as text (stdout, markdown, plain text) and its pictures."""
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        texts, pictures = [], 0
        for output in cell.outputs:
            assert output.output_type != "error", f"a cell failed: {output.get('ename')}: {output.get('evalue')}"
            if output.output_type == "stream" and output.name == "stdout":
                texts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                if "image/png" in output.data:
                    pictures += 1
                else:
                    texts.append(output.data.get("text/markdown") or output.data.get("text/plain", ""))
        text = BASE.sub("", BUILDING.sub("", "".join(texts)))
        cells.append((NUMBER.findall(TIMING.sub("", text)), pictures))
    return cells


def base_hash(notebook):
    """(the index among code cells of the cell that loads the base, the hash of the weights it printed)."""
    code = [c for c in notebook.cells if c.cell_type == "code"]
    for k, cell in enumerate(code):
        found = BASE.search("".join(o.get("text", "") for o in cell.outputs))
        if found:
            return k, found.group(1)
    raise AssertionError("no cell printed the tiny base's hash")


def assert_shows_the_same(committed, fresh):
    """Every code cell's numbers equal, on the committed notebook's base; on another, only up to the base."""
    (base_cell, made_with), (_, here) = base_hash(committed), base_hash(fresh)
    for k, (then, now) in enumerate(zip(shown(committed), shown(fresh))):
        if k < base_cell or here == made_with:
            assert then == now, f"code cell {k}: the committed outputs show {then}, the current code {now}"
        else:       # another arithmetic's base: its runs' numbers differ, the pictures must still be there
            assert then[1] == now[1], f"code cell {k}: {then[1]} pictures committed, {now[1]} now"


def toy_notebook(equation, base, run):
    """Three code cells: an equation's check, the base's hash, a run's score."""
    cells = [nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output("stream", name="stdout", text=text)])
             for text in (f"checked: {equation}\n", f"the tiny base: tiny-llava, weights sha256 {base}\n",
                          f"ScienceQA {run}\n")]
    return nbformat.v4.new_notebook(cells=cells)


def test_numbers_after_the_base_are_compared_only_on_the_same_base():
    assert_shows_the_same(toy_notebook(1.5, "0123456789ab", 82.5), toy_notebook(1.5, "0123456789ab", 82.5))
    assert_shows_the_same(toy_notebook(1.5, "0123456789ab", 82.5), toy_notebook(1.5, "ba9876543210", 76.0))
    for fresh in (toy_notebook(1.5, "0123456789ab", 76.0), toy_notebook(2.5, "ba9876543210", 82.5)):
        with pytest.raises(AssertionError, match="code cell"):
            assert_shows_the_same(toy_notebook(1.5, "0123456789ab", 82.5), fresh)


def test_committed_notebook_has_its_outputs():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run it top to bottom, then save"
    assert NOTEBOOK.stat().st_size < 1_000_000
    assert sum(pictures for _, pictures in shown(committed)) == 4   # 2 rows of task cards, the heatmaps, the routing
    failure = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "LoRA answered" in failure                              # a real instruction-following failure
    base_hash(committed)                                           # it says which base its runs started from


def test_notebook_runs_in_a_kernel_and_shows_what_the_code_produces(tmp_path, monkeypatch):
    committed = nbformat.read(NOTEBOOK, as_version=4)
    fresh = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))     # the kernel imports smolora, data, eval; it writes in tmp_path
    NotebookClient(fresh, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()   # raises on any cell's error
    assert_shows_the_same(committed, fresh)
    # the workbench: the cell's LoRA-FA built every adapted layer of its in-process run, and A never moved
    workbench = next(c for c in fresh.cells if c.cell_type == "code" and "class LoRAFALinear" in c.source)
    said = "".join(o.get("text", "") for o in workbench.outputs)
    assert re.search(r"^14 layers were LoRAFALinear", said, re.M), said       # 2 layers x 7 linears
    assert "A after stage 2 equals A after stage 1: True; B too: False" in said
    run = tmp_path / "runs" / "tutorial" / "lorafa"
    assert json.loads((run / "results.json").read_text())["method"] == "lorafa"
