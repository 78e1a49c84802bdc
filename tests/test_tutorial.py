"""tutorial.ipynb cannot rot: every code cell runs, in order, in one namespace, as a Jupyter kernel would run them.

No Jupyter here: the notebook's JSON is read and each code cell exec'd. The cells assert their own claims (the
adapters against the papers' equations, the top-1 routers' zero gradient, the metrics by hand against
eval.continual_metrics), so a change in smolora.py, data.py or eval.py that breaks a claim fails this test.
"""
import json
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"


def code_cells():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [(k, "".join(c["source"])) for k, c in enumerate(cells) if c["cell_type"] == "code"]


def test_notebook_is_saved_with_small_outputs_or_none():
    notebook = json.loads(NOTEBOOK.read_text())
    outputs = [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert len(json.dumps(outputs)) < 20_000, "clear the outputs before saving (Kernel > Restart & Clear Output)"


def test_every_code_cell_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # the notebook writes runs/tutorial/ under the working dir
    monkeypatch.syspath_prepend(str(ROOT))
    shown = []
    namespace = {"__name__": "__main__", "display": shown.append}   # Jupyter's display(), recorded
    cells = code_cells()
    assert len(cells) >= 10
    for k, source in cells:
        exec(compile(source, f"tutorial.ipynb cell {k}", "exec"), namespace)
    # the task examples (2 rows of cards) and the two runs' heatmaps side by side
    assert len(shown) == 3 and all(isinstance(image, Image.Image) for image in shown)
    runs = namespace["runs"]
    assert sorted(runs) == ["lora", "smolora"]
    for method, results in runs.items():
        assert results["method"] == method and results["tasks"] == ["scienceqa", "textvqa"]
        assert len(results["matrix"]) == 3 and all(v is not None for row in results["matrix"] for v in row)
        assert (tmp_path / "runs" / "tutorial" / method / "matrix.png").exists()
