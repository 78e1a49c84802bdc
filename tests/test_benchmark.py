"""The README's Results tables are what docs/results/ holds: remade from those files, they must match to the digit."""
import json

import pytest

import benchmark


def test_readme_tables_are_made_from_docs_results():
    readme = benchmark.README.read_text()
    assert len(benchmark.BLOCK.findall(readme)) >= 5, "the README lost its benchmark blocks"
    assert benchmark.with_tables(readme, benchmark.tables()) == readme, \
        "the README's tables differ from docs/results: run python tests/benchmark.py --tables"


def results(ap, gk, drops, diagonal, seconds=60.0):
    """A two-task run's results.json with the metrics and splits a table reads."""
    return {"method": "lora", "tasks": ["scienceqa", "textvqa"], "seconds": seconds,
            "matrix": [[0, 0], [diagonal[0], 0], [50, diagonal[1]]],
            "metrics": {"AP": ap, "MFT": 80.0, "MAP": 70.0, "BWT": -30.0, "MIF": 90.0, "GK": gk},
            "dual_forgetting": {"scienceqa": dict(zip(benchmark.eval.SPLIT, drops))}}


def test_a_table_is_the_mean_and_sample_std_over_the_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path)
    monkeypatch.setattr(benchmark, "EXPERIMENTS", {"toy": ((), {"lora": ("--method", "lora"),
                                                                "dirlora": ("--method", "dirlora")})})
    runs = {"lora": [results(10.0, 40.0, (20, 5, 5), (90, 60)), results(20.0, 50.0, (10, 5, 15), (70, 60))],
            "dirlora": [results(30.0, 60.0, (0, 0, 0), (80, 100)), results(30.0, 60.0, (0, 0, 0), (80, 100))]}
    for row, seeds in runs.items():
        (tmp_path / "toy" / row).mkdir(parents=True)
        for k, r in enumerate(seeds):
            (tmp_path / "toy" / row / f"seed{k}.json").write_text(json.dumps(r))
    lines = benchmark.main_table("toy", {"lora": (2e-3, {})}).splitlines()
    # AP 10, 20: mean 15, sample std sqrt(((10-15)^2 + (20-15)^2) / 1) = 7.07; format broke/kept 20, 10 -> 15 ± 7.1
    assert lines[2] == "| lora | 0.002 | 15.0 ± 7.1 | 80.0 ± 0.0 | 70.0 ± 0.0 | -30.0 ± 0.0 | 90.0 ± 0.0 | " \
                       "45.0 ± 7.1 | 15.0 ± 7.1 | 5.0 ± 0.0 | 10.0 ± 7.1 |"
    assert lines[3].startswith("| dirlora | – | 30.0 ± 0.0 |")
    # textvqa right after learning it: 60 against DirLoRA's 100, under 80%; scienceqa 80 against 80, learned
    assert benchmark.unlearned("toy", "toy") == ["lora on textvqa: 60.0 (DirLoRA 100.0)"]


def test_blocks_are_replaced_and_the_rest_kept():
    readme = "intro\n<!-- benchmark:a -->\nold\n<!-- /benchmark -->\nmiddle\n<!-- benchmark:b -->\n\n<!-- /benchmark -->\n"
    assert benchmark.with_tables(readme, {"a": "| x |", "b": "new"}) == \
        "intro\n<!-- benchmark:a -->\n| x |\n<!-- /benchmark -->\nmiddle\n<!-- benchmark:b -->\nnew\n<!-- /benchmark -->\n"
    with pytest.raises(KeyError):
        benchmark.with_tables(readme, {"a": ""})
